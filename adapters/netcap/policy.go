package netcap

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// Default limits of a Policy whose limits are zero.
const (
	DefaultMaxStreams   = 64
	DefaultMaxListeners = 8
)

// A Policy says what a Network may do. It denies everything it does not
// list: a zero Policy allows nothing.
//
// Rules are written as
//
//	NETWORK:HOST:PORTS
//
// NETWORK is tcp (IPv4 and IPv6), tcp4 or tcp6. HOST is an IPv4 address
// or prefix (10.1.2.3, 10.0.0.0/8), an IPv6 one in brackets ([::1],
// [fd00::/8]), a host name (example.com, connect rules only), or * for
// any address of the network's families. PORTS is *, a port or a range
// (80, 8000-8999), or a comma-separated list of those (80,443,8000-8999);
// * includes port 0, which a listen rule needs to let the guest ask for
// an ephemeral port.
//
// A connect request for a literal address is allowed when a rule matches
// the address and port. A request for a name is allowed when a rule
// names that host (and port): the host resolves it and dials what it
// finds. Otherwise the name is resolved only if some rule allows the
// port, and each resolved address must match a rule itself: a name
// cannot lead the guest past the address rules. A listen request's host
// must be a literal address; an empty host means every address (0.0.0.0
// or ::), which only a rule with * or a prefix containing it allows.
type Policy struct {
	// Connect lists the destinations a guest may connect to.
	Connect Rules
	// Listen lists the addresses a guest may listen on.
	Listen Rules
	// MaxStreams bounds the streams (connected or accepted) open at once
	// through one Network; zero means DefaultMaxStreams.
	MaxStreams int
	// MaxListeners bounds the listeners open at once; zero means
	// DefaultMaxListeners.
	MaxListeners int
}

func (p *Policy) maxStreams() int {
	if p.MaxStreams > 0 {
		return p.MaxStreams
	}
	return DefaultMaxStreams
}

func (p *Policy) maxListeners() int {
	if p.MaxListeners > 0 {
		return p.MaxListeners
	}
	return DefaultMaxListeners
}

// A Rule allows one set of addresses and ports; see Policy for the
// syntax.
type Rule struct {
	// Network is "tcp", "tcp4" or "tcp6": which address families match.
	Network string
	// Any is true for the host *.
	Any bool
	// Prefix is the addresses matched when Any is false and Name empty.
	Prefix netip.Prefix
	// Name is a host name (lower case, without a final dot).
	Name string
	// Ports are the ports matched.
	Ports []PortRange
}

// PortRange is the ports Lo to Hi inclusive.
type PortRange struct{ Lo, Hi uint16 }

// maxRuleLen bounds a rule's text; a longer one is refused.
const maxRuleLen = 4096

// ParseRule parses one rule, such as tcp:10.0.0.0/8:80-443.
func ParseRule(s string) (Rule, error) {
	r, err := parseRule(s)
	if err != nil {
		if len(s) > 64 {
			s = s[:64] + "…"
		}
		return Rule{}, fmt.Errorf("netcap: rule %q: %w", s, err)
	}
	return r, nil
}

func parseRule(s string) (Rule, error) {
	if len(s) > maxRuleLen {
		return Rule{}, fmt.Errorf("longer than %d bytes", maxRuleLen)
	}
	network, rest, ok := strings.Cut(s, ":")
	if !ok {
		return Rule{}, fmt.Errorf("want NETWORK:HOST:PORTS")
	}
	switch network {
	case "tcp", "tcp4", "tcp6":
	default:
		return Rule{}, fmt.Errorf("network %q: want tcp, tcp4 or tcp6", network)
	}
	r := Rule{Network: network}
	i := strings.LastIndexByte(rest, ':')
	if i < 0 {
		return Rule{}, fmt.Errorf("want NETWORK:HOST:PORTS")
	}
	host, ports := rest[:i], rest[i+1:]
	switch {
	case host == "*":
		r.Any = true
	case strings.HasPrefix(host, "["):
		if !strings.HasSuffix(host, "]") {
			return Rule{}, fmt.Errorf("host %q: missing ]", host)
		}
		p, err := parsePrefix(host[1 : len(host)-1])
		if err != nil {
			return Rule{}, err
		}
		if !p.Addr().Is6() {
			return Rule{}, fmt.Errorf("host %q: brackets are for IPv6", host)
		}
		r.Prefix = p
	case strings.ContainsAny(host, ":[]"):
		return Rule{}, fmt.Errorf("host %q: write IPv6 addresses in brackets", host)
	case host != "" && (host[0] >= '0' && host[0] <= '9'):
		p, err := parsePrefix(host)
		if err != nil {
			return Rule{}, err
		}
		r.Prefix = p
	default:
		name, err := canonicalName(host)
		if err != nil {
			return Rule{}, err
		}
		r.Name = name
	}
	if r.Prefix.IsValid() && (network == "tcp4" && !r.Prefix.Addr().Is4() || network == "tcp6" && !r.Prefix.Addr().Is6()) {
		return Rule{}, fmt.Errorf("host %s is not a %s address", r.Prefix, network)
	}
	pr, err := parsePorts(ports)
	if err != nil {
		return Rule{}, err
	}
	r.Ports = pr
	return r, nil
}

