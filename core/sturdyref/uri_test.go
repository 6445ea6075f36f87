package sturdyref

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

// The OCaml capnp-rpc test suite's URIs (test/test.ml, test_sturdy_uri):
// each parses to the same vat and service and prints back unchanged.
func TestOCamlURIs(t *testing.T) {
	fp, err := ParseFingerprint("sha-256:s16WV4JeGusAL_nTjvICiQOFqm3LqYrDj3K-HXdMi8s")
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		uri  string
		want Ref
	}{
		{"capnp://insecure@/sock/", Ref{Insecure: true, Address: Address{Transport: TCP, Path: "/sock"}, ServiceID: []byte{}}},
		{"capnp://insecure@localhost:7000", Ref{Insecure: true, Address: Address{Transport: TCP, Host: "localhost", Port: 7000}, ServiceID: []byte{}}},
		{"capnp://sha-256:s16WV4JeGusAL_nTjvICiQOFqm3LqYrDj3K-HXdMi8s@localhost:7000/bWFpbg",
			Ref{Fingerprint: fp, Address: Address{Transport: TCP, Host: "localhost", Port: 7000}, ServiceID: []byte("main")}},
		{"capnp://sha-256:s16WV4JeGusAL_nTjvICiQOFqm3LqYrDj3K-HXdMi8s@/sock/bWFpbg",
			Ref{Fingerprint: fp, Address: Address{Transport: TCP, Path: "/sock"}, ServiceID: []byte("main")}},
		// The OCaml README's echo example.
		{"capnp://sha-256:3Tj5y5Q2qpqN3Sbh0GRPxgORZw98_NtrU2nLI0-Tn6g@127.0.0.1:7000/eBIndzZyoVDxaJdZ8uh_xBx5V1lfXWTJCDX-qEkgNZ4", Ref{}},
	}
	for _, tc := range cases {
		r, err := Parse(tc.uri)
		if err != nil {
			t.Fatalf("Parse(%q): %v", tc.uri, err)
		}
		if tc.want.Address.Transport != "" && !refEqual(r, tc.want) {
			t.Errorf("Parse(%q) = %+v; want %+v", tc.uri, r, tc.want)
		}
		if got := r.String(); got != tc.uri {
			t.Errorf("Parse(%q).String() = %q", tc.uri, got)
		}
	}
}

func refEqual(a, b Ref) bool {
	return a.Insecure == b.Insecure && a.Fingerprint == b.Fingerprint && a.Address == b.Address && bytes.Equal(a.ServiceID, b.ServiceID)
}

func TestOurURIForms(t *testing.T) {
	fp := FingerprintOf([]byte("a public key"))
	id := []byte{0, 1, 2, 0xfe, 0xff}
	cases := []struct {
		ref  Ref
		want string
	}{
		{Ref{Fingerprint: fp, Address: Address{Transport: Netstack, Host: "10.0.0.1", Port: 4000}, ServiceID: id},
			"capnp+netstack://" + fp.String() + "@10.0.0.1:4000/AAEC_v8"},
		{Ref{Fingerprint: fp, Address: Address{Transport: Guest, Path: "/run/qemu/g.sock", Host: "10.0.2.15", Port: 4000}, ServiceID: id},
			"capnp+guest://" + fp.String() + "@/run/qemu/g.sock/10.0.2.15:4000/AAEC_v8"},
		{Ref{Insecure: true, Address: Address{Transport: TCP, Host: "::1", Port: 7000}, ServiceID: id},
			"capnp://insecure@[::1]:7000/AAEC_v8"},
		{Ref{Insecure: true, Address: Address{Transport: TCP, Path: "/tmp/a b@c%/x.sock"}, ServiceID: id},
			"capnp://insecure@/tmp/a%20b%40c%25/x.sock/AAEC_v8"},
		{Ref{Insecure: true, Address: Address{Transport: Guest, Path: "/g.sock", Host: "fe80::1", Port: 1}, ServiceID: nil},
			"capnp+guest://insecure@/g.sock/[fe80::1]:1/"},
	}
	for _, tc := range cases {
		if got := tc.ref.String(); got != tc.want {
			t.Errorf("String() = %q; want %q", got, tc.want)
		}
		r, err := Parse(tc.want)
		if err != nil {
			t.Fatalf("Parse(%q): %v", tc.want, err)
		}
		if !refEqual(r, tc.ref) && !(len(tc.ref.ServiceID) == 0 && len(r.ServiceID) == 0) {
			t.Errorf("Parse(%q) = %+v; want %+v", tc.want, r, tc.ref)
		}
	}
	r, _ := Parse("capnp://insecure@h:1/c2VjcmV0")
	if red := r.Redacted(); strings.Contains(red, "c2VjcmV0") || !strings.HasSuffix(red, "/…") {
		t.Errorf("Redacted() = %q shows the service ID", red)
	}
}

