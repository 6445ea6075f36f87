package core

import (
	"context"
	"errors"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"

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
