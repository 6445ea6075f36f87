// Package sturdyref implements Cap'n Proto RPC Level 2 (persistent
// capabilities) on top of the core: sturdy ref URIs compatible with OCaml's
// capnp-rpc, unguessable service IDs, a Restorer (service ID → capability)
// with an in-memory table and a pluggable persistent Store, the
// persistent.capnp Persistent.save() server helper, and Reconnecting, a
// client that holds a sturdy ref and reconnects after the connection is lost.
//
// Like the core it touches no operating system: dialing, TLS and disk
// stores live in adapters (adapters/unix, adapters/netstack,
// adapters/secure, adapters/diskstore).
//
// # URI forms
//
// A sturdy ref names a vat (how to reach it and the fingerprint of its
// public key) and a service in it (a secret ID):
//
//	capnp://sha-256:<fingerprint>@host:port/<service ID>        TCP (OCaml capnp-rpc)
//	capnp://sha-256:<fingerprint>@/path/to.socket/<service ID>  Unix socket (OCaml capnp-rpc)
//	capnp://insecure@host:port/<service ID>                     no TLS: tests only
//	capnp+netstack://sha-256:<fingerprint>@10.0.0.1:4000/<id>   a vat on the dialer's gVisor netstack
//	capnp+guest://sha-256:<fingerprint>@/run/g.sock/10.0.2.15:4000/<id>
//	                                                            a guest behind a QEMU -netdev stream socket
//
// The fingerprint is the SHA-256 of the vat's public key in DER
// SubjectPublicKeyInfo form, and the service ID is arbitrary bytes; both
// are base64url without padding (RFC 4648 §5), exactly as OCaml's
// capnp-rpc writes them, so a ref minted by an OCaml vat names the same
// thing here and the other way round. The two capnp+ schemes are ours:
// the rest of the URI keeps the capnp form, and an implementation that
// does not know them refuses them by scheme rather than dialing the wrong
// network. A Unix socket path must be absolute; characters outside the
// URI path set are percent-encoded.
package sturdyref

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// ErrBadURI is wrapped by every Parse error.
var ErrBadURI = errors.New("bad sturdy ref URI")

// MaxURILength bounds the URIs Parse accepts.
const MaxURILength = 4096

// b64 is base64url without padding, strict: one spelling per value.
var b64 = base64.RawURLEncoding.Strict()

// Fingerprint is the SHA-256 digest of a vat's public key (its DER
// SubjectPublicKeyInfo), which authenticates the vat: no certificate
// authority is involved.
type Fingerprint [sha256.Size]byte

// FingerprintOf returns the fingerprint of a DER SubjectPublicKeyInfo
// (x509.Certificate.RawSubjectPublicKeyInfo, x509.MarshalPKIXPublicKey).
func FingerprintOf(spkiDER []byte) Fingerprint { return sha256.Sum256(spkiDER) }

// String returns the fingerprint as a sturdy ref writes it:
// "sha-256:" and the digest in base64url without padding.
func (f Fingerprint) String() string { return "sha-256:" + b64.EncodeToString(f[:]) }

// Equal compares in constant time.
func (f Fingerprint) Equal(g Fingerprint) bool { return subtle.ConstantTimeCompare(f[:], g[:]) == 1 }

// ParseFingerprint parses the form String writes.
func ParseFingerprint(s string) (Fingerprint, error) {
	hash, digest, ok := strings.Cut(s, ":")
	if !ok {
		return Fingerprint{}, fmt.Errorf("%w: fingerprint %q: want sha-256:<base64url digest>", ErrBadURI, s)
	}
	return parseFingerprint(hash, digest)
}

func parseFingerprint(hash, digest string) (Fingerprint, error) {
	var f Fingerprint
	if hash != "sha-256" {
		return f, fmt.Errorf("%w: unknown hash type %q (only sha-256)", ErrBadURI, clip(hash))
	}
	d, err := b64.DecodeString(digest)
	if err != nil {
		return f, fmt.Errorf("%w: fingerprint is not base64url without padding: %v", ErrBadURI, err)
	}
	if len(d) != len(f) {
		return f, fmt.Errorf("%w: fingerprint has %d bytes, want %d", ErrBadURI, len(d), len(f))
	}
	copy(f[:], d)
	return f, nil
}

// Transport says how a vat is reached; it is the URI's scheme.
type Transport string

