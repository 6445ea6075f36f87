package conformance

import (
	"context"
	"fmt"
	"net"
	"os"
	"runtime/debug"
	"syscall"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/rpc"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
	"github.com/captp-go/captp/internal/testnative"
)

// Timeouts. A hang fails the test after these instead of stalling CI.
const (
	scenarioTimeout = 10 * time.Second // whole scenario, teardown included
	waitTimeout     = 5 * time.Second  // one awaited event
)

// kind names an RPC implementation.
type kind string

const (
	ours    kind = "ours"
	gocapnp kind = "gocapnp"
)

// endpoint is what the suite needs of a connection; both *core.Conn and
// *rpc.Conn have it.
type endpoint interface {
	Bootstrap(context.Context) capnp.Client
	Close() error
	Done() <-chan struct{}
}

// statser is implemented by our Conn.
type statser interface{ Stats() core.Stats }

// pairing is one combination of client and server implementations;
// native says the server (ours) serves native objects (capnpc-captp's
// stubs on core.Handler) instead of capnpc-go's generated servers.
type pairing struct {
	client, server kind
	native         bool
}

func (p pairing) String() string {
	if p.native {
		return fmt.Sprintf("%s-client_%s-native-server", p.client, p.server)
	}
	return fmt.Sprintf("%s-client_%s-server", p.client, p.server)
}

var pairings = []pairing{
	{client: gocapnp, server: gocapnp}, // baseline: go-capnp against itself
	{client: ours, server: ours},
	{client: ours, server: gocapnp},
	{client: gocapnp, server: ours},
	{client: ours, server: ours, native: true},
	{client: gocapnp, server: ours, native: true},
}

// socketPair returns the two ends of a connected Unix stream socket.
func socketPair(t testing.TB) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("socketpair: %v", err)
	}
	conns := make([]net.Conn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), fmt.Sprintf("socketpair-%d", i))
		c, err := net.FileConn(f) // dups fd
		f.Close()
		if err != nil {
			t.Fatalf("FileConn: %v", err)
		}
		conns[i] = c
	}
	return conns[0], conns[1]
}

// newEndpoint starts a connection of kind k over c offering boot.
// While core.NewConn is still a stub it skips the test, loudly.
func newEndpoint(t testing.TB, k kind, c net.Conn, boot capnp.Client) (ep endpoint) {
	t.Helper()
	switch k {
	case ours:
		func() {
			defer func() {
				if v := recover(); v != nil {
					c.Close()
					boot.Release()
					if v == "not implemented yet" {
						t.Skip("SKIP: core.NewConn is still a stub (panics \"not implemented yet\")")
					}
					t.Fatalf("core.NewConn panicked: %v\n%s", v, debug.Stack())
				}
			}()
			ep = core.NewConn(c, &core.Options{BootstrapClient: boot})
		}()
	case gocapnp:
		ep = rpc.NewConn(rpc.NewStreamTransport(c), &rpc.Options{BootstrapClient: boot})
	default:
		t.Fatalf("unknown kind %q", k)
	}
	return ep
}

// env is one connected client/server pair serving a fresh root object.
type env struct {
	p      pairing
	ctx    context.Context // ends after scenarioTimeout
	client endpoint
	server endpoint
	// The server's end of the socket, for scenarios that cut it.
	serverSock net.Conn
	boot       testcapnp.Test // the client's bootstrap reference; teardown releases it

	root       blockWatcher   // the server's bootstrap object
	serverLive liveCounter    // objects on the server side
	clientLive *testimpl.Live // objects the client creates locally

	// serverClosed is set by scenarios that close the server themselves;
	// teardown then skips the checks that need a live connection.
	serverClosed bool
}

// newEnv connects a client and a server of pairing p over a socket pair.
// Teardown (registered first, so it runs after every cleanup a scenario
// registers) releases the bootstrap, checks that both sides return to
// their baseline, closes both ends and waits for them to finish.
func newEnv(t *testing.T, p pairing) *env {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), scenarioTimeout)
	e := &env{
		p:          p,
		ctx:        ctx,
		clientLive: new(testimpl.Live),
	}
	var rootCap capnp.Client
	if p.native {
		live := new(testnative.Live)
		var root *testnative.Object
		rootCap, root = testnative.New("root", &live.N)
		e.root, e.serverLive = root, live
	} else {
		live := new(testimpl.Live)
		root := testimpl.NewGuarded("root", live)
		rootCap = capnp.Client(root.Client())
		e.root, e.serverLive = root, live
	}
	// A scenario stuck outside an await (e.g. inside a call's Send) would
	// otherwise hang until go test's global timeout; crash early with
	// every goroutine's stack instead.
	watchdog := time.AfterFunc(3*scenarioTimeout, func() {
		debug.SetTraceback("all")
		panic(fmt.Sprintf("conformance: %s (%v) still running after %v: hung", t.Name(), p, 3*scenarioTimeout))
	})
	cc, sc := socketPair(t)
	e.serverSock = sc
	e.server = newEndpoint(t, p.server, sc, rootCap)
	t.Cleanup(func() {
		defer watchdog.Stop()
		defer cancel()
		e.teardown(t)
	})
	if *traceFlag {
		cc = trace(t, cc)
	}
	e.client = newEndpoint(t, p.client, cc, capnp.Client{})
	e.boot = testcapnp.Test(e.client.Bootstrap(ctx))
	return e
}

