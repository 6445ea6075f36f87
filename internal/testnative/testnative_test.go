package testnative_test

import (
	"bytes"
	"context"
	"errors"
	"net"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/exc"
	"go.uber.org/goleak"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testnative"
	"github.com/captp-go/captp/internal/testnative/inheritcapnp"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// pair connects a client vat to a server vat serving boot over net.Pipe
// and returns the client's bootstrap capability. Cleanup releases it and
// closes both connections.
func pair(t *testing.T, boot capnp.Client) (capnp.Client, *core.Conn, *core.Conn) {
	t.Helper()
	a, b := net.Pipe()
	server := core.NewConn(b, &core.Options{BootstrapClient: boot})
	client := core.NewConn(a, nil)
	c := client.Bootstrap(t.Context())
	t.Cleanup(func() {
		c.Release()
		client.Close()
		server.Close()
	})
	return c, client, server
}

// settle waits until live reaches want and neither connection holds a
// question or an answer.
func settle(t *testing.T, live *atomic.Int64, want int64, conns ...*core.Conn) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		ok := live.Load() == want
		for _, c := range conns {
			s := c.Stats()
			ok = ok && s.Questions == 0 && s.Answers == 0
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("live objects %d (want %d); stats %+v", live.Load(), want, statsOf(conns))
		}
		time.Sleep(time.Millisecond)
	}
}

func statsOf(conns []*core.Conn) []core.Stats {
	var s []core.Stats
	for _, c := range conns {
		s = append(s, c.Stats())
	}
	return s
}

