package netstack

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/captp-go/captp/adapters/secure"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/sturdyref"
)

// DialSturdy connects to the vat a capnp+netstack:// sturdy ref names, over
// this stack, with the TLS 1.3 handshake as id pinning the ref's
// fingerprint (none for an insecure ref), and starts a connection on it.
// A wrong key is refused in the handshake, before any RPC byte, with a
// *secure.FingerprintError. id may be nil (a throwaway identity). The
// Conn owns opts.BootstrapClient, also on error. Unlike Dial's, the Conn
// is not waited for by Close (the stack's close still ends it).
func (s *Stack) DialSturdy(ctx context.Context, ref sturdyref.Ref, id *secure.Identity, opts *core.Options) (*core.Conn, error) {
	if ref.Address.Transport != sturdyref.Netstack {
		releaseOpts(opts)
		return nil, fmt.Errorf("netstack: %w: a %s ref is not dialled over a netstack (want capnp+netstack://)", ErrBadAddress, ref.Address.Transport)
	}
	raw, err := s.DialTCP(ctx, ref.Address.HostPort())
	if err != nil {
		releaseOpts(opts)
		return nil, err
	}
	c, err := secure.Client(ctx, raw, id, ref)
	if err != nil {
		releaseOpts(opts)
		return nil, fmt.Errorf("netstack: %s: dial %s: %w", s.name, ref.Redacted(), err)
	}
	return core.NewConn(c, opts), nil
}

func releaseOpts(opts *core.Options) {
	if opts != nil {
		opts.BootstrapClient.Release()
	}
}

// SturdyDialer returns a sturdyref.Dialer (for sturdyref.Reconnecting)
// that dials over this stack with DialSturdy. Each connection gets a copy
// of opts with its own reference to opts.BootstrapClient.
func (s *Stack) SturdyDialer(id *secure.Identity, opts *core.Options) sturdyref.Dialer {
	return func(ctx context.Context, ref sturdyref.Ref) (*core.Conn, error) {
		var o *core.Options
		if opts != nil {
			c := *opts
			c.BootstrapClient = opts.BootstrapClient.AddRef()
			o = &c
		}
		return s.DialSturdy(ctx, ref, id, o)
	}
}

// ServeSturdy is Serve for a vat with an identity: each accepted
// connection runs the TLS 1.3 handshake as id before any RPC byte is read
// (id nil: plain connections, for tests). Set opts.Restorer to serve
// sturdy refs.
func ServeSturdy(ctx context.Context, lis net.Listener, id *secure.Identity, opts *core.Options) error {
	return Serve(ctx, secure.NewListener(lis, id), opts)
}

// SturdyAddress returns the capnp+netstack address of a listener from
// Stack.Listen. For a listener on every address ("*:port") it uses the
// stack's first address.
func (s *Stack) SturdyAddress(lis net.Listener) (sturdyref.Address, error) {
	ap, err := ParseAddr(FormatAddr(lis.Addr()))
	if err != nil {
		return sturdyref.Address{}, fmt.Errorf("netstack: sturdy address: %w", err)
	}
	ip := ap.Addr()
	if !ip.IsValid() || ip.IsUnspecified() {
		ip = s.Addr()
	}
	if !ip.IsValid() {
		return sturdyref.Address{}, errors.New("netstack: sturdy address: the stack has no address")
	}
	return sturdyref.Address{Transport: sturdyref.Netstack, Host: ip.Unmap().String(), Port: ap.Port()}, nil
}

// GuestOptions configure DialGuest.
type GuestOptions struct {
	// Addr is the host side's address on the guest's network. Zero: the
	// guest's IPv4 /24 with host number 2 (10.0.2.15 → 10.0.2.2/24, QEMU's
	// usual host address).
	Addr netip.Prefix
	// Identity is the client's TLS identity; nil uses a throwaway one.
	Identity *secure.Identity
	// Options for the connection; the Conn owns BootstrapClient.
	Options *core.Options
}

// DialGuest connects to a vat inside a QEMU guest that a capnp+guest://
// sturdy ref names: it connects to the guest's -netdev stream socket
// (ref.Address.Path; QEMU runs with server=on), runs a userspace stack on
// it as the host side of the guest's virtual NIC, dials the guest's
// address over it with TLS pinned to the ref's fingerprint, and starts a
// connection. The stack lives as long as the connection. QEMU accepts one
// host on a stream socket at a time, so one DialGuest per guest link.
func DialGuest(ctx context.Context, ref sturdyref.Ref, o *GuestOptions) (*core.Conn, error) {
	if o == nil {
		o = &GuestOptions{}
	}
	a := ref.Address
	if a.Transport != sturdyref.Guest {
		releaseOpts(o.Options)
		return nil, fmt.Errorf("netstack: %w: DialGuest wants a capnp+guest:// ref, not %s", ErrBadAddress, a.Transport)
	}
	guest, err := netip.ParseAddr(a.Host)
	if err != nil {
		releaseOpts(o.Options)
		return nil, fmt.Errorf("netstack: %w: guest address %q: %v", ErrBadAddress, a.Host, err)
	}
	host := o.Addr
	if !host.IsValid() {
		if !guest.Is4() {
			releaseOpts(o.Options)
			return nil, fmt.Errorf("netstack: %w: an IPv6 guest needs GuestOptions.Addr", ErrBadAddress)
		}
		b := guest.As4()
		b[3] = 2
		if b == guest.As4() {
			b[3] = 3
		}
		host = netip.PrefixFrom(netip.AddrFrom4(b), 24)
	}
	var d net.Dialer
	link, err := d.DialContext(ctx, "unix", a.Path)
	if err != nil {
		releaseOpts(o.Options)
		return nil, fmt.Errorf("netstack: guest link %s: %w", a.Path, err)
	}
	st, err := New(NewStreamLink(link, nil), Config{Name: "guest-link", Addrs: []netip.Prefix{host}})
	if err != nil {
		releaseOpts(o.Options)
		return nil, fmt.Errorf("netstack: guest link %s: %w", a.Path, err)
	}
	raw, err := st.DialTCP(ctx, netip.AddrPortFrom(guest, a.Port).String())
	if err != nil {
		st.Close()
		releaseOpts(o.Options)
		return nil, err
	}
	c, err := secure.Client(ctx, raw, o.Identity, ref)
	if err != nil {
		st.Close()
		releaseOpts(o.Options)
		return nil, fmt.Errorf("netstack: guest %s: %w", ref.Redacted(), err)
	}
	return core.NewConn(&stackConn{Conn: c, st: st}, o.Options), nil
}

// stackConn closes the stack it runs on after itself, so that the
// connection's Close leaves no stack goroutine behind.
type stackConn struct {
	net.Conn
	st *Stack
}

func (c *stackConn) Close() error {
	err := c.Conn.Close()
	c.st.Close()
	return err
}
