package unix

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/adapters/secure"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/sturdyref"
)

// DialSturdy connects to the vat that ref names (a capnp:// ref: TCP or a
// Unix socket), runs the TLS 1.3 handshake as id pinning ref's
// fingerprint (or none for an insecure ref), and starts a connection on
// it. A server with another key is refused during the handshake, before
// any RPC byte is sent, with a *secure.FingerprintError. id may be nil: a
// throwaway identity is used. The Conn owns opts.BootstrapClient, also on
// error. Call Restore(ctx, ref.ServiceID) on the Conn for the capability,
// or use RestoreSturdy.
func DialSturdy(ctx context.Context, ref sturdyref.Ref, id *secure.Identity, opts *core.Options, options ...Option) (*core.Conn, error) {
	network, address, err := sturdyNetwork(ref)
	if err != nil {
		releaseBootstrap(opts)
		return nil, err
	}
	var d net.Dialer
	raw, err := d.DialContext(ctx, network, address)
	if err != nil {
		releaseBootstrap(opts)
		return nil, fmt.Errorf("unix: dial %s: %w", ref.Redacted(), err)
	}
	c, err := secure.Client(ctx, raw, id, ref)
	if err != nil {
		releaseBootstrap(opts)
		return nil, fmt.Errorf("unix: dial %s: %w", ref.Redacted(), err)
	}
	return core.NewConn(newConfig(options).wrap(c), opts), nil
}

func sturdyNetwork(ref sturdyref.Ref) (network, address string, err error) {
	a := ref.Address
	switch {
	case a.Transport != sturdyref.TCP:
		return "", "", fmt.Errorf("unix: %w: %s refs are not dialled over the host network", ErrBadAddress, a.Transport)
	case a.Path != "":
		return "unix", a.Path, nil
	default:
		return "tcp", a.HostPort(), nil
	}
}

// RestoreSturdy dials ref's vat and restores its service: the connection
// and the capability (a promise; a revoked or unknown service shows as the
// error of calls on it). Release the capability, then close the Conn.
func RestoreSturdy(ctx context.Context, ref sturdyref.Ref, id *secure.Identity, options ...Option) (*core.Conn, capnp.Client, error) {
	conn, err := DialSturdy(ctx, ref, id, nil, options...)
	if err != nil {
		return nil, capnp.Client{}, err
	}
	return conn, conn.Restore(ctx, ref.ServiceID), nil
}

// SturdyDialer returns a sturdyref.Dialer (for sturdyref.Reconnecting)
// that dials with DialSturdy. Each connection gets a copy of opts with
// its own reference to opts.BootstrapClient, which stays the caller's.
func SturdyDialer(id *secure.Identity, opts *core.Options, options ...Option) sturdyref.Dialer {
	return func(ctx context.Context, ref sturdyref.Ref) (*core.Conn, error) {
		var o *core.Options
		if opts != nil {
			c := *opts
			c.BootstrapClient = opts.BootstrapClient.AddRef()
			o = &c
		}
		return DialSturdy(ctx, ref, id, o, options...)
	}
}

// ServeSturdy is Serve for a vat with an identity: each accepted
// connection runs the TLS 1.3 handshake as id before any RPC byte is
// read (id nil: plain connections, the insecure mode for tests). Set
// opts.Restorer to serve sturdy refs.
func ServeSturdy(ctx context.Context, lis net.Listener, id *secure.Identity, opts *core.Options, options ...Option) error {
	return Serve(ctx, secure.NewListener(lis, id), opts, options...)
}

// SturdyAddress returns the sturdy ref address of a listener from Listen
// (TCP or a Unix socket path). A listener on every address ("*:port",
// 0.0.0.0, ::) has no single address to put in a ref: pass the host name
// clients should use in host.
func SturdyAddress(lis net.Listener, host string) (sturdyref.Address, error) {
	switch a := lis.Addr().(type) {
	case *net.UnixAddr:
		if a.Name == "" || a.Name[0] != '/' {
			return sturdyref.Address{}, fmt.Errorf("unix: %w: sturdy refs need an absolute socket path, not %q", ErrBadAddress, a.Name)
		}
		return sturdyref.Address{Transport: sturdyref.TCP, Path: a.Name}, nil
	case *net.TCPAddr:
		h := host
		if h == "" {
			if a.IP.IsUnspecified() {
				return sturdyref.Address{}, errors.New("unix: the listener is on every address: give the host name clients should dial")
			}
			h = a.IP.String()
		}
		return sturdyref.Address{Transport: sturdyref.TCP, Host: h, Port: uint16(a.Port)}, nil
	default:
		return sturdyref.Address{}, fmt.Errorf("unix: %w: no sturdy ref form for %s address %s", ErrBadAddress, lis.Addr().Network(), strconv.Quote(lis.Addr().String()))
	}
}