// TestGeneratedEveryMethod calls every method of Test through the
// generated client (Test_Native) on the generated server (the
// testnative Object) over a real connection.
func TestGeneratedEveryMethod(t *testing.T) {
	live := new(atomic.Int64)
	rootCap, root := testnative.New("root", live)
	bootCap, client, server := pair(t, rootCap)
	boot := testnative.Test_Native{Client: bootCap}
	ctx := t.Context()

	// echo: small, null, and 1 MiB sent and returned by reference.
	big := bytes.Repeat([]byte("0123456789abcdef"), 1<<16)
	for _, data := range [][]byte{[]byte("hi"), nil, big} {
		cctx := ctx
		if len(data) >= 64<<10 {
			cctx = core.WithDataReference(ctx, 0, data)
		}
		c := boot.Echo(cctx, func(p testcapnp.Test_echo_Params) error {
			if data == nil || p.HasData() {
				return nil
			}
			return p.SetData(data)
		})
		res, err := c.Struct(ctx)
		if err != nil {
			t.Fatalf("echo %d bytes: %v", len(data), err)
		}
		got, err := res.Data()
		if err != nil || !bytes.Equal(got, data) || res.HasData() != (data != nil) {
			t.Fatalf("echo %d bytes: got %d bytes (has %v), %v", len(data), len(got), res.HasData(), err)
		}
		c.Release()
	}

	// fail: the reason comes back in a failed exception.
	f := boot.Fail(ctx, func(p testcapnp.Test_fail_Params) error { return p.SetReason("on purpose") })
	if _, err := f.Struct(ctx); exc.TypeOf(err) != exc.Failed || !bytesContains(err.Error(), "on purpose") {
		t.Fatalf("fail: %v", err)
	}
	f.Release()
	f = boot.Fail(ctx, func(p testcapnp.Test_fail_Params) error {
		p.SetKind(testcapnp.ExceptionKind_overloaded)
		return p.SetReason("busy")
	})
	if _, err := f.Struct(ctx); exc.TypeOf(err) != exc.Overloaded {
		t.Fatalf("fail overloaded: %v", err)
	}
	f.Release()

	// block: returns once cancelled.
	bctx, cancel := context.WithCancel(ctx)
	b := boot.Block(bctx, nil)
	<-root.BlockStarted()
	cancel()
	if _, err := b.Struct(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("block after cancel: %v", err)
	}
	<-root.BlockCancelled()
	b.Release()

	// child, pipelined: name() on the child before child() returns.
	cc := boot.Child(ctx, func(p testcapnp.Test_child_Params) error { return p.SetName("kid") })
	kid := cc.Child()
	nc := kid.Name(ctx, nil)
	if res, err := nc.Struct(ctx); err != nil {
		t.Fatalf("pipelined name: %v", err)
	} else if name, _ := res.Name(); name != "kid" {
		t.Fatalf("pipelined name %q; want kid", name)
	}
	nc.Release()
	if res, err := cc.Struct(ctx); err != nil || !res.HasChild() {
		t.Fatalf("child results: %v", err)
	}
	cc.Release()
	kid.Release()

	// name.
	n := boot.Name(ctx, nil)
	if res, err := n.Struct(ctx); err != nil {
		t.Fatal(err)
	} else if name, _ := res.Name(); name != "root" {
		t.Fatalf("name %q", name)
	}
	n.Release()

	// callBack: the server calls a native object of the client's vat.
	localCap, _ := testnative.New("local", live)
	cb := boot.CallBack(ctx, func(p testcapnp.Test_callBack_Params) error {
		if err := p.SetCb(testcapnp.Test(localCap.AddRef())); err != nil {
			return err
		}
		return p.SetData([]byte("ping"))
	})
	if res, err := cb.Struct(ctx); err != nil {
		t.Fatalf("callBack: %v", err)
	} else if d, _ := res.Data(); string(d) != "ping" {
		t.Fatalf("callBack returned %q", d)
	}
	cb.Release()

	// hold, getHeld (pipelined), dropHeld.
	h := boot.Hold(ctx, func(p testcapnp.Test_hold_Params) error { return p.SetCap(testcapnp.Test(localCap.AddRef())) })
	if _, err := h.Struct(ctx); err != nil {
		t.Fatalf("hold: %v", err)
	}
	h.Release()
	gh := boot.GetHeld(ctx, nil)
	held := gh.Cap()
	hn := held.Name(ctx, nil)
	if res, err := hn.Struct(ctx); err != nil {
		t.Fatalf("name of the held capability: %v", err)
	} else if name, _ := res.Name(); name != "local" {
		t.Fatalf("held name %q; want local", name)
	}
	hn.Release()
	held.Release()
	gh.Release()
	d := boot.DropHeld(ctx, nil)
	if _, err := d.Struct(ctx); err != nil {
		t.Fatalf("dropHeld: %v", err)
	}
	d.Release()
	localCap.Release()

	// promise and resolvePromise: a call made on the promise before it
	// resolves reaches what it resolved to; breakPromise breaks the next
	// one, and calls on it fail with the reason.
	pc := boot.Promise(ctx, nil)
	prom := pc.Cap()
	pn := prom.Name(ctx, nil)
	rp := boot.ResolvePromise(ctx, func(p testcapnp.Test_resolvePromise_Params) error {
		return p.SetCap(testcapnp.Test(capnp.Client(boot.Client).AddRef()))
	})
	if _, err := rp.Struct(ctx); err != nil {
		t.Fatalf("resolvePromise: %v", err)
	}
	if res, err := pn.Struct(ctx); err != nil {
		t.Fatalf("name on the promise: %v", err)
	} else if name, _ := res.Name(); name != "root" {
		t.Fatalf("name on the promise %q; want root", name)
	}
	pn.Release()
	rp.Release()
	prom.Release()
	pc.Release()
	pc = boot.Promise(ctx, nil)
	prom = pc.Cap()
	bp := boot.BreakPromise(ctx, func(p testcapnp.Test_breakPromise_Params) error { return p.SetReason("broken on purpose") })
	if _, err := bp.Struct(ctx); err != nil {
		t.Fatalf("breakPromise: %v", err)
	}
	pn = prom.Name(ctx, nil)
	if _, err := pn.Struct(ctx); err == nil || !bytesContains(err.Error(), "broken on purpose") {
		t.Fatalf("name on a broken promise: %v", err)
	}
	pn.Release()
	bp.Release()
	prom.Release()
	pc.Release()
	rp = boot.ResolvePromise(ctx, nil)
	if _, err := rp.Struct(ctx); exc.TypeOf(err) != exc.Failed {
		t.Fatalf("resolvePromise with none outstanding: %v; want failed", err)
	}
	rp.Release()

	// seq and log.
	for i := range uint32(5) {
		s := boot.Seq(ctx, func(p testcapnp.Test_seq_Params) error { p.SetN(i * 10); return nil })
		if res, err := s.Struct(ctx); err != nil || res.N() != i*10 {
			t.Fatalf("seq %d: %v", i*10, err)
		}
		s.Release()
	}
	lc := boot.Log(ctx, nil)
	res, err := lc.Struct(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ns, _ := res.Ns()
	var got []uint32
	for i := range ns.Len() {
		got = append(got, ns.At(i))
	}
	if want := []uint32{0, 10, 20, 30, 40}; !slices.Equal(got, want) {
		t.Fatalf("log %v; want %v", got, want)
	}
	lc.Release()
	settle(t, live, 1, client, server)
}

func bytesContains(s, sub string) bool { return bytes.Contains([]byte(s), []byte(sub)) }

// TestGeneratedUnknownMethod: the generated handler answers methods it
// does not know, of its own interface or another, as unimplemented.
func TestGeneratedUnknownMethod(t *testing.T) {
	live := new(atomic.Int64)
	rootCap, _ := testnative.New("root", live)
	boot, client, server := pair(t, rootCap)
	ctx := t.Context()
	for _, m := range []capnp.Method{
		{InterfaceID: testcapnp.Test_TypeID, MethodID: 99, InterfaceName: "test.capnp:Test", MethodName: "nope"},
		{InterfaceID: 0x1234, MethodID: 0, InterfaceName: "other", MethodName: "nope"},
	} {
		c := core.Call(ctx, boot, capnp.Send{Method: m})
		if _, err := c.Wait(ctx); exc.TypeOf(err) != exc.Unimplemented {
			t.Errorf("%v: %v; want unimplemented", m, err)
		}
		c.Release()
	}
	// The object still serves.
	if name, err := (testnative.Test{Client: boot}).Name(ctx); err != nil || name != "root" {
		t.Fatalf("name after unknown methods: %q, %v", name, err)
	}
	settle(t, live, 1, client, server)
}

// base and derived implement inherit.capnp's interfaces natively.
type base struct{ live *atomic.Int64 }

func newBase(live *atomic.Int64) capnp.Client {
	live.Add(1)
	return inheritcapnp.Base_NativeServerToClient(&base{live})
}

func (b *base) Ping(_ context.Context, call inheritcapnp.Base_ping_NativeServerCall) {
	res, err := call.Results()
	if err == nil {
		res.SetN(call.Args().N() + 1)
	}
	call.Return(err)
}

func (b *base) Shutdown() { b.live.Add(-1) }

type derived struct {
	base
	total uint64
}

func newDerived(live *atomic.Int64) capnp.Client {
	live.Add(1)
	return inheritcapnp.Derived_NativeServerToClient(&derived{base: base{live}})
}

func (d *derived) Pair(_ context.Context, call inheritcapnp.Derived_pair_NativeServerCall) {
	res, err := call.Results()
	if err == nil {
		err = res.SetBase(inheritcapnp.Base(newBase(d.live)))
	}
	if err == nil {
		err = res.SetDerived(inheritcapnp.Derived(newDerived(d.live)))
	}
	call.Return(err)
}

func (d *derived) Write(_ context.Context, call inheritcapnp.Derived_write_NativeServerCall) {
	data, err := call.Args().Data()
	d.total += uint64(len(data))
	call.Return(err)
}

func (d *derived) Total(_ context.Context, call inheritcapnp.Derived_total_NativeServerCall) {
	res, err := call.Results()
	if err == nil {
		res.SetN(d.total)
	}
	call.Return(err)
}

// TestGeneratedInheritance: a Derived server answers its superclass's
// method (through the Derived client, the Base client and capnpc-go's
// client), capability results are pipelined by type, and a streaming
// method works.
func TestGeneratedInheritance(t *testing.T) {
	live := new(atomic.Int64)
	bootCap, client, server := pair(t, newDerived(live))
	ctx := t.Context()
	d := inheritcapnp.Derived_Native{Client: bootCap}

	ping := func(name string, c interface {
		Struct(context.Context) (inheritcapnp.Base_ping_Results, error)
		Release()
	}, want uint32) {
		t.Helper()
		defer c.Release()
		res, err := c.Struct(ctx)
		if err != nil || res.N() != want {
			t.Fatalf("%s: n=%d, %v; want %d", name, res.N(), err, want)
		}
	}
	setN := func(n uint32) func(inheritcapnp.Base_ping_Params) error {
		return func(p inheritcapnp.Base_ping_Params) error { p.SetN(n); return nil }
	}
	ping("Derived_Native.Ping", d.Ping(ctx, setN(1)), 2)
	ping("Base_Native.Ping on a Derived", inheritcapnp.Base_Native{Client: bootCap}.Ping(ctx, setN(2)), 3)

	// capnpc-go's generated client on the native server.
	f, rel := inheritcapnp.Derived(bootCap).Ping(ctx, setN(3))
	if res, err := f.Struct(); err != nil || res.N() != 4 {
		t.Fatalf("capnpc-go Ping: %d, %v", res.N(), err)
	}
	rel()

	// Pipelining on both capability results before pair returns.
	p := d.Pair(ctx, nil)
	b, dd := p.Base(), p.Derived()
	ping("pipelined Base", b.Ping(ctx, setN(10)), 11)
	ping("pipelined Derived (superclass method)", dd.Ping(ctx, setN(20)), 21)
	if _, err := p.Struct(ctx); err != nil {
		t.Fatalf("pair: %v", err)
	}
	p.Release()
	b.Release()

	// Streaming writes, then the total.
	var sent uint64
	for i := range 20 {
		data := bytes.Repeat([]byte{byte(i)}, 100+i)
		sent += uint64(len(data))
		w := dd.Write(ctx, func(p inheritcapnp.Derived_write_Params) error { return p.SetData(data) })
		if _, err := w.Struct(ctx); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
		w.Release()
	}
	tc := dd.Total(ctx, nil)
	if res, err := tc.Struct(ctx); err != nil || res.N() != sent {
		t.Fatalf("total %d, %v; want %d", res.N(), err, sent)
	}
	tc.Release()
	dd.Release()
	settle(t, live, 1, client, server)
}

// TestGeneratedServerShutdown: releasing the last reference reaches the
// server's Shutdown through the generated handler.
func TestGeneratedServerShutdown(t *testing.T) {
	live := new(atomic.Int64)
	c := newDerived(live)
	if live.Load() != 1 {
		t.Fatalf("live %d", live.Load())
	}
	ctx := t.Context()
	pc := inheritcapnp.Derived_Native{Client: c}.Ping(ctx, nil)
	if res, err := pc.Struct(ctx); err != nil || res.N() != 1 {
		t.Fatalf("local ping: %d, %v", res.N(), err)
	}
	pc.Release()
	c.Release()
	if live.Load() != 0 {
		t.Fatalf("live %d after the last release; want 0 (Shutdown not forwarded)", live.Load())
	}
}
