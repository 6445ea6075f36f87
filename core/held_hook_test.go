package core

import (
	"context"
	"errors"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"

	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// A capability pipelined on results that held an embargoed client follows
// the embargo's end even though the results, and with them every client of
// the embargoed promise itself, were released first. go-capnp
// v3.1.0-alpha.2's resolver does nothing once those clients are gone, while
// the pipelined capability still holds the promise's hook; before the
// embargo kept a client of its own, the capability stayed on the embargo
// for good. Exported, it was a promise that never resolved: simulation
// seed 1301425 found it as a leak (TestSimSeed1301425EmbargoOutlivesClients).
func TestEmbargoResolvesCapabilitiesHoldingItsHook(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, target := manualConnAndTarget(t)

	c.mu.Lock()
	embargoed, err := c.embargoLocked(target.AddRef(), func(mt rpccp.MessageTarget) error {
		mt.SetImportedCap(0)
		return nil
	})
	var id uint32
	for id = range c.embargoes {
	}
	c.unlock()
	if err != nil {
		t.Fatalf("embargo: %v", err)
	}

	pipelined := pipelineOnFreedResults(embargoed)
	defer pipelined.Release()

	// The peer echoes the Disembargo.
	reply, m, err := newMessage()
	if err != nil {
		t.Fatal(err)
	}
	d, err := m.NewDisembargo()
	if err != nil {
		t.Fatal(err)
	}
	mt, err := d.NewTarget()
	if err != nil {
		t.Fatal(err)
	}
	mt.SetImportedCap(0)
	d.Context().SetReceiverLoopback(id)
	if !c.handleMessage(reply) {
		t.Fatalf("the echoed Disembargo ended the connection: %v", c.Err())
	}

	checkResolvedTo(t, ctx, pipelined, target, "the embargo's end")
	if s := c.Stats(); s.Embargoes != 0 {
		t.Fatalf("embargoes left: %v", s)
	}
}

// The same for a promise we hand out for a capability in the results of
// a call we are still running (answerClientLocked): it settles when the
// call returns, and a capability pipelined on go-capnp results that held
// it, then were freed, follows.
func TestLocalPipelineResolvesCapabilitiesHoldingItsHook(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, target := manualConnAndTarget(t)

	a := &answer{c: c, id: 7}
	c.mu.Lock()
	promise := c.answerClientLocked(a, nil)
	c.unlock()
	pipelined := pipelineOnFreedResults(promise)
	defer pipelined.Release()

	// The call returns the target.
	ret, seg := capnp.NewSingleSegmentMessage(nil)
	defer ret.Release()
	var fx effects
	c.mu.Lock()
	a.msg, a.returned = ret, true
	a.results = capnp.NewInterface(seg, ret.CapTable().Add(target.AddRef())).ToPtr()
	a.settlePipelinesLocked(&fx)
	c.unlock()
	fx.run()

	checkResolvedTo(t, ctx, pipelined, target, "the call's return")
}

// manualConnAndTarget returns a manual-mode Conn with no peer, which a
// test drives by hand, and a local object for promises to resolve to;
// cleanup ends and releases both.
func manualConnAndTarget(t *testing.T) (*Conn, capnp.Client) {
	c := newConn(nil, &Options{})
	c.manual = true
	target := capnp.Client(testimpl.New("target", nil).Client())
	t.Cleanup(func() {
		c.shutdown(errors.New("test over"), false)
		target.Release()
	})
	return c, target
}

// pipelineOnFreedResults puts cl, whose reference it takes, into go-capnp
// results, takes the capability pipelined on them, then frees the
// results: the capability holds cl's hook, but no client of cl is left.
// This is how a call's results look to a caller that pipelined on them
// and released the answer.
func pipelineOnFreedResults(cl capnp.Client) capnp.Client {
	aq := capnp.NewAnswerQueue(capnp.Method{})
	results := capnp.NewPromise(capnp.Method{}, aq, aq)
	pipelined := results.Answer().Client().AddRef()
	msg, seg := capnp.NewSingleSegmentMessage(nil)
	results.Fulfill(capnp.NewInterface(seg, msg.CapTable().Add(cl)).ToPtr())
	results.ReleaseClients()
	msg.Release()
	return pipelined
}

// checkResolvedTo fails t unless cl settles on target soon after what.
func checkResolvedTo(t *testing.T, ctx context.Context, cl, target capnp.Client, what string) {
	t.Helper()
	rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := cl.Resolve(rctx); err != nil {
		t.Fatalf("the pipelined capability never followed %s: %v", what, err)
	}
	if !cl.IsSame(target) {
		t.Fatalf("the pipelined capability resolved to %v, not the target", cl)
	}
}

// A promise import held only through a capability pipelined on freed
// go-capnp results cannot be switched over by go-capnp when the peer
// resolves it (its resolver does nothing then), but what captp does with
// it follows the resolution: Bob passes such a capability of Alice's
// promise to Carol, who gets a promise of Bob's, and Alice's Resolve
// reaches Carol through Bob. Before importClient.settled, Bob's watch of
// the promise he exported waited for go-capnp for good, so Carol's promise
// never resolved; calls through it reached the target all along.
func TestStrandedPromiseImportExportResolves(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	aliceObj, targetObj := testimpl.New("alice", nil), testimpl.New("target", nil)
	bobAlice, _ := pipeConns(t, &Options{BootstrapClient: capnp.Client(aliceObj.Client())}, nil)
	aliceCap := testcapnp.Test(bobAlice.Bootstrap(ctx))
	defer aliceCap.Release()
	carol := newCarol(t, ctx)

	stranded := strandedPromise(t, ctx, bobAlice, aliceCap)
	defer stranded.Release()
	held := carol.hold(t, ctx, stranded)
	defer held.Release()
	snap := capnp.Client(held).Snapshot()
	promise := snap.IsPromise()
	snap.Release()
	if !promise {
		t.Fatal("Carol holds no promise before Alice resolves; the test no longer sets up what it means to")
	}

	localCall(t, aliceObj, func(c testcapnp.Test) (*capnp.Future, capnp.ReleaseFunc) {
		f, rel := c.ResolvePromise(ctx, func(p testcapnp.Test_resolvePromise_Params) error {
			return p.SetCap(targetObj.Client())
		})
		return f.Future, rel
	})
	checkHeldFollows(t, ctx, held, "Alice's Resolve", "target")
}

// The same for a capability pipelined on a native call (nativePipeline):
// Carol's promise follows the call's Return.
func TestStrandedNativePipelineExportResolves(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	bobAlice, _ := pipeConns(t, &Options{BootstrapClient: capnp.Client(testimpl.New("alice", nil).Client())}, nil)
	aliceCap := bobAlice.Bootstrap(ctx)
	defer aliceCap.Release()
	carol := newCarol(t, ctx)

	child := Call(ctx, aliceCap, capnp.Send{
		Method:   capnp.Method{InterfaceID: testcapnp.Test_TypeID, MethodID: 3, InterfaceName: "test.capnp:Test", MethodName: "child"},
		ArgsSize: capnp.ObjectSize{PointerCount: 1},
		PlaceArgs: func(s capnp.Struct) error {
			return testcapnp.Test_child_Params(s).SetName("kid")
		},
	})
	defer child.Release()
	if child.Err() != nil {
		t.Fatalf("child: %v", child.Err())
	}
	stranded := pipelineOnFreedResults(child.Pipeline(0))
	defer stranded.Release()
	held := carol.hold(t, ctx, stranded)
	defer held.Release()
	checkHeldFollows(t, ctx, held, "the call's Return", "kid")
}

// The same for the bootstrap capability (bootstrapHook), stranded before
// the bootstrap's Return arrives.
func TestStrandedBootstrapExportResolves(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	bobAlice, alice := pipeConns(t, &Options{BootstrapClient: capnp.Client(testimpl.New("alice", nil).Client())}, nil)
	carol := newCarol(t, ctx)

	alice.mu.Lock() // Alice answers the Bootstrap only once it is stranded
	stranded := pipelineOnFreedResults(bobAlice.Bootstrap(ctx))
	defer stranded.Release()
	alice.unlock()
	held := carol.hold(t, ctx, stranded)
	defer held.Release()
	checkHeldFollows(t, ctx, held, "the bootstrap's Return", "alice")
}

// strandedPromise asks Alice, over bob (Bob's connection to her), for a
// promise, and returns a stranded view of Bob's import of it: pipelined
// on go-capnp results that held it, freed once Bob has freed the call's
// results too.
func strandedPromise(t *testing.T, ctx context.Context, bob *Conn, alice testcapnp.Test) capnp.Client {
	t.Helper()
	pf, rel := alice.Promise(ctx, nil)
	if _, err := pf.Struct(); err != nil {
		t.Fatalf("promise: %v", err)
	}
	stranded := pipelineOnFreedResults(capnp.Client(pf.Cap()).AddRef())
	rel()
	waitFor(t, ctx, "Bob to free the results", func() bool { return resultsFreed(bob, 0) })
	return stranded
}

// carol is a vat Bob passes stranded capabilities to, over a connection
// without Level 3, so that Bob exports them as promises of his own.
type carol struct {
	obj *testimpl.Object
	cap testcapnp.Test // Bob's
}

func newCarol(t *testing.T, ctx context.Context) *carol {
	obj := testimpl.New("carol", nil)
	bob, _ := pipeConns(t, &Options{BootstrapClient: capnp.Client(obj.Client())}, nil)
	c := &carol{obj: obj, cap: testcapnp.Test(bob.Bootstrap(ctx))}
	t.Cleanup(c.cap.Release)
	return c
}

// hold has Bob pass cl to Carol and returns what Carol holds: a promise
// of Bob's, unless cl had settled by then.
func (c *carol) hold(t *testing.T, ctx context.Context, cl capnp.Client) testcapnp.Test {
	t.Helper()
	f, rel := c.cap.Hold(ctx, func(p testcapnp.Test_hold_Params) error {
		return p.SetCap(testcapnp.Test(cl.AddRef()))
	})
	defer rel()
	if _, err := f.Struct(); err != nil {
		t.Fatalf("hold: %v", err)
	}
	return testcapnp.Test(c.obj.Held())
}

// checkHeldFollows fails t unless held resolves soon after what and
// then reaches the object named want.
func checkHeldFollows(t *testing.T, ctx context.Context, held testcapnp.Test, what, want string) {
	t.Helper()
	rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := capnp.Client(held).Resolve(rctx); err != nil {
		t.Fatalf("Carol's promise never followed %s: %v", what, err)
	}
	f, rel := held.Name(ctx, nil)
	defer rel()
	res, err := f.Struct()
	if err != nil {
		t.Fatalf("name through the resolved promise: %v", err)
	}
	if name, _ := res.Name(); name != want {
		t.Fatalf("name %q through the resolved promise; want %q", name, want)
	}
}

// Settle returns what a stranded capability settled to, where its own
// Resolve cannot; it returns a plain capability as it is, and ends with
// its context's error while a promise is pending.
func TestSettleStrandedPromiseImport(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	aliceObj, targetObj := testimpl.New("alice", nil), testimpl.New("target", nil)
	bobAlice, _ := pipeConns(t, &Options{BootstrapClient: capnp.Client(aliceObj.Client())}, nil)
	aliceCap := testcapnp.Test(bobAlice.Bootstrap(ctx))
	defer aliceCap.Release()

	same, err := Settle(ctx, capnp.Client(aliceCap))
	if err != nil {
		t.Fatalf("Settle of the bootstrap capability: %v", err)
	}
	if !same.IsSame(capnp.Client(aliceCap)) {
		t.Fatalf("Settle of a settled capability returned %v, not it", same)
	}
	same.Release()

	stranded := strandedPromise(t, ctx, bobAlice, aliceCap)
	defer stranded.Release()

	early, earlyCancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer earlyCancel()
	if got, err := Settle(early, stranded); err == nil {
		got.Release()
		t.Fatal("Settle returned before Alice resolved her promise")
	}

	localCall(t, aliceObj, func(c testcapnp.Test) (*capnp.Future, capnp.ReleaseFunc) {
		f, rel := c.ResolvePromise(ctx, func(p testcapnp.Test_resolvePromise_Params) error {
			return p.SetCap(targetObj.Client())
		})
		return f.Future, rel
	})
	sctx, scancel := context.WithTimeout(ctx, 2*time.Second)
	defer scancel()
	got, err := Settle(sctx, stranded)
	if err != nil {
		t.Fatalf("Settle of the stranded capability: %v", err)
	}
	defer got.Release()
	snap := got.Snapshot()
	promise := snap.IsPromise()
	snap.Release()
	if promise {
		t.Fatalf("Settle returned a promise: %v", got)
	}
	checkHeldFollows(t, ctx, testcapnp.Test(got), "Settle", "target")
}
