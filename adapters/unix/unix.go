// Package unix connects captp vats over Unix domain sockets and TCP.
//
// It is a thin adapter: it turns addresses into byte streams (net.Conn)
// and hands each stream to core.NewConn. All protocol logic lives in the
// core.
//
// Addresses follow Cap'n Proto's C++ EzRpc conventions; see ParseAddr.
//
//	lis, err := unix.Listen("unix:/run/vat.sock")
//	go unix.Serve(ctx, lis, &core.Options{BootstrapClient: capnp.Client(myCap)})
//
//	conn, err := unix.Dial(ctx, "unix:/run/vat.sock", nil)
//	defer conn.Close()
//	boot := conn.Bootstrap(ctx)
package unix

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"syscall"
	"time"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/serve"
)

// Dial connects to addr (see ParseAddr) and starts a Cap'n Proto RPC
// connection over it with opts, which may be nil. ctx bounds only the
// connection attempt, not the life of the returned Conn. As with
// core.NewConn, the Conn takes ownership of opts.BootstrapClient, also
// when Dial fails (it is then released). options tune the socket (see
// WithFrameTimeout).
func Dial(ctx context.Context, addr string, opts *core.Options, options ...Option) (*core.Conn, error) {
	network, address, err := ParseAddr(addr)
	if err != nil {
		releaseBootstrap(opts)
		return nil, fmt.Errorf("unix: dial: %w", err)
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, network, address)
	if err != nil {
		releaseBootstrap(opts)
		return nil, fmt.Errorf("unix: dial %s: %w", addr, err)
	}
	return core.NewConn(newConfig(options).wrap(c), opts), nil
}

// NewConn starts a Cap'n Proto RPC connection over c, a socket made
// elsewhere (a socketpair, an inherited descriptor, a custom dialer), with
// what Dial and Serve add to their sockets: vectored writes, raw system
// calls for small reads and writes on Linux stream sockets, and options.
// Like core.NewConn, the Conn owns c and takes ownership of
// opts.BootstrapClient.
func NewConn(c net.Conn, opts *core.Options, options ...Option) *core.Conn {
	return core.NewConn(newConfig(options).wrap(c), opts)
}

func releaseBootstrap(opts *core.Options) {
	if opts != nil {
		opts.BootstrapClient.Release()
	}
}

// Listen announces on addr (see ParseAddr).
//
// For a unix: path that already exists, Listen removes it and retries only
// if it is a socket that nobody accepts connections on (a dial to it is
// refused): the leftover of a process that died without cleaning up. It
// never removes a live socket or anything that is not a socket. The
// listener removes its socket file when closed.
func Listen(addr string) (net.Listener, error) {
	network, address, err := ParseAddr(addr)
	if err != nil {
		return nil, fmt.Errorf("unix: listen: %w", err)
	}
	lis, err := net.Listen(network, address)
	if err == nil {
		return lis, nil
	}
	if network != "unix" || address[0] == '@' || !errors.Is(err, syscall.EADDRINUSE) {
		return nil, fmt.Errorf("unix: listen %s: %w", addr, err)
	}
	if staleErr := removeStaleSocket(address); staleErr != nil {
		return nil, fmt.Errorf("unix: listen %s: %w", addr, staleErr)
	}
	lis, err = net.Listen(network, address)
	if err != nil {
		return nil, fmt.Errorf("unix: listen %s (after removing a stale socket): %w", addr, err)
	}
	return lis, nil
}

// errInUse reports a socket path that something is listening on.
var errInUse = errors.New("address in use: another process is accepting connections on this socket")

// removeStaleSocket removes path if it is a Unix socket that refuses
// connections.
func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if err != nil {
		return err
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("%s exists and is not a socket (%v); not removing it", path, fi.Mode().Type())
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return errInUse
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		// Unsure (permissions, timeout with a full backlog, ...): leave it.
		return fmt.Errorf("cannot tell whether socket %s is stale: %w", path, err)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("removing stale socket: %w", err)
	}
	return nil
}

// Serve accepts connections on lis and serves each with core.NewConn until
// ctx ends or accepting fails permanently.
//
// Every connection gets its own copy of *opts (nil means the zero Options)
// whose BootstrapClient is a new reference (AddRef) to opts.BootstrapClient,
// so each peer's Bootstrap returns the same capability. Serve owns
// opts.BootstrapClient: it releases its reference when it returns, and each
// connection releases its own when it closes.
//
// When ctx ends Serve closes lis, closes every live connection (each
// sends an Abort to its peer), waits until each is done, and returns
// ctx.Err() — never nil. A permanent accept error (including lis being
// closed by someone else) also closes every connection and is returned
// wrapped; temporary accept errors (such as running out of file
// descriptors) are logged and retried with backoff up to one second.
//
// Serve logs to opts.Logger, or discards logs if it is nil. options tune
// every accepted socket (see WithFrameTimeout).
func Serve(ctx context.Context, lis net.Listener, opts *core.Options, options ...Option) error {
	cfg := newConfig(options)
	return serve.Serve(ctx, lis, opts, serve.Config{
		Name:       "unix",
		FormatAddr: func(a net.Addr) string { return a.String() },
		Wrap:       func(c net.Conn) io.ReadWriteCloser { return cfg.wrap(c) },
		Temporary:  isTemporary,
	})
}

// isTemporary reports whether an accept error is worth retrying: running
// out of file descriptors or memory, a connection aborted before it was
// accepted, an interrupted system call.
func isTemporary(err error) bool {
	if errors.Is(err, net.ErrClosed) {
		return false
	}
	for _, e := range []error{
		syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM,
		syscall.ECONNABORTED, syscall.ECONNRESET, syscall.EINTR, syscall.EAGAIN,
		syscall.EPROTO, syscall.EPERM,
	} {
		if errors.Is(err, e) {
			return true
		}
	}
	var t interface{ Temporary() bool }
	return errors.As(err, &t) && t.Temporary()
}
