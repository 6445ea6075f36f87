package netcap

import (
	"net/netip"
	"strings"
	"testing"
)

func TestParseRule(t *testing.T) {
	for _, tc := range []struct {
		in, out string // out "" means in; "!" means an error
	}{
		{in: "tcp:10.0.0.0/8:80-443"},
		{in: "tcp:10.1.2.3:80"},
		{in: "tcp:10.1.2.3/32:80", out: "tcp:10.1.2.3:80"},
		{in: "tcp4:*:*"},
		{in: "tcp6:[fd00::/8]:22,80,8000-8999"},
		{in: "tcp:[::1]:8080"},
		{in: "tcp:Example.COM.:443", out: "tcp:example.com:443"},
		{in: "tcp:*:0-65535", out: "tcp:*:*"},
		{in: "tcp:::1:80", out: "!"},
		{in: "tcp:10.1.0.0/8:80", out: "!"}, // host bits set
		{in: "udp:10.0.0.0/8:53", out: "!"},
		{in: "10.0.0.0/8:80", out: "!"},
		{in: "tcp:10.0.0.0/8", out: "!"},
		{in: "tcp:10.0.0.0/8:", out: "!"},
		{in: "tcp:10.0.0.0/8:443-80", out: "!"},
		{in: "tcp:10.0.0.0/8:65536", out: "!"},
		{in: "tcp:10.0.0.0/8:+80", out: "!"},
		{in: "tcp:10.0.0.0/8:80,", out: "!"},
		{in: "tcp:10.0.0.0/33:80", out: "!"},
		{in: "tcp4:[::1]:80", out: "!"},
		{in: "tcp6:10.0.0.1:80", out: "!"},
		{in: "tcp:[10.0.0.1]:80", out: "!"},
		{in: "tcp:[fe80::1%eth0]:80", out: "!"},
		{in: "tcp:bad host:80", out: "!"},
		{in: "tcp::80", out: "!"},
		{in: "tcp:" + strings.Repeat("a", 64) + ".com:80", out: "!"},
		{in: "tcp:" + strings.Repeat("1,", 100) + "1", out: "!"},
		{in: "", out: "!"},
	} {
		r, err := ParseRule(tc.in)
		if tc.out == "!" {
			if err == nil {
				t.Errorf("ParseRule(%q) = %v, want an error", tc.in, r)
			}
			continue
		}
		if err != nil {
			t.Errorf("ParseRule(%q): %v", tc.in, err)
			continue
		}
		want := tc.out
		if want == "" {
			want = tc.in
		}
		if got := r.String(); got != want {
			t.Errorf("ParseRule(%q).String() = %q, want %q", tc.in, got, want)
		}
	}
}

func TestRuleMatch(t *testing.T) {
	rules := mustRules(t, "tcp:10.0.0.0/8:80-443", "tcp6:[fd00::/8]:22", "tcp4:*:53", "tcp:example.com:443")
	for _, tc := range []struct {
		addr string
		want bool
	}{
		{"10.1.2.3:80", true},
		{"10.1.2.3:443", true},
		{"10.1.2.3:444", false},
		{"11.0.0.1:80", false},
		{"[::ffff:10.0.0.1]:80", true}, // v4-mapped is the v4 address
		{"[fd00::1]:22", true},
		{"[fd00::1]:80", false},
		{"8.8.8.8:53", true},
		{"[2001:db8::1]:53", false},
	} {
		if got := rules.allowsAddr(netip.MustParseAddrPort(tc.addr)); got != tc.want {
			t.Errorf("allowsAddr(%s) = %v, want %v", tc.addr, got, tc.want)
		}
	}
	if !rules.allowsName("example.com", 443) || rules.allowsName("example.com", 80) || rules.allowsName("example.org", 443) {
		t.Error("name rule matches wrongly")
	}
	if rules.allowsPort(8080) || !rules.allowsPort(53) {
		t.Error("allowsPort wrong")
	}
}

func TestParseRequest(t *testing.T) {
	for _, tc := range []struct {
		network, addr string
		listen        bool
		ok            bool
	}{
		{"tcp", "10.0.0.1:80", false, true},
		{"tcp", "example.com:80", false, true},
		{"tcp", ":80", true, true},
		{"tcp6", "[::1]:0", true, true},
		{"tcp", "example.com:80", true, false}, // listen needs an address
		{"tcp", ":80", false, false},
		{"tcp", "10.0.0.1:0", false, false},
		{"tcp", "10.0.0.1", false, false},
		{"tcp", "10.0.0.1:http", false, false},
		{"tcp", "10.0.0.1:99999", false, false},
		{"tcp", "[fe80::1%eth0]:80", false, false},
		{"tcp4", "[::1]:80", false, false},
		{"udp", "10.0.0.1:53", false, false},
		{"tcp", "a b:80", false, false},
		{"tcp", strings.Repeat("a", 2000) + ":80", false, false},
	} {
		_, e := parseRequest(tc.network, tc.addr, tc.listen)
		if ok := e == nil; ok != tc.ok {
			t.Errorf("parseRequest(%q, %.40q, listen=%v): error %v, want ok=%v", tc.network, tc.addr, tc.listen, e, tc.ok)
		} else if e != nil && e.Kind != KindInvalidAddress {
			t.Errorf("parseRequest(%q, %.40q): kind %v, want invalidAddress", tc.network, tc.addr, e.Kind)
		}
	}
}

func mustRules(t *testing.T, rules ...string) Rules {
	t.Helper()
	var rs Rules
	for _, r := range rules {
		if err := rs.Set(r); err != nil {
			t.Fatal(err)
		}
	}
	return rs
}

// FuzzParseRule: no input panics, and every rule that parses prints as
// text that parses back to the same rule.
func FuzzParseRule(f *testing.F) {
	for _, s := range []string{"tcp:10.0.0.0/8:80-443", "tcp6:[fd00::/8]:1,2,3-4", "tcp4:*:*", "tcp:a.b:1", "tcp:[::]:0", "tcp:1.2.3.4/0:9"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		r, err := ParseRule(s)
		if err != nil {
			return
		}
		text := r.String()
		r2, err := ParseRule(text)
		if err != nil {
			t.Fatalf("ParseRule(%q) = %q, which does not parse: %v", s, text, err)
		}
		if r2.String() != text {
			t.Fatalf("%q → %q → %q", s, text, r2.String())
		}
	})
}

// FuzzParseRequest: no guest address panics, and an accepted one is
// literal or a valid name.
func FuzzParseRequest(f *testing.F) {
	for _, s := range []string{"10.0.0.1:80", "[::1]:0", "example.com:443", ":80", "[fe80::1%eth0]:1", "a:b:c"} {
		f.Add("tcp", s, false)
		f.Add("tcp6", s, true)
	}
	f.Fuzz(func(t *testing.T, network, addr string, listen bool) {
		r, e := parseRequest(network, addr, listen)
		if e != nil {
			if e.Kind != KindInvalidAddress {
				t.Fatalf("kind %v", e.Kind)
			}
			return
		}
		if r.host == "" && !r.addr.IsValid() {
			t.Fatalf("%q accepted with neither a name nor an address", addr)
		}
		if r.host != "" {
			if _, err := canonicalName(r.host); err != nil {
				t.Fatalf("%q accepted with a bad name: %v", addr, err)
			}
		}
	})
}