// Transports.
const (
	// TCP or a Unix socket (scheme capnp): Address.Path set means Unix.
	TCP Transport = "capnp"
	// Netstack is TCP over the dialer's gVisor userspace stack (an
	// in-process virtual network, or the host side of a QEMU link).
	Netstack Transport = "capnp+netstack"
	// Guest is a vat inside a QEMU guest, reached through the guest's
	// -netdev stream socket at Address.Path: the dialer runs a userspace
	// stack on that socket and dials Address.Host:Port over it.
	Guest Transport = "capnp+guest"
)

// Address is where a vat listens.
type Address struct {
	Transport Transport
	// Host and Port: a TCP or netstack address, or the guest's address
	// for Guest. Host is a name or an IP address (IPv6 without brackets).
	Host string
	Port uint16
	// Path is the Unix socket (TCP transport) or the QEMU link socket
	// (Guest), absolute.
	Path string
}

// IsUnix reports whether a is a Unix socket.
func (a Address) IsUnix() bool { return a.Transport == TCP && a.Path != "" }

// HostPort returns "host:port", with brackets around an IPv6 host.
func (a Address) HostPort() string {
	return joinHostPort(a.Host, a.Port)
}

func joinHostPort(host string, port uint16) string {
	if strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	return host + ":" + strconv.Itoa(int(port))
}

// String returns the address in the URI's form, without the fingerprint
// and service ID.
func (a Address) String() string {
	var b strings.Builder
	a.write(&b)
	return string(a.Transport) + "://" + b.String()
}

func (a Address) write(b *strings.Builder) {
	switch {
	case a.Transport == Guest:
		b.WriteString(escapePath(a.Path))
		b.WriteByte('/')
		b.WriteString(a.HostPort())
	case a.Path != "":
		b.WriteString(escapePath(a.Path))
	default:
		b.WriteString(a.HostPort())
	}
}

// Ref is a sturdy ref: a vat and a service in it. Its URI carries the
// service ID, a secret: whoever has it can restore the capability.
type Ref struct {
	// Insecure: no TLS and no authentication (tests only); the URI says
	// so ("capnp://insecure@…").
	Insecure bool
	// Fingerprint authenticates the vat (unless Insecure).
	Fingerprint Fingerprint
	Address     Address
	// ServiceID names the service; empty is the vat's public bootstrap
	// capability.
	ServiceID []byte
}

// Vat returns r without its service ID: where and who the vat is.
func (r Ref) Vat() Ref {
	r.ServiceID = nil
	return r
}

// WithService returns r naming the service id.
func (r Ref) WithService(id []byte) Ref {
	r.ServiceID = append([]byte{}, id...)
	return r
}

// String returns the URI, secret service ID included.
func (r Ref) String() string {
	var b strings.Builder
	b.WriteString(string(r.Address.Transport))
	b.WriteString("://")
	if r.Insecure {
		b.WriteString("insecure")
	} else {
		b.WriteString(r.Fingerprint.String())
	}
	b.WriteByte('@')
	r.Address.write(&b)
	if len(r.ServiceID) > 0 || r.Address.Path != "" {
		// OCaml writes host:port without a slash when the ID is empty
		// (the public service); a path always ends with /<ID>.
		b.WriteByte('/')
		b.WriteString(b64.EncodeToString(r.ServiceID))
	}
	return b.String()
}

// Redacted returns the URI with the service ID replaced by "…", for logs.
func (r Ref) Redacted() string {
	s := r.Vat().String()
	return strings.TrimSuffix(s, "/") + "/…"
}

