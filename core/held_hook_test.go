package core

import (
	"context"
	"errors"
	"net"
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
	c := newConn(nil, &Options{})
	c.manual = true
	defer c.shutdown(errors.New("test over"), false)
	targetObj := testimpl.New("target", nil)
	target := capnp.Client(targetObj.Client())
	defer target.Release()

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
	c := newConn(nil, &Options{})
	c.manual = true
	defer c.shutdown(errors.New("test over"), false)
	targetObj := testimpl.New("target", nil)
	target := capnp.Client(targetObj.Client())
	defer target.Release()

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
	aliceObj, carolObj, targetObj := testimpl.New("alice", nil), testimpl.New("carol", nil), testimpl.New("target", nil)
	bobAlice := plainPair(t, capnp.Client(aliceObj.Client()))
	bobCarol := plainPair(t, capnp.Client(carolObj.Client()))
	aliceCap := testcapnp.Test(bobAlice.Bootstrap(ctx))
	defer aliceCap.Release()
	carolCap := testcapnp.Test(bobCarol.Bootstrap(ctx))
	defer carolCap.Release()

	pf, prel := aliceCap.Promise(ctx, nil)
	if _, err := pf.Struct(); err != nil {
		t.Fatalf("promise: %v", err)
	}
	stranded := pipelineOnFreedResults(capnp.Client(pf.Cap()).AddRef())
	defer stranded.Release()
	prel()
	waitFor(t, ctx, "Bob to free the results", func() bool { return resultsFreed(bobAlice, 0) })

	hf, hrel := carolCap.Hold(ctx, func(p testcapnp.Test_hold_Params) error {
		return p.SetCap(testcapnp.Test(stranded.AddRef()))
	})
	if _, err := hf.Struct(); err != nil {
		t.Fatalf("hold: %v", err)
	}
	hrel()
	held := carolObj.Held()
	defer held.Release()
	if snap := held.Snapshot(); !snap.IsPromise() {
		snap.Release()
		t.Fatal("Carol holds no promise; the test no longer sets up what it means to")
	} else {
		snap.Release()
	}

	localCall(t, aliceObj, func(c testcapnp.Test) (*capnp.Future, capnp.ReleaseFunc) {
		f, rel := c.ResolvePromise(ctx, func(p testcapnp.Test_resolvePromise_Params) error {
			return p.SetCap(targetObj.Client())
		})
		return f.Future, rel
	})
	rctx, rcancel := context.WithTimeout(ctx, 2*time.Second)
	defer rcancel()
	if err := held.Resolve(rctx); err != nil {
		t.Fatalf("Carol's promise never followed Alice's Resolve: %v", err)
	}
	sf, srel := testcapnp.Test(held).Seq(ctx, func(p testcapnp.Test_seq_Params) error { p.SetN(7); return nil })
	defer srel()
	if _, err := sf.Struct(); err != nil {
		t.Fatalf("seq through the resolved promise: %v", err)
	}
	if log := targetObj.Log(); len(log) != 1 || log[0] != 7 {
		t.Fatalf("target's log %v; want [7]", log)
	}
}

// plainPair connects a Conn whose peer serves boot, without Level 3, and
// returns the client's end.
func plainPair(t *testing.T, boot capnp.Client) *Conn {
	client, _ := plainPairBoth(t, boot)
	return client
}

// plainPairBoth is plainPair returning the server's end too.
func plainPairBoth(t *testing.T, boot capnp.Client) (*Conn, *Conn) {
	a, b := net.Pipe()
	client := NewConn(a, nil)
	server := NewConn(b, &Options{BootstrapClient: boot})
	t.Cleanup(func() {
		client.Close()
		server.Close()
		<-client.Done()
		<-server.Done()
	})
	return client, server
}

// The same for a capability pipelined on a native call (nativePipeline):
// Bob passes Carol such a capability, stranded as above, and Carol's
// promise follows the call's Return.
func TestStrandedNativePipelineExportResolves(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	aliceObj, carolObj := testimpl.New("alice", nil), testimpl.New("carol", nil)
	bobAlice := plainPair(t, capnp.Client(aliceObj.Client()))
	bobCarol := plainPair(t, capnp.Client(carolObj.Client()))
	aliceCap := bobAlice.Bootstrap(ctx)
	defer aliceCap.Release()
	carolCap := testcapnp.Test(bobCarol.Bootstrap(ctx))
	defer carolCap.Release()

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

	hf, hrel := carolCap.Hold(ctx, func(p testcapnp.Test_hold_Params) error {
		return p.SetCap(testcapnp.Test(stranded.AddRef()))
	})
	if _, err := hf.Struct(); err != nil {
		t.Fatalf("hold: %v", err)
	}
	hrel()
	held := testcapnp.Test(carolObj.Held())
	defer held.Release()

	rctx, rcancel := context.WithTimeout(ctx, 2*time.Second)
	defer rcancel()
	if err := capnp.Client(held).Resolve(rctx); err != nil {
		t.Fatalf("Carol's promise never followed the call's Return: %v", err)
	}
	nf, nrel := held.Name(ctx, nil)
	defer nrel()
	res, err := nf.Struct()
	if err != nil {
		t.Fatalf("name through the resolved promise: %v", err)
	}
	if name, _ := res.Name(); name != "kid" {
		t.Fatalf("name %q through the resolved promise; want kid", name)
	}
}

// The same for the bootstrap capability (bootstrapHook), stranded before
// the bootstrap's Return arrives.
func TestStrandedBootstrapExportResolves(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	aliceObj, carolObj := testimpl.New("alice", nil), testimpl.New("carol", nil)
	bobAlice, alice := plainPairBoth(t, capnp.Client(aliceObj.Client()))
	bobCarol := plainPair(t, capnp.Client(carolObj.Client()))
	carolCap := testcapnp.Test(bobCarol.Bootstrap(ctx))
	defer carolCap.Release()

	alice.mu.Lock() // Alice answers the Bootstrap only once it is stranded
	stranded := pipelineOnFreedResults(bobAlice.Bootstrap(ctx))
	defer stranded.Release()
	alice.unlock()

	hf, hrel := carolCap.Hold(ctx, func(p testcapnp.Test_hold_Params) error {
		return p.SetCap(testcapnp.Test(stranded.AddRef()))
	})
	if _, err := hf.Struct(); err != nil {
		t.Fatalf("hold: %v", err)
	}
	hrel()
	held := testcapnp.Test(carolObj.Held())
	defer held.Release()

	rctx, rcancel := context.WithTimeout(ctx, 2*time.Second)
	defer rcancel()
	if err := capnp.Client(held).Resolve(rctx); err != nil {
		t.Fatalf("Carol's promise never followed the bootstrap's Return: %v", err)
	}
	nf, nrel := held.Name(ctx, nil)
	defer nrel()
	res, err := nf.Struct()
	if err != nil {
		t.Fatalf("name through the resolved promise: %v", err)
	}
	if name, _ := res.Name(); name != "alice" {
		t.Fatalf("name %q through the resolved promise; want alice", name)
	}
}
