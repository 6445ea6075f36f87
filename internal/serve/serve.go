// Package serve is the accept loop the adapters share: it serves every
// connection a net.Listener accepts with core.NewConn, and on the way out
// closes them all and waits for them.
package serve

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/captp-go/captp/core"
)

// Config is what differs between adapters.
type Config struct {
	// Name prefixes returned errors ("unix", "netstack").
	Name string
	// FormatAddr renders addresses for logs and errors.
	FormatAddr func(net.Addr) string
	// Wrap, if set, turns an accepted connection into the stream the core
	// gets (timeouts, for example).
	Wrap func(net.Conn) io.ReadWriteCloser
	// Temporary, if set, reports accept errors worth retrying (with
	// backoff up to a second).
	Temporary func(error) bool
}

// acceptHookKey is the context key of WithAcceptHook.
type acceptHookKey struct{}

// WithAcceptHook returns a context under which Serve calls hook with each
// connection it starts and its peer's address (as the adapter formats it),
// as soon as it has started it and before it reads the peer's first
// message (so a registry the hook fills is never behind the peer's calls).
// A command uses it to track the connections of a vat (captp serve
// -inspect) through any adapter's Serve, whose signatures stay as they
// are. hook must not block: the connection waits for it.
func WithAcceptHook(ctx context.Context, hook func(conn *core.Conn, peer string)) context.Context {
	return context.WithValue(ctx, acceptHookKey{}, hook)
}

// Serve accepts connections on lis and serves each with core.NewConn until
// ctx ends or accepting fails permanently. See adapters/unix.Serve for the
// contract: each connection gets a copy of *opts with its own reference
// to opts.BootstrapClient, which Serve owns; on return every connection has
// been closed and is done; the error is ctx.Err() or the accept failure.
func Serve(ctx context.Context, lis net.Listener, opts *core.Options, cfg Config) error {
	var base core.Options
	if opts != nil {
		base = *opts
	}
	bootstrap := base.BootstrapClient
	defer bootstrap.Release()
	log := base.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("listener", cfg.FormatAddr(lis.Addr()))

	// Closing lis is how ctx interrupts a blocked Accept.
	stopClosing := context.AfterFunc(ctx, func() { lis.Close() })
	defer stopClosing()

	var (
		wg       sync.WaitGroup
		shutdown = make(chan struct{}) // closed when Serve starts closing connections
	)
	defer func() {
		close(shutdown)
		wg.Wait()
	}()

	onAccept, _ := ctx.Value(acceptHookKey{}).(func(*core.Conn, string))

	var delay time.Duration // backoff after temporary accept errors
	for {
		c, err := lis.Accept()
		if err != nil {
			if ctx.Err() != nil {
				log.Debug("serve: context ended; closing connections", "reason", context.Cause(ctx))
				lis.Close()
				return ctx.Err()
			}
			if cfg.Temporary != nil && cfg.Temporary(err) {
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				log.Warn("serve: temporary accept error; retrying", "err", err, "delay", delay)
				t := time.NewTimer(delay)
				select {
				case <-t.C:
					continue
				case <-ctx.Done():
					t.Stop()
					lis.Close()
					return ctx.Err()
				}
			}
			lis.Close()
			log.Error("serve: accept failed; closing connections", "err", err)
			return fmt.Errorf("%s: serve: accept on %s: %w", cfg.Name, cfg.FormatAddr(lis.Addr()), err)
		}
		delay = 0

		o := base
		o.BootstrapClient = bootstrap.AddRef()
		var rwc io.ReadWriteCloser = c
		if cfg.Wrap != nil {
			rwc = cfg.Wrap(c)
		}
		var g *gate
		if onAccept != nil {
			g, rwc = newGate(rwc)
		}
		conn := core.NewConn(rwc, &o)
		peer := cfg.FormatAddr(c.RemoteAddr())
		log.Debug("serve: connection accepted", "peer", peer)
		if onAccept != nil {
			onAccept(conn, peer)
			close(g.open)
		}
		wg.Go(func() {
			select {
			case <-conn.Done():
			case <-shutdown:
				if err := conn.Close(); err != nil {
					log.Debug("serve: closing connection", "peer", peer, "err", err)
				}
				<-conn.Done()
			}
			log.Debug("serve: connection ended", "peer", peer, "err", conn.Err())
		})
	}
}

// gate holds a connection's reads until the accept hook has seen its
// core.Conn.
type gate struct {
	io.ReadWriteCloser
	open chan struct{}
}

func (g *gate) Read(p []byte) (int, error) {
	<-g.open
	return g.ReadWriteCloser.Read(p)
}

// CloseWrite keeps the optional half-close the core uses; the core
// ignores its error, so a stream without one loses nothing.
func (g *gate) CloseWrite() error {
	if cw, ok := g.ReadWriteCloser.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.New("serve: the stream has no half-close")
}

// NetConn keeps the connection findable under the gate: adapters/secure
// looks for the TLS connection (and so the peer's identity) through
// NetConn.
func (g *gate) NetConn() net.Conn {
	if c, ok := g.ReadWriteCloser.(net.Conn); ok {
		return c
	}
	if n, ok := g.ReadWriteCloser.(interface{ NetConn() net.Conn }); ok {
		return n.NetConn()
	}
	return nil
}

// gateBuffers is a gate on a stream that has core.BuffersWriter, which
// it keeps.
type gateBuffers struct{ *gate }

func (g gateBuffers) WriteBuffers(bufs [][]byte) (int64, error) {
	return g.ReadWriteCloser.(core.BuffersWriter).WriteBuffers(bufs)
}

// newGate returns a closed gate on rwc and the stream to serve.
func newGate(rwc io.ReadWriteCloser) (*gate, io.ReadWriteCloser) {
	g := &gate{ReadWriteCloser: rwc, open: make(chan struct{})}
	if _, ok := rwc.(core.BuffersWriter); ok {
		return g, gateBuffers{g}
	}
	return g, g
}