// Parse parses a sturdy ref URI in any of the forms in the package
// documentation. It never panics, whatever s is.
func Parse(s string) (Ref, error) {
	var r Ref
	if len(s) > MaxURILength {
		return r, fmt.Errorf("%w: longer than %d bytes", ErrBadURI, MaxURILength)
	}
	scheme, rest, ok := strings.Cut(s, "://")
	if !ok {
		return r, fmt.Errorf("%w: %q: want capnp://…", ErrBadURI, clip(s))
	}
	switch t := Transport(strings.ToLower(scheme)); t {
	case TCP, Netstack, Guest:
		r.Address.Transport = t
	default:
		return r, fmt.Errorf("%w: unknown scheme %q (want capnp, capnp+netstack or capnp+guest)", ErrBadURI, clip(scheme))
	}
	if i := strings.IndexAny(rest, "?#"); i >= 0 {
		return r, fmt.Errorf("%w: query or fragment not allowed", ErrBadURI)
	}
	// The userinfo ends at the first '@': neither form of it contains one.
	auth, loc, ok := strings.Cut(rest, "@")
	if !ok {
		return r, fmt.Errorf("%w: no fingerprint: want …://sha-256:<digest>@… or …://insecure@…", ErrBadURI)
	}
	if auth == "insecure" {
		r.Insecure = true
	} else {
		hash, digest, ok := strings.Cut(auth, ":")
		if !ok {
			return r, fmt.Errorf("%w: fingerprint %q: want sha-256:<digest> or insecure", ErrBadURI, clip(auth))
		}
		f, err := parseFingerprint(hash, digest)
		if err != nil {
			return r, err
		}
		r.Fingerprint = f
	}
	// The service ID is the last path segment.
	i := strings.LastIndexByte(loc, '/')
	if i < 0 {
		// capnp://…@host:port with no path: the public service, as in
		// OCaml.
		if r.Address.Transport == Guest || strings.HasPrefix(loc, "/") {
			return r, fmt.Errorf("%w: missing /<service ID>", ErrBadURI)
		}
		i = len(loc)
		loc += "/"
	}
	locPart, idPart := loc[:i], loc[i+1:]
	id, err := b64.DecodeString(idPart)
	if err != nil {
		return r, fmt.Errorf("%w: service ID is not base64url without padding: %v", ErrBadURI, err)
	}
	r.ServiceID = id
	if err := parseLocation(&r.Address, locPart); err != nil {
		return Ref{}, err
	}
	return r, nil
}

func parseLocation(a *Address, loc string) error {
	if loc == "" {
		return fmt.Errorf("%w: missing address: want host:port or /socket/path before /<service ID>", ErrBadURI)
	}
	switch a.Transport {
	case Guest:
		// /link/socket/path/guest-ip:port
		i := strings.LastIndexByte(loc, '/')
		if i <= 0 {
			return fmt.Errorf("%w: capnp+guest wants /<link socket path>/<guest ip:port>/<service ID>", ErrBadURI)
		}
		path, err := parsePath(loc[:i])
		if err != nil {
			return err
		}
		a.Path = path
		host, port, err := parseHostPort(loc[i+1:])
		if err != nil {
			return err
		}
		if !isIPv4(host) && !strings.Contains(host, ":") {
			return fmt.Errorf("%w: guest address %q is not an IP address", ErrBadURI, clip(host))
		}
		a.Host, a.Port = host, port
		return nil
	case TCP:
		if strings.HasPrefix(loc, "/") {
			path, err := parsePath(loc)
			if err != nil {
				return err
			}
			a.Path = path
			return nil
		}
	}
	host, port, err := parseHostPort(loc)
	if err != nil {
		return err
	}
	a.Host, a.Port = host, port
	return nil
}

// parseHostPort parses host:port or [ipv6]:port.
func parseHostPort(s string) (string, uint16, error) {
	var host, port string
	if strings.HasPrefix(s, "[") {
		end := strings.IndexByte(s, ']')
		if end < 0 {
			return "", 0, fmt.Errorf("%w: unclosed '[' in %q", ErrBadURI, clip(s))
		}
		host = strings.ToLower(s[1:end])
		if !isIPv6(host) {
			return "", 0, fmt.Errorf("%w: %q is not an IPv6 address", ErrBadURI, clip(host))
		}
		rest := s[end+1:]
		if !strings.HasPrefix(rest, ":") {
			return "", 0, fmt.Errorf("%w: missing :port after [%s]", ErrBadURI, host)
		}
		port = rest[1:]
	} else {
		i := strings.LastIndexByte(s, ':')
		if i < 0 {
			return "", 0, fmt.Errorf("%w: missing :port in %q", ErrBadURI, clip(s))
		}
		host, port = s[:i], s[i+1:]
		if host == "" {
			return "", 0, fmt.Errorf("%w: missing host in %q", ErrBadURI, clip(s))
		}
		for j := 0; j < len(host); j++ {
			c := host[j]
			if !isAlnum(c) && c != '.' && c != '-' && c != '_' {
				return "", 0, fmt.Errorf("%w: bad character %q in host %q", ErrBadURI, c, clip(host))
			}
		}
		host = strings.ToLower(host)
	}
	if port == "" || len(port) > 5 || (len(port) > 1 && port[0] == '0') {
		return "", 0, fmt.Errorf("%w: bad port %q", ErrBadURI, clip(port))
	}
	n := 0
	for j := 0; j < len(port); j++ {
		if port[j] < '0' || port[j] > '9' {
			return "", 0, fmt.Errorf("%w: bad port %q", ErrBadURI, clip(port))
		}
		n = n*10 + int(port[j]-'0')
	}
	if n == 0 || n > 65535 {
		return "", 0, fmt.Errorf("%w: port %d out of range", ErrBadURI, n)
	}
	return host, uint16(n), nil
}

