package netstack

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
)

// ErrBadAddress is wrapped by every error ParseAddr returns, so callers can
// tell a malformed address from a network failure with errors.Is.
var ErrBadAddress = errors.New("bad address")

// ParseAddr parses a TCP address on a netstack: an IP literal and a port,
// in the host:port form of adapters/unix. A netstack has no resolver, so
// host names are refused.
//
// Accepted forms:
//
//	10.0.0.1:4000      IPv4
//	[fd00::1]:4000     IPv6, in brackets
//	*:4000             every address of the stack (listening only)
//
// For *:port the returned address is the zero netip.Addr. The port is a
// decimal number from 0 to 65535 (0 asks for a free port when listening).
// Every error wraps ErrBadAddress.
func ParseAddr(s string) (netip.AddrPort, error) {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		if !strings.Contains(s, ":") {
			return netip.AddrPort{}, fmt.Errorf("%w: %q: missing port (want ip:port)", ErrBadAddress, s)
		}
		return netip.AddrPort{}, fmt.Errorf("%w: %w", ErrBadAddress, err)
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil {
		if port == "" {
			return netip.AddrPort{}, fmt.Errorf("%w: %q: missing port after ':'", ErrBadAddress, s)
		}
		if errors.Is(err, strconv.ErrRange) {
			return netip.AddrPort{}, fmt.Errorf("%w: %q: port %s out of range 0-65535", ErrBadAddress, s, port)
		}
		return netip.AddrPort{}, fmt.Errorf("%w: %q: port %q is not a number", ErrBadAddress, s, port)
	}
	if host == "*" {
		return netip.AddrPortFrom(netip.Addr{}, uint16(n)), nil
	}
	if host == "" {
		return netip.AddrPort{}, fmt.Errorf("%w: %q: missing host (use *:%d for every address)", ErrBadAddress, s, n)
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%w: %q: %q is not an IP address (a netstack has no name resolver)",
			ErrBadAddress, s, host)
	}
	if ip.Zone() != "" {
		return netip.AddrPort{}, fmt.Errorf("%w: %q: zones are not supported", ErrBadAddress, s)
	}
	if ip.Is6() && !strings.HasPrefix(s, "[") {
		return netip.AddrPort{}, fmt.Errorf("%w: %q: an IPv6 address must be in brackets", ErrBadAddress, s)
	}
	return netip.AddrPortFrom(ip.Unmap(), uint16(n)), nil
}

// FormatAddr renders a listener's or connection's address (a *net.TCPAddr
// from this package) in the form ParseAddr accepts, so the address of a
// listener bound to port 0 can be handed to Dial.
func FormatAddr(a net.Addr) string {
	if t, ok := a.(*net.TCPAddr); ok {
		ap := t.AddrPort()
		if !ap.Addr().IsValid() || ap.Addr().IsUnspecified() {
			return "*:" + strconv.Itoa(int(ap.Port()))
		}
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()).String()
	}
	return a.String()
}
