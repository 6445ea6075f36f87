package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sync"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/adapters/netstack"
	"github.com/captp-go/captp/adapters/secure"
	"github.com/captp-go/captp/adapters/unix"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/sturdyref"
	"github.com/captp-go/captp/internal/testimpl"
)

// demoGroup is the demo's unikernel group: vats on an in-process netstack
// network, each with a TLS identity and a secure.Network (Level 3), plus
// the host vat's Unix socket. Every connection is made by a dialer of the
// group, which puts a wiretap between the TLS (or plain) stream and the
// core.Conn, so the trace reports what really crossed each link.
type demoGroup struct {
	log     *slog.Logger
	network *netstack.Network
	vats    []*demoVat

	mu    sync.Mutex
	links []*demoLink
	// serving are the vats' Serve loops, stopped by close.
	serving []func() error
}

// demoVat is one vat of the group.
type demoVat struct {
	name  string
	obj   *testimpl.Object // its bootstrap object
	live  *testimpl.Live   // counts its objects, to prove the distributed GC
	stack *netstack.Stack
	id    *secure.Identity
	net   *secure.Network
	ref   sturdyref.Ref // the vat's own sturdy ref (no service)

	restorer *sturdyref.Restorer // nil unless the vat serves sturdy refs
	dial     sturdyref.Dialer    // dials with a tap; also the secure.Network's dialer
}

// demoLink is one connection of the group, seen from the vat that dialed it.
type demoLink struct {
	from, to string // vat names: from dialed to
	via      string // transport, for the trace
	tap      *wiretap
	conn     *core.Conn
}

// newDemoGroup starts one vat per name on a new netstack network. The
// vats with a name in sturdy also serve sturdy refs.
func newDemoGroup(log *slog.Logger, names []string, sturdy ...string) (_ *demoGroup, err error) {
	g := &demoGroup{log: log, network: netstack.NewNetwork(&netstack.NetworkOptions{Logger: log})}
	defer func() {
		if err != nil {
			g.close()
		}
	}()
	for _, name := range names {
		if _, err := g.addVat(name, slices.Contains(sturdy, name)); err != nil {
			return nil, err
		}
	}
	return g, nil
}

// addVat starts a vat: a stack on the network, an identity, a listener on
// port 4000 serving its bootstrap object (and its restorer) over TLS.
func (g *demoGroup) addVat(name string, sturdy bool) (*demoVat, error) {
	st, err := g.network.NewStack(netstack.Config{Name: name})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	id, err := secure.Generate()
	if err != nil {
		return nil, fmt.Errorf("%s: identity: %w", name, err)
	}
	v := &demoVat{name: name, live: new(testimpl.Live), stack: st, id: id, net: secure.NewNetwork(id)}
	v.obj = testimpl.New(name, v.live)
	v.dial = g.dialer(v)
	v.net.SetDialer(v.dial)
	lis, err := st.Listen("*:4000")
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	addr, err := st.SturdyAddress(lis)
	if err != nil {
		lis.Close()
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	v.ref = sturdyref.Ref{Fingerprint: id.Fingerprint(), Address: addr}
	opts := &core.Options{
		Vat:             v.net.Vat(),
		BootstrapClient: capnp.Client(v.obj.Client()),
		Logger:          g.log.With("vat", name),
	}
	if sturdy {
		v.restorer = sturdyref.NewRestorer(sturdyref.RestorerOptions{Vat: v.ref, Logger: g.log.With("vat", name)})
		opts.Restorer = v.restorer
	}
	g.mu.Lock()
	g.vats = append(g.vats, v)
	g.mu.Unlock()
	g.serve(name, func(ctx context.Context) error { return netstack.ServeSturdy(ctx, lis, id, opts) })
	return v, nil
}

// serve runs a vat's Serve loop until close.
func (g *demoGroup) serve(name string, run func(ctx context.Context) error) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx) }()
	g.mu.Lock()
	g.serving = append(g.serving, func() error {
		cancel()
		if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
			return fmt.Errorf("%s: serve: %w", name, err)
		}
		return nil
	})
	g.mu.Unlock()
}

// serveUnix serves v's bootstrap object on a Unix socket too (no TLS, no
// Level 3: the entry point for a client such as captp call).
func (g *demoGroup) serveUnix(v *demoVat, addr string) error {
	lis, err := unix.Listen(addr)
	if err != nil {
		return fmt.Errorf("%s: %w", v.name, err)
	}
	opts := &core.Options{BootstrapClient: capnp.Client(v.obj.Client()), Logger: g.log.With("vat", v.name, "via", "unix")}
	g.serve(v.name, func(ctx context.Context) error { return unix.Serve(ctx, lis, opts) })
	return nil
}

