package bench

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"time"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/rpc"

	"github.com/captp-go/captp/adapters/unix"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
	"github.com/captp-go/captp/internal/testnative"
)

// session is one connected client and server of one implementation on
// one transport, measured by running workloads through it.
type session interface {
	// lat makes n sequential echo calls with size payload bytes.
	lat(ctx context.Context, n, size int) (result, error)
	// flight makes n echo calls of size bytes with k in flight.
	flight(ctx context.Context, n, k, size int) (result, error)
	// pipe2 makes n sequential two-hop calls: child("x") and echo on
	// the promised child, pipelined; errNotApplicable without RPC.
	pipe2(ctx context.Context, n int) (result, error)
	close() error
}

// result is what one workload run measured.
type result struct {
	calls       int
	elapsed     time.Duration
	median, p99 time.Duration // per call, for sequential workloads
	// client is what the client side used; server what the server side
	// used when it runs in its own process (split). Without split, client
	// holds both sides.
	client, server usage
	split          bool
}

func (r result) total() usage { return r.client.add(r.server) }

// usage is resources used over a run.
type usage struct {
	mallocs uint64 // heap allocations
	bytes   uint64 // bytes allocated
	cpu     time.Duration
}

func (u usage) add(v usage) usage {
	return usage{u.mallocs + v.mallocs, u.bytes + v.bytes, u.cpu + v.cpu}
}

func (u usage) sub(v usage) usage {
	return usage{u.mallocs - v.mallocs, u.bytes - v.bytes, u.cpu - v.cpu}
}

// perCallUsage is usage divided by calls.
type perCallUsage struct{ mallocs, bytes, cpuMicros float64 }

func (u usage) perCall(n int) perCallUsage {
	if n <= 0 {
		return perCallUsage{}
	}
	f := float64(n)
	return perCallUsage{float64(u.mallocs) / f, float64(u.bytes) / f, us(u.cpu) / f}
}

// selfUsage reads this process's allocation counters and CPU time.
func selfUsage() usage {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return usage{mallocs: ms.Mallocs, bytes: ms.TotalAlloc, cpu: processCPU()}
}

// meter measures a run of a Go client: this process, plus the server
// child when there is one.
type meter struct {
	server *child // nil: the server runs in this process
}

type mark struct{ self, server usage }

func (m meter) start() (mark, error) {
	var k mark
	if m.server != nil {
		u, err := m.server.usage()
		if err != nil {
			return k, err
		}
		k.server = u
	}
	k.self = selfUsage()
	return k, nil
}

func (m meter) stop(k mark, r *result) error {
	r.client = selfUsage().sub(k.self)
	if m.server != nil {
		u, err := m.server.usage()
		if err != nil {
			return err
		}
		r.server, r.split = u.sub(k.server), true
	}
	return nil
}

// timedCalls runs one n times between the meter's marks, timing each run,
// and summarizes the samples into the result.
func (m meter) timedCalls(n int, one func() error) (result, error) {
	samples := make([]time.Duration, n)
	r := result{calls: n}
	k, err := m.start()
	if err != nil {
		return r, err
	}
	start := time.Now()
	for i := range n {
		t := time.Now()
		if err := one(); err != nil {
			return r, err
		}
		samples[i] = time.Since(t)
	}
	r.elapsed = time.Since(start)
	if err := m.stop(k, &r); err != nil {
		return r, err
	}
	summarize(&r, samples)
	return r, nil
}

// summarize sets r's median and p99 from samples (sorted in place).
func summarize(r *result, samples []time.Duration) {
	if len(samples) == 0 {
		return
	}
	slices.Sort(samples)
	r.median = samples[len(samples)/2]
	r.p99 = samples[min(len(samples)-1, len(samples)*99/100)]
}

// openSession connects a client and a server of im over tr.
func openSession(ctx context.Context, cfg *Config, cpp *cppProgram, im Impl, tr Transport) (session, error) {
	if im == Cpp {
		return openCppSession(ctx, cpp, tr)
	}
	var (
		cli     net.Conn
		m       meter
		cleanup func()
	)
	switch tr {
	case Pipe, Unix, TCP, Netstack:
		c, s, clean, err := connPair(ctx, tr)
		if err != nil {
			return nil, err
		}
		stop := serveGo(im, s)
		cli, cleanup = c, func() { c.Close(); stop(); clean() }
	case Unix2P:
		ch, sock, err := startGoServer(ctx, cfg, im)
		if err != nil {
			return nil, err
		}
		c, err := net.Dial("unix", sock)
		if err != nil {
			ch.stop()
			return nil, err
		}
		cli, m, cleanup = c, meter{server: ch}, func() { c.Close(); ch.stop() }
	default:
		return nil, fmt.Errorf("unknown transport %q", tr)
	}
	if im == Raw {
		return newRawSession(cli, m, cleanup), nil
	}
	if im == CaptpNative {
		conn := newCaptpConn(cli, nil)
		boot := testnative.Test{Client: conn.Bootstrap(ctx)}
		return &nativeSession{boot: boot, m: m, cleanup: func() { boot.Release(); conn.Close(); cleanup() }}, nil
	}
	boot, closeConn := dialGo(ctx, im, cli)
	return &rpcSession{boot: boot, m: m, cleanup: func() { boot.Release(); closeConn(); cleanup() }}, nil
}