// parsePrefix parses an address or a prefix; an address is a one-address
// prefix. A prefix must not have host bits set (10.1.0.0/8 is a typo).
func parsePrefix(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("host: %w", err)
		}
		if p.Addr().Zone() != "" {
			return netip.Prefix{}, fmt.Errorf("host %q: zones are not supported", s)
		}
		if p != p.Masked() {
			return netip.Prefix{}, fmt.Errorf("host %q has bits set beyond /%d (did you mean %s?)", s, p.Bits(), p.Masked())
		}
		return p, nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("host: %w", err)
	}
	if a.Zone() != "" {
		return netip.Prefix{}, fmt.Errorf("host %q: zones are not supported", s)
	}
	a = a.Unmap()
	return netip.PrefixFrom(a, a.BitLen()), nil
}

// maxPortRanges bounds a rule's port list.
const maxPortRanges = 64

func parsePorts(s string) ([]PortRange, error) {
	if s == "*" {
		return []PortRange{{0, 65535}}, nil
	}
	parts := strings.Split(s, ",")
	if len(parts) > maxPortRanges {
		return nil, fmt.Errorf("more than %d port ranges", maxPortRanges)
	}
	var out []PortRange
	for _, p := range parts {
		lo, hi, isRange := strings.Cut(p, "-")
		l, err := parsePort(lo)
		if err != nil {
			return nil, err
		}
		h := l
		if isRange {
			if h, err = parsePort(hi); err != nil {
				return nil, err
			}
			if h < l {
				return nil, fmt.Errorf("port range %q is empty", p)
			}
		}
		out = append(out, PortRange{l, h})
	}
	return out, nil
}

func parsePort(s string) (uint16, error) {
	if s == "" || len(s) > 5 || strings.TrimLeft(s, "0123456789") != "" {
		return 0, fmt.Errorf("port %q: want a number from 0 to 65535 or *", s)
	}
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil {
		return 0, fmt.Errorf("port %q: want a number from 0 to 65535", s)
	}
	return uint16(n), nil
}

// canonicalName checks a host name's syntax (letters, digits, - and _
// in dot-separated labels of at most 63 bytes, 253 in all) and returns it
// in lower case without a final dot.
func canonicalName(s string) (string, error) {
	s = strings.TrimSuffix(strings.ToLower(s), ".")
	if s == "" || len(s) > 253 {
		return "", fmt.Errorf("host name %q: want 1 to 253 bytes", s)
	}
	for label := range strings.SplitSeq(s, ".") {
		if label == "" || len(label) > 63 {
			return "", fmt.Errorf("host name %q: empty or overlong label", s)
		}
		for _, c := range []byte(label) {
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return "", fmt.Errorf("host name %q: character %q", s, c)
			}
		}
	}
	return s, nil
}

// String formats r in the rule syntax; ParseRule(r.String()) is r.
func (r Rule) String() string {
	var b strings.Builder
	b.WriteString(r.Network)
	b.WriteByte(':')
	switch {
	case r.Any:
		b.WriteByte('*')
	case r.Name != "":
		b.WriteString(r.Name)
	case r.Prefix.Addr().Is6():
		b.WriteByte('[')
		writePrefix(&b, r.Prefix)
		b.WriteByte(']')
	default:
		writePrefix(&b, r.Prefix)
	}
	b.WriteByte(':')
	if len(r.Ports) == 1 && r.Ports[0] == (PortRange{0, 65535}) {
		b.WriteByte('*')
		return b.String()
	}
	for i, p := range r.Ports {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(strconv.Itoa(int(p.Lo)))
		if p.Hi != p.Lo {
			b.WriteByte('-')
			b.WriteString(strconv.Itoa(int(p.Hi)))
		}
	}
	return b.String()
}

func writePrefix(b *strings.Builder, p netip.Prefix) {
	if p.IsSingleIP() {
		b.WriteString(p.Addr().String())
		return
	}
	b.WriteString(p.String())
}

// family reports whether a is of one of the rule's address families.
func (r Rule) family(a netip.Addr) bool {
	switch r.Network {
	case "tcp4":
		return a.Is4()
	case "tcp6":
		return a.Is6()
	}
	return true
}

func (r Rule) port(port uint16) bool {
	for _, p := range r.Ports {
		if port >= p.Lo && port <= p.Hi {
			return true
		}
	}
	return false
}

// matchAddr reports whether r allows the address and port.
func (r Rule) matchAddr(ap netip.AddrPort) bool {
	a := ap.Addr().Unmap()
	if r.Name != "" || !r.family(a) || !r.port(ap.Port()) {
		return false
	}
	return r.Any || r.Prefix.Contains(a)
}

// Rules is a list of rules; as a flag.Value, each -flag adds one.
type Rules []Rule

// String formats the rules separated by spaces.
func (rs *Rules) String() string {
	if rs == nil {
		return ""
	}
	s := make([]string, len(*rs))
	for i, r := range *rs {
		s[i] = r.String()
	}
	return strings.Join(s, " ")
}

// Set parses one rule and appends it (flag.Value).
func (rs *Rules) Set(s string) error {
	r, err := ParseRule(s)
	if err != nil {
		return err
	}
	*rs = append(*rs, r)
	return nil
}

// allowsAddr reports whether some rule allows ap.
func (rs Rules) allowsAddr(ap netip.AddrPort) bool {
	for _, r := range rs {
		if r.matchAddr(ap) {
			return true
		}
	}
	return false
}

// allowsName reports whether some rule names host (canonical) and allows
// port.
func (rs Rules) allowsName(host string, port uint16) bool {
	for _, r := range rs {
		if r.Name == host && r.port(port) {
			return true
		}
	}
	return false
}

// allowsPort reports whether some address rule allows port at all: a
// name is resolved only if one might.
func (rs Rules) allowsPort(port uint16) bool {
	for _, r := range rs {
		if r.Name == "" && r.port(port) {
			return true
		}
	}
	return false
}
