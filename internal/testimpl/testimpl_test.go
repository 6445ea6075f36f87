package testimpl

import (
	"bytes"
	"context"
	"slices"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/exc"

	"github.com/captp-go/captp/internal/testcapnp"
)

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestEchoNullEmpty(t *testing.T) {
	ctx := ctxT(t)
	var live Live
	c := New("root", &live).Client()
	defer c.Release()

	for _, tc := range []struct {
		name string
		in   []byte
	}{{"nil", nil}, {"empty", []byte{}}, {"bytes", []byte("0123456789abcdef")}} {
		f, rel := c.Echo(ctx, func(p testcapnp.Test_echo_Params) error { return p.SetData(tc.in) })
		r, err := f.Struct()
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if r.HasData() != (tc.in != nil) {
			t.Errorf("%s: HasData = %v", tc.name, r.HasData())
		}
		d, _ := r.Data()
		if !bytes.Equal(d, tc.in) {
			t.Errorf("%s: got %q", tc.name, d)
		}
		rel()
	}
}

func TestFailKinds(t *testing.T) {
	ctx := ctxT(t)
	c := New("root", nil).Client()
	defer c.Release()
	for k, want := range map[testcapnp.ExceptionKind]exc.Type{
		testcapnp.ExceptionKind_failed:        exc.Failed,
		testcapnp.ExceptionKind_overloaded:    exc.Overloaded,
		testcapnp.ExceptionKind_disconnected:  exc.Disconnected,
		testcapnp.ExceptionKind_unimplemented: exc.Unimplemented,
	} {
		f, rel := c.Fail(ctx, func(p testcapnp.Test_fail_Params) error {
			p.SetKind(k)
			return p.SetReason("reason-" + k.String())
		})
		_, err := f.Struct()
		rel()
		if exc.TypeOf(err) != want {
			t.Errorf("%v: type %v, err %v", k, exc.TypeOf(err), err)
		}
		if err == nil || !bytes.Contains([]byte(err.Error()), []byte("reason-"+k.String())) {
			t.Errorf("%v: err %v lacks reason", k, err)
		}
	}
}

func TestLiveAndChildren(t *testing.T) {
	ctx := ctxT(t)
	var live Live
	o := New("root", &live)
	c := o.Client()
	if c2 := o.Client(); !c2.IsSame(c) {
		t.Error("second Client() is not the same capability")
	} else {
		c2.Release()
	}
	f, rel := c.Child(ctx, func(p testcapnp.Test_child_Params) error { return p.SetName("a") })
	n, rel2 := f.Child().Name(ctx, nil)
	nr, err := n.Struct()
	if err != nil {
		t.Fatal(err)
	}
	if name, _ := nr.Name(); name != "a" {
		t.Errorf("child name %q", name)
	}
	if got := live.Count(); got != 2 {
		t.Errorf("live = %d, want 2", got)
	}
	rel2()
	rel()
	c.Release()
	if err := live.WaitZero(ctx); err != nil {
		t.Fatalf("WaitZero: %v (count %d)", err, live.Count())
	}
}

func TestSeqHoldPromise(t *testing.T) {
	ctx := ctxT(t)
	var live Live
	srv := New("server", &live)
	local := New("local", &live)
	c := srv.Client()
	lc := local.Client()

	// hold/getHeld returns the same capability.
	_, rel := c.Hold(ctx, func(p testcapnp.Test_hold_Params) error { return p.SetCap(lc.AddRef()) })
	rel()
	g, rel := c.GetHeld(ctx, nil)
	gr, err := g.Struct()
	if err != nil {
		t.Fatal(err)
	}
	if !gr.Cap().IsSame(lc) {
		t.Error("getHeld returned a different capability")
	}
	rel()

	// A promise resolved to local delivers calls in order.
	pf, prel := c.Promise(ctx, nil)
	p := pf.Cap()
	var futs []testcapnp.Test_seq_Results_Future
	var rels []capnp.ReleaseFunc
	seq := func(n uint32) {
		f, r := p.Seq(ctx, func(s testcapnp.Test_seq_Params) error { s.SetN(n); return nil })
		futs = append(futs, f)
		rels = append(rels, r)
	}
	seq(1)
	seq(2)
	rf, rrel := c.ResolvePromise(ctx, func(s testcapnp.Test_resolvePromise_Params) error {
		return s.SetCap(lc.AddRef())
	})
	seq(3)
	seq(4)
	if _, err := rf.Struct(); err != nil {
		t.Fatal(err)
	}
	rrel()
	for i, f := range futs {
		r, err := f.Struct()
		if err != nil {
			t.Fatalf("seq %d: %v", i+1, err)
		}
		if r.N() != uint32(i+1) {
			t.Errorf("seq %d returned %d", i+1, r.N())
		}
		rels[i]()
	}
	if got := local.Log(); !slices.Equal(got, []uint32{1, 2, 3, 4}) {
		t.Errorf("local log %v", got)
	}
	prel()

	// A broken promise rejects calls with the reason.
	pf, prel = pf2(ctx, c)
	bf, brel := c.BreakPromise(ctx, func(s testcapnp.Test_breakPromise_Params) error { return s.SetReason("nope") })
	if _, err := bf.Struct(); err != nil {
		t.Fatal(err)
	}
	brel()
	sf, srel := pf.Cap().Seq(ctx, nil)
	if _, err := sf.Struct(); err == nil || exc.TypeOf(err) != exc.Failed {
		t.Errorf("call on broken promise: %v", err)
	}
	srel()
	prel()

	// An unresolved promise is broken when the server shuts down.
	pf, prel = pf2(ctx, c)
	lc.Release()
	c.Release()
	if err := pf.Cap().Resolve(ctx); err != nil {
		t.Fatal(err)
	}
	sf, srel = pf.Cap().Seq(ctx, nil)
	if _, err := sf.Struct(); err == nil {
		t.Error("call on promise of a shut down object succeeded")
	}
	srel()
	prel()
	if err := live.WaitZero(ctx); err != nil {
		t.Fatalf("WaitZero: %v (count %d)", err, live.Count())
	}
}

func pf2(ctx context.Context, c testcapnp.Test) (testcapnp.Test_promise_Results_Future, capnp.ReleaseFunc) {
	return c.Promise(ctx, nil)
}

func TestBlockDoesNotStall(t *testing.T) {
	ctx := ctxT(t)
	o := New("root", nil)
	c := o.Client()
	defer c.Release()
	bctx, cancel := context.WithCancel(ctx)
	bf, brel := c.Block(bctx, nil)
	defer brel()
	select {
	case <-o.BlockStarted():
	case <-ctx.Done():
		t.Fatal("block did not start")
	}
	// Other calls proceed while block waits.
	sf, srel := c.Seq(ctx, func(s testcapnp.Test_seq_Params) error { s.SetN(7); return nil })
	if _, err := sf.Struct(); err != nil {
		t.Fatal(err)
	}
	srel()
	cancel()
	select {
	case <-o.BlockCancelled():
	case <-ctx.Done():
		t.Fatal("block did not observe cancellation")
	}
	if _, err := bf.Struct(); err == nil {
		t.Error("cancelled block returned no error")
	}
}