// vat returns the vat called name.
func (g *demoGroup) vat(name string) *demoVat {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, v := range g.vats {
		if v.name == name {
			return v
		}
	}
	return nil
}

// nameOf returns the name of the vat with fingerprint fp.
func (g *demoGroup) nameOf(fp sturdyref.Fingerprint) string {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, v := range g.vats {
		if v.id.Fingerprint().Equal(fp) {
			return v.name
		}
	}
	return "?"
}

// dialer returns from's dialer: TCP over its stack, TLS pinned to the
// ref's fingerprint, a tap, and a connection of from's vat.
func (g *demoGroup) dialer(from *demoVat) sturdyref.Dialer {
	return func(ctx context.Context, ref sturdyref.Ref) (*core.Conn, error) {
		if ref.Address.Transport != sturdyref.Netstack {
			return nil, fmt.Errorf("%s: cannot dial %s: not on the demo's network", from.name, ref.Redacted())
		}
		raw, err := from.stack.DialTCP(ctx, ref.Address.HostPort())
		if err != nil {
			return nil, fmt.Errorf("%s: dial %s: %w", from.name, ref.Redacted(), err)
		}
		c, err := secure.Client(ctx, raw, from.id, ref)
		if err != nil {
			return nil, fmt.Errorf("%s: dial %s: %w", from.name, ref.Redacted(), err)
		}
		to := g.nameOf(ref.Fingerprint)
		return g.connect(from.name, to, "netstack+TLS", c, &core.Options{Vat: from.net.Vat()}), nil
	}
}

// connect starts a tapped connection on c and records it as a link.
func (g *demoGroup) connect(from, to, via string, c net.Conn, opts *core.Options) *core.Conn {
	tap := newWiretap(c)
	opts.Logger = g.log.With("vat", from, "peer", to)
	conn := core.NewConn(tap, opts)
	g.mu.Lock()
	g.links = append(g.links, &demoLink{from: from, to: to, via: via, tap: tap, conn: conn})
	g.mu.Unlock()
	return conn
}

// linksSnapshot returns the links so far.
func (g *demoGroup) linksSnapshot() []*demoLink {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.links)
}

// linkOf returns the link of conn.
func (g *demoGroup) linkOf(conn *core.Conn) *demoLink {
	for _, l := range g.linksSnapshot() {
		if l.conn == conn {
			return l
		}
	}
	return nil
}

// closeConns closes every connection of the group and waits for them.
func (g *demoGroup) closeConns() {
	for _, l := range g.linksSnapshot() {
		l.conn.Close()
	}
	for _, l := range g.linksSnapshot() {
		<-l.conn.Done()
	}
}

// close closes the connections, stops the Serve loops, the restorers and
// the network. It returns the first Serve error.
func (g *demoGroup) close() error {
	g.closeConns()
	g.mu.Lock()
	serving, vats := g.serving, g.vats
	g.serving = nil
	g.mu.Unlock()
	var first error
	for _, stop := range serving {
		if err := stop(); err != nil && first == nil {
			first = err
		}
	}
	for _, v := range vats {
		if v.restorer != nil {
			v.restorer.Close()
		}
	}
	g.network.Close()
	return first
}

// waitReleased waits until every vat's objects are gone: the distributed
// GC released everything the vats gave each other.
func (g *demoGroup) waitReleased(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	for _, v := range g.vats {
		if err := v.live.WaitZero(ctx); err != nil {
			return fmt.Errorf("%s still has %d live objects after everything was released and closed", v.name, v.live.Count())
		}
	}
	return nil
}

// groupMark is a position in every link's event log.
type groupMark map[*demoLink]int

func (g *demoGroup) mark() groupMark {
	m := groupMark{}
	for _, l := range g.linksSnapshot() {
		m[l] = l.tap.mark()
	}
	return m
}

// linkEvents are the events of one link since a mark.
type linkEvents struct {
	link   *demoLink
	events []wireEvent
}

// since returns, link by link in creation order, the events since m
// (links made after m from their start).
func (g *demoGroup) since(m groupMark) []linkEvents {
	var out []linkEvents
	for _, l := range g.linksSnapshot() {
		if ev := l.tap.since(m[l]); len(ev) > 0 {
			out = append(out, linkEvents{l, ev})
		}
	}
	return out
}