func TestParseRejects(t *testing.T) {
	fp := FingerprintOf(nil).String()
	bad := map[string]string{
		"":                                             "want capnp://",
		"http://insecure@h:1/":                         "unknown scheme",
		"capnp://h:1/":                                 "no fingerprint",
		"capnp://sha-1:AAAA@h:1/":                      "unknown hash",
		"capnp://sha-256:AAAA@h:1/":                    "bytes, want 32",
		"capnp://sha-256:!!!@h:1/":                     "base64url",
		"capnp://" + fp + "=@h:1/":                     "base64url",
		"capnp://insecure@h/":                          "missing :port",
		"capnp://insecure@h:0/":                        "out of range",
		"capnp://insecure@h:65536/":                    "out of range",
		"capnp://insecure@h:08/":                       "bad port",
		"capnp://insecure@h:1/a/AA":                    "bad port",
		"capnp://insecure@:1/":                         "missing host",
		"capnp://insecure@h%41:1/":                     "bad character",
		"capnp://insecure@[::1:1/":                     "unclosed",
		"capnp://insecure@[zz::1]:1/":                  "not an IPv6",
		"capnp://insecure@[::1]/":                      "missing :port",
		"capnp://insecure@h:1/a=":                      "base64url",
		"capnp://insecure@h:1/?x":                      "query",
		"capnp://insecure@/sock":                       "missing address",
		"capnp://insecure@/":                           "missing address",
		"capnp://insecure@//AA":                        "absolute",
		"capnp://insecure@/a%zz/":                      "percent",
		"capnp://insecure@/a%00b/":                     "NUL",
		"capnp://insecure@/a b/":                       "percent-encoded",
		"capnp+guest://insecure@/g.sock/":              "capnp+guest wants",
		"capnp+guest://insecure@/g.sock/h:1/":          "not an IP",
		"capnp+netstack://insecure@/g.sock/AA":         "missing :port",
		"capnp+guest://insecure@/g.sock/1.2.3/AA":      "missing :port",
		"capnp://" + strings.Repeat("a", MaxURILength): "longer than",
	}
	for uri, want := range bad {
		_, err := Parse(uri)
		if err == nil {
			t.Errorf("Parse(%q) succeeded; want an error containing %q", uri, want)
			continue
		}
		if !errors.Is(err, ErrBadURI) || !strings.Contains(err.Error(), want) {
			t.Errorf("Parse(%q) = %v; want ErrBadURI containing %q", uri, err, want)
		}
	}
}

func TestIPv6Validation(t *testing.T) {
	good := []string{"::", "::1", "fe80::1", "1:2:3:4:5:6:7:8", "::ffff:1.2.3.4", "1::2:3", "1:2:3:4:5:6:1.2.3.4"}
	bad := []string{"", ":", ":::", "1:2:3:4:5:6:7", "1:2:3:4:5:6:7:8:9", "1::2::3", "12345::", "g::", "1.2.3.4", "::1.2.3.4:1", "1:2:3:4:5:6:7::8"}
	for _, s := range good {
		if !isIPv6(s) {
			t.Errorf("isIPv6(%q) = false", s)
		}
	}
	for _, s := range bad {
		if isIPv6(s) {
			t.Errorf("isIPv6(%q) = true", s)
		}
	}
}

// FuzzParse: Parse never panics, and whatever it accepts prints to a URI
// that parses to the same ref and prints the same again.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"capnp://insecure@/sock/",
		"capnp://insecure@localhost:7000",
		"capnp://sha-256:s16WV4JeGusAL_nTjvICiQOFqm3LqYrDj3K-HXdMi8s@localhost:7000/bWFpbg",
		"capnp://sha-256:s16WV4JeGusAL_nTjvICiQOFqm3LqYrDj3K-HXdMi8s@/sock/bWFpbg",
		"capnp+netstack://insecure@10.0.0.1:4000/AAEC_v8",
		"capnp+guest://insecure@/run/g.sock/10.0.2.15:4000/AAEC_v8",
		"capnp://insecure@[::ffff:1.2.3.4]:7000/",
		"capnp://insecure@/tmp/a%20b/x.sock/AAEC",
		"CAPNP://insecure@H:1/",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		r, err := Parse(s)
		if err != nil {
			if !errors.Is(err, ErrBadURI) {
				t.Fatalf("Parse(%q) error %v does not wrap ErrBadURI", s, err)
			}
			return
		}
		u := r.String()
		r2, err := Parse(u)
		if err != nil {
			t.Fatalf("Parse(%q) ok, but its String %q does not parse: %v", s, u, err)
		}
		if !refEqual(r, r2) && !(len(r.ServiceID) == 0 && len(r2.ServiceID) == 0 && r.Address == r2.Address) {
			t.Fatalf("round trip changed the ref: %q → %+v → %q → %+v", s, r, u, r2)
		}
		if u2 := r2.String(); u2 != u {
			t.Fatalf("String not stable: %q then %q", u, u2)
		}
	})
}
