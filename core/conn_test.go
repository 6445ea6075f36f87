package core_test

import (
	"context"
	"errors"
	"io"
	"sync"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/exc"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// pipeEnd is one end of an in-memory full-duplex stream.
type pipeEnd struct {
	*io.PipeReader
	*io.PipeWriter
	once sync.Once
}

func (p *pipeEnd) Close() error {
	p.once.Do(func() {
		p.PipeReader.Close()
		p.PipeWriter.Close()
	})
	return nil
}

func pipePair() (*pipeEnd, *pipeEnd) {
	ar, bw := io.Pipe()
	br, aw := io.Pipe()
	return &pipeEnd{PipeReader: ar, PipeWriter: aw}, &pipeEnd{PipeReader: br, PipeWriter: bw}
}

type vats struct {
	client, server *core.Conn
	root           *testimpl.Object
	live           *testimpl.Live
}

func newVats(t *testing.T) *vats {
	t.Helper()
	a, b := pipePair()
	live := new(testimpl.Live)
	root := testimpl.New("root", live)
	v := &vats{
		server: core.NewConn(b, &core.Options{BootstrapClient: capnp.Client(root.Client())}),
		client: core.NewConn(a, nil),
		root:   root,
		live:   live,
	}
	t.Cleanup(func() {
		v.client.Close()
		v.server.Close()
	})
	return v
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestEcho(t *testing.T) {
	v := newVats(t)
	ctx := testCtx(t)
	boot := testcapnp.Test(v.client.Bootstrap(ctx))
	defer boot.Release()
	f, rel := boot.Echo(ctx, func(p testcapnp.Test_echo_Params) error { return p.SetData([]byte("hello")) })
	defer rel()
	res, err := f.Struct()
	if err != nil {
		t.Fatal(err)
	}
	data, _ := res.Data()
	if string(data) != "hello" {
		t.Fatalf("echo = %q", data)
	}
}

func TestPipelineChainAndRelease(t *testing.T) {
	v := newVats(t)
	ctx := testCtx(t)
	boot := testcapnp.Test(v.client.Bootstrap(ctx))
	c1, r1 := boot.Child(ctx, func(p testcapnp.Test_child_Params) error { return p.SetName("a") })
	c2, r2 := c1.Child().Child(ctx, func(p testcapnp.Test_child_Params) error { return p.SetName("b") })
	c3, r3 := c2.Child().Child(ctx, func(p testcapnp.Test_child_Params) error { return p.SetName("c") })
	n, r4 := c3.Child().Name(ctx, nil)
	res, err := n.Struct()
	if err != nil {
		t.Fatal(err)
	}
	name, _ := res.Name()
	if name != "c" {
		t.Fatalf("name = %q", name)
	}
	r4()
	r3()
	r2()
	r1()
	boot.Release()
	waitStats(t, ctx, v.client)
	waitStats(t, ctx, v.server)
	// Only the root, which the server holds as its bootstrap, is left
	// (servers shut down asynchronously, once their queues drain).
	if err := v.live.Wait(ctx, 1); err != nil {
		t.Fatalf("live objects = %d, want 1", v.live.Count())
	}
}

func waitStats(t *testing.T, ctx context.Context, c *core.Conn) {
	t.Helper()
	for {
		s := c.Stats()
		if s.IsZero() {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("tables not empty: %v", s)
		case <-time.After(5 * time.Millisecond):
		}
	}
}

func TestExceptions(t *testing.T) {
	v := newVats(t)
	ctx := testCtx(t)
	boot := testcapnp.Test(v.client.Bootstrap(ctx))
	defer boot.Release()
	for kind, want := range map[testcapnp.ExceptionKind]exc.Type{
		testcapnp.ExceptionKind_failed:        exc.Failed,
		testcapnp.ExceptionKind_overloaded:    exc.Overloaded,
		testcapnp.ExceptionKind_disconnected:  exc.Disconnected,
		testcapnp.ExceptionKind_unimplemented: exc.Unimplemented,
	} {
		f, rel := boot.Fail(ctx, func(p testcapnp.Test_fail_Params) error {
			p.SetKind(kind)
			return p.SetReason("boom " + kind.String())
		})
		_, err := f.Struct()
		rel()
		var e *exc.Exception
		if !errors.As(err, &e) || e.Type != want {
			t.Fatalf("%v: err = %v", kind, err)
		}
	}
}

func seq(ctx context.Context, c testcapnp.Test, n uint32) (testcapnp.Test_seq_Results_Future, capnp.ReleaseFunc) {
	return c.Seq(ctx, func(p testcapnp.Test_seq_Params) error { p.SetN(n); return nil })
}

// A promise the server resolves back to the caller's own object: calls made
// through the promise before and after the resolution arrive in order.
func TestEmbargoPromiseResolvesToCaller(t *testing.T) {
	v := newVats(t)
	ctx := testCtx(t)
	boot := testcapnp.Test(v.client.Bootstrap(ctx))
	defer boot.Release()
	mine := testimpl.New("mine", nil)
	mineClient := mine.Client()
	defer mineClient.Release()

	pf, prel := boot.Promise(ctx, nil)
	defer prel()
	p := pf.Cap()
	var rels []capnp.ReleaseFunc
	var futs []testcapnp.Test_seq_Results_Future
	for n := uint32(1); n <= 2; n++ {
		f, r := seq(ctx, p, n)
		futs, rels = append(futs, f), append(rels, r)
	}
	rf, rrel := boot.ResolvePromise(ctx, func(ps testcapnp.Test_resolvePromise_Params) error {
		return ps.SetCap(mineClient.AddRef())
	})
	if _, err := rf.Struct(); err != nil {
		t.Fatal(err)
	}
	rrel()
	for n := uint32(3); n <= 6; n++ {
		f, r := seq(ctx, p, n)
		futs, rels = append(futs, f), append(rels, r)
	}
	for i, f := range futs {
		if _, err := f.Struct(); err != nil {
			t.Fatalf("seq %d: %v", i+1, err)
		}
		rels[i]()
	}
	got := mine.Log()
	want := []uint32{1, 2, 3, 4, 5, 6}
	if len(got) != len(want) {
		t.Fatalf("log = %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("log = %v, want %v", got, want)
		}
	}
}

// Cancelling a call's context sends Finish; the callee's context ends and
// the caller gets its error promptly.
func TestCancelReachesCallee(t *testing.T) {
	v := newVats(t)
	ctx := testCtx(t)
	boot := testcapnp.Test(v.client.Bootstrap(ctx))
	defer boot.Release()
	cctx, cancel := context.WithCancel(ctx)
	f, rel := boot.Block(cctx, nil)
	select {
	case <-v.root.BlockStarted():
	case <-ctx.Done():
		t.Fatal("block never started")
	}
	cancel()
	if _, err := f.Struct(); !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	rel()
	select {
	case <-v.root.BlockCancelled():
	case <-ctx.Done():
		t.Fatal("callee's context was not cancelled")
	}
	boot.Release()
	waitStats(t, ctx, v.client)
	waitStats(t, ctx, v.server)
}

// Closing a connection rejects pending calls with a disconnected error on
// both sides and releases everything the connection held.
func TestDisconnectRejectsPending(t *testing.T) {
	v := newVats(t)
	ctx := testCtx(t)
	boot := testcapnp.Test(v.client.Bootstrap(ctx))
	defer boot.Release()
	f, rel := boot.Block(ctx, nil)
	defer rel()
	<-v.root.BlockStarted()
	// The server holds a capability of the client's; closing must release it.
	mine := testimpl.New("mine", v.live)
	hf, hrel := boot.Hold(ctx, func(p testcapnp.Test_hold_Params) error { return p.SetCap(mine.Client()) })
	if _, err := hf.Struct(); err != nil {
		t.Fatal(err)
	}
	hrel()
	v.server.Close()
	if _, err := f.Struct(); !capnp.IsDisconnected(err) {
		t.Fatalf("pending call: err = %v, want disconnected", err)
	}
	select {
	case <-v.client.Done():
	case <-ctx.Done():
		t.Fatal("client conn did not end")
	}
	if err := v.client.Err(); !capnp.IsDisconnected(err) {
		t.Fatalf("client Err = %v, want disconnected", err)
	}
	// A call after the end fails the same way.
	f2, rel2 := boot.Name(ctx, nil)
	defer rel2()
	if _, err := f2.Struct(); !capnp.IsDisconnected(err) {
		t.Fatalf("call after close: err = %v", err)
	}
	if s := v.client.Stats(); !s.IsZero() {
		t.Fatalf("client tables after close: %v", s)
	}
	if s := v.server.Stats(); !s.IsZero() {
		t.Fatalf("server tables after close: %v", s)
	}
	// The server's conn owned the root (its bootstrap) and held mine
	// through an import: both are released with the connection.
	if err := v.live.WaitZero(ctx); err != nil {
		t.Fatalf("live objects = %d after close, want 0", v.live.Count())
	}
}

func TestUnknownMethodIsUnimplemented(t *testing.T) {
	v := newVats(t)
	ctx := testCtx(t)
	boot := v.client.Bootstrap(ctx)
	defer boot.Release()
	ans, rel := boot.SendCall(ctx, capnp.Send{Method: capnp.Method{InterfaceID: 0x1234, MethodID: 9}})
	defer rel()
	if _, err := ans.Struct(); !capnp.IsUnimplemented(err) {
		t.Fatalf("err = %v, want unimplemented", err)
	}
}
