package unix

import (
	"errors"
	"net"
	"runtime"
	"strings"
	"testing"
)

func TestParseAddr(t *testing.T) {
	tests := []struct {
		in       string
		network  string
		address  string
		errMatch string // non-empty: ParseAddr must fail with an error containing this
	}{
		// Unix domain sockets.
		{in: "unix:/tmp/vat.sock", network: "unix", address: "/tmp/vat.sock"},
		{in: "unix:relative/vat.sock", network: "unix", address: "relative/vat.sock"},
		{in: "unix:/path:with:colons", network: "unix", address: "/path:with:colons"},
		{in: "unix:", errMatch: "empty socket path"},
		{in: "unix:@name", errMatch: "use unix-abstract:name"},
		{in: "unix:/a\x00b", errMatch: "NUL"},

		// Abstract namespace (Linux only).
		{in: "unix-abstract:captp", network: "unix", address: "@captp"},
		{in: "unix-abstract:with/slash:colon", network: "unix", address: "@with/slash:colon"},
		{in: "unix-abstract:", errMatch: "empty name"},

		// TCP.
		{in: "127.0.0.1:4000", network: "tcp", address: "127.0.0.1:4000"},
		{in: "127.0.0.1:0", network: "tcp", address: "127.0.0.1:0"},
		{in: "localhost:65535", network: "tcp", address: "localhost:65535"},
		{in: "example.com:080", network: "tcp", address: "example.com:80"},
		{in: "[::1]:4000", network: "tcp", address: "[::1]:4000"},
		{in: "[::]:0", network: "tcp", address: "[::]:0"},
		{in: "[fe80::1%lo]:7", network: "tcp", address: "[fe80::1%lo]:7"},
		{in: "*:4000", network: "tcp", address: ":4000"},
		{in: "*:0", network: "tcp", address: ":0"},

		// Bad inputs.
		{in: "", errMatch: "empty address"},
		{in: "localhost", errMatch: "missing port"},
		{in: "/tmp/vat.sock", errMatch: "missing port"},
		{in: "localhost:", errMatch: "missing port"},
		{in: "[::1]:", errMatch: "missing port"},
		{in: "[::1]", errMatch: "missing port"},
		{in: ":4000", errMatch: "missing host"},
		{in: "localhost:65536", errMatch: "out of range"},
		{in: "localhost:-1", errMatch: "not a number"},
		{in: "127.0.0.1:http", errMatch: "not a number"},
		{in: "foo:bar:baz", errMatch: `unknown scheme "foo:"`},
		{in: "tcp://localhost:80", errMatch: `unknown scheme "tcp:"`},
		{in: "foo:bar", errMatch: `unknown scheme "foo:" or bad port "bar"`},
		{in: "::1:4000", errMatch: "must be in brackets"},
		{in: "[1.2.3.4]:80", errMatch: "not an IPv6 address"},
		{in: "[nonsense]:80", errMatch: "not an IPv6 address"},
		{in: "a b:80", errMatch: "not a host name"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			if strings.HasPrefix(tt.in, "unix-abstract:") && tt.errMatch == "" && runtime.GOOS != "linux" {
				t.Skip("the abstract namespace is Linux-only")
			}
			network, address, err := ParseAddr(tt.in)
			if tt.errMatch != "" {
				if err == nil {
					t.Fatalf("ParseAddr(%q) = %q, %q; want an error containing %q", tt.in, network, address, tt.errMatch)
				}
				if !errors.Is(err, ErrBadAddress) {
					t.Errorf("ParseAddr(%q) error %q does not wrap ErrBadAddress", tt.in, err)
				}
				if !strings.Contains(err.Error(), tt.errMatch) {
					t.Errorf("ParseAddr(%q) error = %q; want it to contain %q", tt.in, err, tt.errMatch)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseAddr(%q): %v", tt.in, err)
			}
			if network != tt.network || address != tt.address {
				t.Errorf("ParseAddr(%q) = %q, %q; want %q, %q", tt.in, network, address, tt.network, tt.address)
			}
		})
	}
}

func TestParseAddrWrapsNetError(t *testing.T) {
	// A malformed bracket reaches net.SplitHostPort; its *net.AddrError must
	// stay reachable through the wrapping.
	_, _, err := ParseAddr("[::1:80")
	if err == nil {
		t.Fatal("ParseAddr([::1:80) succeeded")
	}
	var ae *net.AddrError
	if !errors.As(err, &ae) || !errors.Is(err, ErrBadAddress) {
		t.Errorf("error %q: want both ErrBadAddress and a *net.AddrError inside", err)
	}
}

func TestFormatAddrRoundTrip(t *testing.T) {
	for _, in := range []string{"unix:/tmp/x.sock", "unix-abstract:x", "127.0.0.1:80", "[::1]:80"} {
		network, address, err := ParseAddr(in)
		if err != nil {
			t.Fatal(err)
		}
		var a net.Addr
		if network == "unix" {
			a = &net.UnixAddr{Net: "unix", Name: address}
		} else {
			a, err = net.ResolveTCPAddr(network, address)
			if err != nil {
				t.Fatal(err)
			}
		}
		if got := FormatAddr(a); got != in {
			t.Errorf("FormatAddr(ParseAddr(%q)) = %q", in, got)
		}
	}
}
