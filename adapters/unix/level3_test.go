package unix

import (
	"context"
	"net"
	"path/filepath"
	"testing"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/adapters/secure"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/sturdyref"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// level3Vat is a vat on a Unix socket with an identity and, if level3, a
// secure.Network.
type level3Vat struct {
	obj *testimpl.Object
	id  *secure.Identity
	net *secure.Network // nil: Level 1/2 only
	ref sturdyref.Ref
}

func startLevel3Vat(t *testing.T, name string, level3 bool) *level3Vat {
	t.Helper()
	v := &level3Vat{obj: testimpl.New(name, nil)}
	var err error
	if v.id, err = secure.Generate(); err != nil {
		t.Fatal(err)
	}
	opts := &core.Options{BootstrapClient: capnp.Client(v.obj.Client())}
	if level3 {
		v.net = secure.NewNetwork(v.id)
		opts.Vat = v.net.Vat()
		v.net.SetDialer(SturdyDialer(v.id, &core.Options{Vat: v.net.Vat()}))
	}
	lis, err := net.Listen("unix", filepath.Join(t.TempDir(), name+".sock"))
	if err != nil {
		t.Fatal(err)
	}
	sa, err := SturdyAddress(lis, "")
	if err != nil {
		t.Fatal(err)
	}
	v.ref = sturdyref.Ref{Fingerprint: v.id.Fingerprint(), Address: sa}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ServeSturdy(ctx, lis, v.id, opts) }()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	return v
}

// dial connects from v to w: through v's network if it has one.
func (v *level3Vat) dial(t *testing.T, ctx context.Context, w *level3Vat) *core.Conn {
	t.Helper()
	var c *core.Conn
	var err error
	if v.net != nil {
		c, err = v.net.Dial(ctx, w.ref)
	} else {
		c, err = DialSturdy(ctx, w.ref, v.id, nil)
	}
	if err != nil {
		t.Fatalf("dial %v: %v", w.ref.Redacted(), err)
	}
	t.Cleanup(func() { c.Close(); <-c.Done() })
	return c
}

// handOff has Alice give Bob Carol's capability and returns what Bob
// holds, plus Alice's connection to Carol.
func handOff(t *testing.T, ctx context.Context, alice, bob, carol *level3Vat) (testcapnp.Test, *core.Conn) {
	t.Helper()
	ac := alice.dial(t, ctx, carol)
	carolCap := testcapnp.Test(ac.Bootstrap(ctx))
	defer carolCap.Release()
	if err := capnp.Client(carolCap).Resolve(ctx); err != nil {
		t.Fatalf("bootstrap Carol: %v", err)
	}
	ab := alice.dial(t, ctx, bob)
	bobCap := testcapnp.Test(ab.Bootstrap(ctx))
	defer bobCap.Release()
	f, rel := bobCap.Hold(ctx, func(p testcapnp.Test_hold_Params) error { return p.SetCap(carolCap.AddRef()) })
	defer rel()
	if _, err := f.Struct(); err != nil {
		t.Fatalf("hold: %v", err)
	}
	return testcapnp.Test(bob.obj.Held()), ac
}

func seqCalls(t *testing.T, ctx context.Context, c testcapnp.Test, from, to uint32) error {
	t.Helper()
	for i := from; i < to; i++ {
		f, rel := c.Seq(ctx, func(p testcapnp.Test_seq_Params) error { p.SetN(i); return nil })
		_, err := f.Struct()
		rel()
		if err != nil {
			return err
		}
	}
	return nil
}

// Three vats over Unix sockets with TLS: Bob picks Carol's capability up
// from Carol, so it keeps working after Alice's connection to Carol is
// gone.
func TestLevel3HandoffOverUnix(t *testing.T) {
	verifyNoLeaks(t)
	ctx := testCtx(t)
	alice, bob, carol := startLevel3Vat(t, "alice", true), startLevel3Vat(t, "bob", true), startLevel3Vat(t, "carol", true)
	held, ac := handOff(t, ctx, alice, bob, carol)
	defer held.Release()
	if err := seqCalls(t, ctx, held, 0, 10); err != nil {
		t.Fatalf("calls after the handoff: %v", err)
	}
	if err := capnp.Client(held).Resolve(ctx); err != nil {
		t.Fatal(err)
	}
	ac.Close()
	<-ac.Done()
	if err := seqCalls(t, ctx, held, 10, 20); err != nil {
		t.Fatalf("calls once Alice has left Carol (they must go to Carol directly): %v", err)
	}
	log := carol.obj.Log()
	for i, n := range log {
		if n != uint32(i) {
			t.Fatalf("Carol's log %v is out of order", log)
		}
	}
	if len(log) != 20 {
		t.Fatalf("Carol got %d calls; want 20", len(log))
	}
}

// A recipient that does not negotiate Level 3 is never sent a handoff:
// its capability goes through Alice, and stops working when Alice's
// connection to Carol does.
func TestLevel3NotSentToLevel2Peer(t *testing.T) {
	verifyNoLeaks(t)
	ctx := testCtx(t)
	alice, bob, carol := startLevel3Vat(t, "alice", true), startLevel3Vat(t, "bob", false), startLevel3Vat(t, "carol", true)
	held, ac := handOff(t, ctx, alice, bob, carol)
	defer held.Release()
	if err := seqCalls(t, ctx, held, 0, 5); err != nil {
		t.Fatalf("calls through Alice: %v", err)
	}
	ac.Close()
	<-ac.Done()
	if err := seqCalls(t, ctx, held, 5, 6); err == nil {
		t.Fatal("a call still reached Carol without Alice: Bob was handed off without negotiating Level 3")
	}
}
