package unix

import (
	"errors"
	"fmt"
	"net"
	"runtime"
	"strconv"
	"strings"
)

// ErrBadAddress is wrapped by every error ParseAddr returns, so callers can
// tell a malformed address from a network failure with errors.Is.
var ErrBadAddress = errors.New("bad address")

const (
	schemeUnix         = "unix:"
	schemeUnixAbstract = "unix-abstract:"
)

// ParseAddr turns an address in the style of Cap'n Proto's C++ EzRpc into
// the network and address arguments of net.Dial and net.Listen.
//
// Accepted forms:
//
//	unix:/path/to/socket   a Unix domain socket at a filesystem path
//	unix-abstract:name     a Linux abstract-namespace socket ("@name" in Go)
//	host:port              TCP; host is a hostname such as localhost or an IPv4 literal
//	[ipv6]:port            TCP over IPv6, e.g. [::1]:4000
//	*:port                 TCP on every interface (listening); dialing it reaches the local host
//
// The port is a decimal number from 0 to 65535 (0 asks the system for a
// free port when listening). Every error wraps ErrBadAddress.
func ParseAddr(s string) (network, address string, err error) {
	switch {
	case s == "":
		return "", "", fmt.Errorf("%w: empty address", ErrBadAddress)

	case strings.HasPrefix(s, schemeUnix):
		path := s[len(schemeUnix):]
		if path == "" {
			return "", "", fmt.Errorf("%w: %q: empty socket path after %q", ErrBadAddress, s, schemeUnix)
		}
		if strings.HasPrefix(path, "@") {
			// Go would silently treat this as an abstract name.
			return "", "", fmt.Errorf("%w: %q: path starts with '@'; use %s%s for the abstract namespace",
				ErrBadAddress, s, schemeUnixAbstract, path[1:])
		}
		if strings.ContainsRune(path, 0) {
			return "", "", fmt.Errorf("%w: %q: socket path contains a NUL byte", ErrBadAddress, s)
		}
		return "unix", path, nil

	case strings.HasPrefix(s, schemeUnixAbstract):
		name := s[len(schemeUnixAbstract):]
		if name == "" {
			return "", "", fmt.Errorf("%w: %q: empty name after %q", ErrBadAddress, s, schemeUnixAbstract)
		}
		if runtime.GOOS != "linux" && runtime.GOOS != "android" {
			return "", "", fmt.Errorf("%w: %q: the abstract socket namespace exists only on Linux, not %s",
				ErrBadAddress, s, runtime.GOOS)
		}
		return "unix", "@" + name, nil
	}

	// TCP: host:port, [ipv6]:port or *:port.
	if !strings.HasPrefix(s, "[") && strings.Count(s, ":") > 1 {
		scheme, _, _ := strings.Cut(s, ":")
		if isSchemeName(scheme) {
			return "", "", fmt.Errorf("%w: %q: unknown scheme %q (want unix:, unix-abstract: or host:port)",
				ErrBadAddress, s, scheme+":")
		}
		return "", "", fmt.Errorf("%w: %q: an IPv6 address must be in brackets, as in [::1]:port", ErrBadAddress, s)
	}
	if !strings.Contains(s, ":") {
		return "", "", fmt.Errorf("%w: %q: missing port (want host:port, unix:/path or unix-abstract:name)",
			ErrBadAddress, s)
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return "", "", fmt.Errorf("%w: %w", ErrBadAddress, err)
	}
	if port == "" {
		return "", "", fmt.Errorf("%w: %q: missing port after ':'", ErrBadAddress, s)
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil {
		if errors.Is(err, strconv.ErrRange) {
			return "", "", fmt.Errorf("%w: %q: port %s out of range 0-65535", ErrBadAddress, s, port)
		}
		if isSchemeName(host) && isSchemeName(port) && !strings.HasPrefix(s, "[") {
			return "", "", fmt.Errorf("%w: %q: unknown scheme %q or bad port %q", ErrBadAddress, s, host+":", port)
		}
		return "", "", fmt.Errorf("%w: %q: port %q is not a number", ErrBadAddress, s, port)
	} else {
		port = strconv.FormatUint(n, 10) // drop leading zeros
	}
	switch {
	case host == "*":
		host = ""
	case host == "":
		return "", "", fmt.Errorf("%w: %q: missing host (use *:%s for every interface)", ErrBadAddress, s, port)
	case strings.HasPrefix(s, "["):
		ip, _, _ := strings.Cut(host, "%") // an IPv6 zone, as in [fe80::1%eth0]
		if net.ParseIP(ip) == nil || !strings.Contains(ip, ":") {
			return "", "", fmt.Errorf("%w: %q: %q in brackets is not an IPv6 address", ErrBadAddress, s, host)
		}
	case strings.ContainsAny(host, "/ \t\n"):
		return "", "", fmt.Errorf("%w: %q: %q is not a host name", ErrBadAddress, s, host)
	}
	return "tcp", net.JoinHostPort(host, port), nil
}

// isSchemeName reports whether s looks like a URL scheme (letters, digits,
// '+', '-', '.'; starting with a letter) rather than a host.
func isSchemeName(s string) bool {
	if s == "" {
		return false
	}
	for i, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z':
		case i > 0 && (r >= '0' && r <= '9' || r == '+' || r == '-' || r == '.'):
		default:
			return false
		}
	}
	return true
}

// FormatAddr is the inverse of ParseAddr for a listener's address: it
// renders a net.Addr in the form ParseAddr accepts (unix:/path,
// unix-abstract:name or host:port), so the address of a listener bound to
// port 0 can be handed to Dial.
func FormatAddr(a net.Addr) string {
	switch a.Network() {
	case "unix", "unixpacket":
		s := a.String()
		if name, ok := strings.CutPrefix(s, "@"); ok {
			return schemeUnixAbstract + name
		}
		return schemeUnix + s
	default:
		return a.String()
	}
}