func (e *env) teardown(t *testing.T) {
	e.boot.Release()
	if !e.serverClosed && !t.Failed() {
		// Everything but the server's own bootstrap reference is gone.
		e.waitLive(t, "server", e.serverLive, 1)
		e.waitLive(t, "client", e.clientLive, 0)
		e.checkStatsZero(t)
	}
	e.client.Close()
	e.waitDone(t, "client", e.client)
	e.server.Close()
	e.waitDone(t, "server", e.server)
	e.waitLive(t, "server (after close)", e.serverLive, 0)
	e.waitLive(t, "client (after close)", e.clientLive, 0)
}

func (e *env) waitDone(t *testing.T, who string, ep endpoint) {
	t.Helper()
	select {
	case <-ep.Done():
	case <-time.After(waitTimeout):
		t.Errorf("%s conn (%s): Done not closed %v after Close", who, e.kind(who), waitTimeout)
	}
}

func (e *env) kind(who string) kind {
	if who == "client" {
		return e.p.client
	}
	return e.p.server
}

// blockWatcher tells when an object's block() calls start and see their
// cancellation (testimpl's and testnative's objects).
type blockWatcher interface {
	BlockStarted() <-chan struct{}
	BlockCancelled() <-chan struct{}
}

// liveCounter counts live Test objects (testimpl.Live, testnative.Live).
type liveCounter interface {
	Count() int64
	Wait(ctx context.Context, n int64) error
}

func (e *env) waitLive(t *testing.T, who string, l liveCounter, n int64) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if err := l.Wait(ctx, n); err != nil {
		t.Errorf("%s side: %d live Test objects after %v, want %d (capabilities not released)", who, l.Count(), waitTimeout, n)
	}
}

// checkStatsZero waits until every table of each of our Conns in the pair
// is empty. Releases travel asynchronously, so this retries with backoff
// until a deadline.
func (e *env) checkStatsZero(t *testing.T) {
	t.Helper()
	for _, side := range []struct {
		who string
		ep  endpoint
	}{{"client", e.client}, {"server", e.server}} {
		s, ok := side.ep.(statser)
		if !ok {
			continue
		}
		if st, ok := waitStatsZero(s, waitTimeout); !ok {
			t.Errorf("%s conn (ours): tables not empty %v after everything was released: %+v", side.who, waitTimeout, st)
		}
	}
}

// waitStatsZero polls s.Stats with backoff until all zero or timeout.
// Test-only: the Conn offers no change notification for its tables.
func waitStatsZero(s statser, timeout time.Duration) (core.Stats, bool) {
	return waitStats(s, core.Stats{}, timeout)
}

// waitStats polls s.Stats with backoff until it is want or timeout.
func waitStats(s statser, want core.Stats, timeout time.Duration) (core.Stats, bool) {
	deadline := time.Now().Add(timeout)
	d := time.Millisecond
	for {
		st := s.Stats()
		if st == want {
			return st, true
		}
		if time.Now().After(deadline) {
			return st, false
		}
		time.Sleep(d)
		if d < 50*time.Millisecond {
			d *= 2
		}
	}
}

// local returns a new object hosted by the client, counted in clientLive.
// Its reference is released at cleanup.
func (e *env) local(t *testing.T, name string) (*testimpl.Object, testcapnp.Test) {
	o := testimpl.NewGuarded(name, e.clientLive)
	c := o.Client()
	t.Cleanup(c.Release)
	return o, c
}

// await waits for f to settle, failing the test instead of hanging.
func await(t *testing.T, what string, f *capnp.Future) (capnp.Struct, error) {
	t.Helper()
	select {
	case <-f.Done():
	case <-time.After(waitTimeout):
		t.Fatalf("%s: no answer after %v", what, waitTimeout)
	}
	return f.Struct()
}

// mustAwait is await that fails the test on error.
func mustAwait(t *testing.T, what string, f *capnp.Future) capnp.Struct {
	t.Helper()
	s, err := await(t, what, f)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	return s
}