// connPair returns both ends of an in-process connection, and a cleanup
// to call once both are closed.
func connPair(ctx context.Context, tr Transport) (client, server net.Conn, cleanup func(), err error) {
	switch tr {
	case Pipe:
		c, s := net.Pipe()
		return c, s, func() {}, nil
	case TCP, Netstack:
		return netPair(tr)(ctx)
	case Unix:
	default:
		return nil, nil, nil, fmt.Errorf("no in-process connection pair for transport %q", tr)
	}
	dir, err := os.MkdirTemp("", "captp-bench-")
	if err != nil {
		return nil, nil, nil, err
	}
	lis, err := net.Listen("unix", filepath.Join(dir, "s.sock"))
	if err != nil {
		os.RemoveAll(dir)
		return nil, nil, nil, err
	}
	defer lis.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := lis.Accept()
		accepted <- c
	}()
	client, err = net.Dial("unix", lis.Addr().String())
	if err != nil {
		lis.Close()
		<-accepted
		os.RemoveAll(dir)
		return nil, nil, nil, err
	}
	server = <-accepted
	if server == nil {
		client.Close()
		os.RemoveAll(dir)
		return nil, nil, nil, fmt.Errorf("accept failed")
	}
	return client, server, func() { os.RemoveAll(dir) }, nil
}

// serveGo serves im's bench server on c until stop.
func serveGo(im Impl, c net.Conn) (stop func()) {
	switch im {
	case Raw:
		done := make(chan struct{})
		go func() { defer close(done); serveRaw(c) }()
		return func() { c.Close(); <-done }
	case Captp:
		conn := newCaptpConn(c, &core.Options{BootstrapClient: benchObject()})
		return func() { conn.Close() }
	case GoCapnp:
		conn := rpc.NewConn(rpc.NewStreamTransport(c), &rpc.Options{BootstrapClient: benchObject()})
		return func() { conn.Close() }
	case CaptpNative:
		obj, _ := testnative.New("server", nil)
		conn := newCaptpConn(c, &core.Options{BootstrapClient: obj})
		return func() { conn.Close() }
	}
	panic("serveGo: unknown implementation " + string(im))
}

// newCaptpConn starts captp on c the way a user would: a kernel socket
// through adapters/unix (which adds vectored writes), anything else (an
// in-memory pipe, a netstack connection) with core.NewConn.
func newCaptpConn(c io.ReadWriteCloser, opts *core.Options) *core.Conn {
	switch sock := c.(type) {
	case *net.UnixConn:
		return unix.NewConn(sock, opts)
	case *net.TCPConn:
		return unix.NewConn(sock, opts)
	}
	return core.NewConn(c, opts)
}

// benchObject is the capability the Go servers offer.
func benchObject() capnp.Client { return capnp.Client(testimpl.New("server", nil).Client()) }

// dialGo starts a client of im on c and returns its bootstrap capability.
func dialGo(ctx context.Context, im Impl, c io.ReadWriteCloser) (testcapnp.Test, func()) {
	switch im {
	case Captp:
		conn := newCaptpConn(c, nil)
		return testcapnp.Test(conn.Bootstrap(ctx)), func() { conn.Close() }
	case GoCapnp:
		conn := rpc.NewConn(rpc.NewStreamTransport(c), nil)
		return testcapnp.Test(conn.Bootstrap(ctx)), func() { conn.Close() }
	}
	panic("dialGo: unknown implementation " + string(im))
}

// rpcSession drives a Go RPC client (captp or go-capnp).
type rpcSession struct {
	boot    testcapnp.Test
	m       meter
	cleanup func()
}

func (s *rpcSession) close() error { s.cleanup(); return nil }

func payload(size int) []byte {
	b := make([]byte, size)
	for i := range b {
		b[i] = 'x'
	}
	return b
}

func checkEcho(f testcapnp.Test_echo_Results_Future, size int) error {
	res, err := f.Struct()
	if err != nil {
		return err
	}
	d, err := res.Data()
	if err != nil {
		return err
	}
	if len(d) != size {
		return fmt.Errorf("echo returned %d bytes; want %d", len(d), size)
	}
	return nil
}

func (s *rpcSession) lat(ctx context.Context, n, size int) (result, error) {
	data := payload(size)
	set := func(p testcapnp.Test_echo_Params) error { return p.SetData(data) }
	return s.m.timedCalls(n, func() error {
		f, release := s.boot.Echo(ctx, set)
		defer release()
		return checkEcho(f, size)
	})
}

func (s *rpcSession) flight(ctx context.Context, n, k, size int) (result, error) {
	data := payload(size)
	set := func(p testcapnp.Test_echo_Params) error { return p.SetData(data) }
	type pending struct {
		f       testcapnp.Test_echo_Results_Future
		release capnp.ReleaseFunc
	}
	ring := make([]pending, k)
	r := result{calls: n}
	mk, err := s.m.start()
	if err != nil {
		return r, err
	}
	start := time.Now()
	issued := 0
	for ; issued < n && issued < k; issued++ {
		f, rel := s.boot.Echo(ctx, set)
		ring[issued] = pending{f, rel}
	}
	var firstErr error
	for done := range n {
		p := &ring[done%k]
		if err := checkEcho(p.f, size); err != nil && firstErr == nil {
			firstErr = err
		}
		p.release()
		if issued < n {
			f, rel := s.boot.Echo(ctx, set)
			*p = pending{f, rel}
			issued++
		}
	}
	r.elapsed = time.Since(start)
	if firstErr != nil {
		return r, firstErr
	}
	return r, s.m.stop(mk, &r)
}

func (s *rpcSession) pipe2(ctx context.Context, n int) (result, error) {
	data := payload(16)
	set := func(p testcapnp.Test_echo_Params) error { return p.SetData(data) }
	setName := func(p testcapnp.Test_child_Params) error { return p.SetName("x") }
	return s.m.timedCalls(n, func() error {
		child, releaseChild := s.boot.Child(ctx, setName)
		defer releaseChild()
		f, release := child.Child().Echo(ctx, set)
		defer release()
		return checkEcho(f, 16)
	})
}