// parsePath percent-decodes an absolute socket path.
func parsePath(s string) (string, error) {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '%':
			if i+2 >= len(s) || unhex(s[i+1]) < 0 || unhex(s[i+2]) < 0 {
				return "", fmt.Errorf("%w: bad percent escape in path", ErrBadURI)
			}
			b.WriteByte(byte(unhex(s[i+1])<<4 | unhex(s[i+2])))
			i += 2
		case pathChar(c):
			b.WriteByte(c)
		default:
			return "", fmt.Errorf("%w: character %q must be percent-encoded in a path", ErrBadURI, c)
		}
	}
	p := b.String()
	if !strings.HasPrefix(p, "/") || len(p) < 2 || strings.HasSuffix(p, "/") {
		return "", fmt.Errorf("%w: socket path %q must be absolute and name a file", ErrBadURI, clip(p))
	}
	if strings.IndexByte(p, 0) >= 0 {
		return "", fmt.Errorf("%w: NUL in socket path", ErrBadURI)
	}
	return p, nil
}

// escapePath percent-encodes what parsePath would refuse.
func escapePath(p string) string {
	const hex = "0123456789ABCDEF"
	var b strings.Builder
	for i := 0; i < len(p); i++ {
		c := p[i]
		if pathChar(c) {
			b.WriteByte(c)
			continue
		}
		b.WriteByte('%')
		b.WriteByte(hex[c>>4])
		b.WriteByte(hex[c&15])
	}
	return b.String()
}

// pathChar reports whether c may appear unescaped in a path: RFC 3986
// unreserved, sub-delims, ':' and '/'. '@' is escaped: the userinfo ends
// at the first '@'.
func pathChar(c byte) bool {
	return isAlnum(c) || strings.IndexByte("-._~!$&'()*+,;=:/", c) >= 0
}

// isIPv4 reports whether s is a dotted-quad IPv4 address.
func isIPv4(s string) bool {
	parts := strings.Split(s, ".")
	if len(parts) != 4 {
		return false
	}
	for _, p := range parts {
		if p == "" || len(p) > 3 || (len(p) > 1 && p[0] == '0') {
			return false
		}
		n := 0
		for i := 0; i < len(p); i++ {
			if p[i] < '0' || p[i] > '9' {
				return false
			}
			n = n*10 + int(p[i]-'0')
		}
		if n > 255 {
			return false
		}
	}
	return true
}

// isIPv6 reports whether s (lower case) is an IPv6 address: eight groups
// of up to four hex digits, at most one "::" standing for one or more
// zero groups, and optionally an IPv4 address as the last 32 bits. (net/netip
// is out of the core's reach: it is under net/.)
func isIPv6(s string) bool {
	head, tail, elided := strings.Cut(s, "::")
	if elided && strings.Contains(tail, "::") {
		return false
	}
	var parts []string
	if head != "" {
		parts = strings.Split(head, ":")
	}
	if tail != "" {
		parts = append(parts, strings.Split(tail, ":")...)
	}
	groups := 0
	for i, p := range parts {
		if i == len(parts)-1 && strings.Contains(p, ".") {
			if !isIPv4(p) {
				return false
			}
			groups += 2
			continue
		}
		if p == "" || len(p) > 4 {
			return false
		}
		for j := 0; j < len(p); j++ {
			if unhex(p[j]) < 0 {
				return false
			}
		}
		groups++
	}
	if elided {
		return groups <= 7
	}
	return groups == 8
}

func isAlnum(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
}

func unhex(c byte) int {
	switch {
	case c >= '0' && c <= '9':
		return int(c - '0')
	case c >= 'a' && c <= 'f':
		return int(c-'a') + 10
	case c >= 'A' && c <= 'F':
		return int(c-'A') + 10
	}
	return -1
}

// clip shortens s for error messages.
func clip(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}
