package core

import (
	"context"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// resultsFreed reports whether c has retired all but pending questions
// and freed every result it kept for late pipelined calls.
func resultsFreed(c *Conn, pending int) bool {
	c.mu.Lock()
	defer c.unlock()
	return len(c.questions) == pending && len(c.graveOld) == 0 && len(c.graveNew) == 0
}

// A capability pipelined on a call whose result is a promise follows the
// promise's resolution even when the Resolve arrives after the caller
// released the answer and the results are gone: latch.go. Before the
// latches the pipelined capability stayed on Alice's promise import for
// good (Resolve on it never returned); on js/wasm the Resolve routinely
// came that late, which hung TestThirdPartyHandoff.
func TestPipelinedPromiseResolvesAfterResultsFreed(t *testing.T) {
	// The scenario needs seq(0) pipelined on the Promise call before its
	// Return is read; rarely, on a loaded machine, the Return wins and
	// the call goes straight to the import (the uncovered case in the
	// README's Known issues). Such an attempt is not the case under test:
	// run it again.
	for attempt := 1; ; attempt++ {
		if pipelinedPromiseAttempt(t) {
			return
		}
		if attempt == 5 {
			t.Fatal("in 5 attempts the Return always came before the pipelined call")
		}
	}
}

// pipelinedPromiseAttempt runs TestPipelinedPromiseResolvesAfterResultsFreed
// once; it reports false if seq(0) was not pipelined on the Promise call.
func pipelinedPromiseAttempt(t *testing.T) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	n := newTestNet(t)
	aliceObj, targetObj := testimpl.New("alice", nil), testimpl.New("target", nil)
	target := targetObj.Client()
	defer target.Release()
	n.vat("alice", capnp.Client(aliceObj.Client()))
	bob := n.vat("bob", capnp.Client{})
	aliceCap := testcapnp.Test(bob.dial("alice").Bootstrap(ctx))
	defer aliceCap.Release()

	pf, prel := aliceCap.Promise(ctx, nil)
	promise := pf.Cap().AddRef()
	defer promise.Release()
	f0, rel0 := seq(ctx, promise, 0) // waits at Alice for her promise
	defer rel0()
	if _, err := pf.Struct(); err != nil {
		t.Fatalf("promise: %v", err)
	}
	prel()
	// The ordering under test: the results, and with them the import's
	// own clients, are gone before the Resolve.
	waitFor(t, ctx, "Bob to free the results", func() bool { return resultsFreed(bob.conn("alice"), 1) })
	snap := capnp.Client(promise).Snapshot()
	before, ok := snap.Brand().Value.(*importClient)
	snap.Release()
	if !ok {
		t.Fatalf("before the Resolve the capability is %v, not Alice's promise", snap)
	}
	bc := bob.conn("alice")
	bc.mu.Lock()
	ie := bc.imports[before.id]
	latched := ie != nil && len(ie.latches) > 0
	bc.unlock()
	if !latched {
		t.Logf("seq(0) was not pipelined on the Promise call; trying again")
		return false
	}

	localCall(t, aliceObj, func(c testcapnp.Test) (*capnp.Future, capnp.ReleaseFunc) {
		f, rel := c.ResolvePromise(ctx, func(p testcapnp.Test_resolvePromise_Params) error { return p.SetCap(target.AddRef()) })
		return f.Future, rel
	})
	rctx, rcancel := context.WithTimeout(ctx, 5*time.Second)
	defer rcancel()
	if err := capnp.Client(promise).Resolve(rctx); err != nil {
		t.Fatalf("the pipelined capability never followed the promise's resolution: %v", err)
	}
	snap = capnp.Client(promise).Snapshot()
	after, ok := snap.Brand().Value.(*importClient)
	snap.Release()
	if !ok || after == before {
		t.Fatalf("resolved to %v; want Alice's export of the target", after)
	}
	f1, rel1 := seq(ctx, promise, 1)
	defer rel1()
	for i, f := range []testcapnp.Test_seq_Results_Future{f0, f1} {
		if _, err := f.Struct(); err != nil {
			t.Fatalf("seq(%d): %v", i, err)
		}
	}
	if log := targetObj.Log(); len(log) != 2 || log[0] != 0 || log[1] != 1 {
		t.Fatalf("target's log %v; want [0 1]", log)
	}
	return true
}

// A promise import that calls were pipelined on is kept, even with every
// client released, until it resolves (its hook may live on in pipelined
// capabilities, which latch.go cannot see go); the Resolve releases it.
// One nobody pipelined on goes with its last client, as any import.
func TestPromiseImportRelease(t *testing.T) {
	for _, pipelined := range []bool{false, true} {
		name := "unused"
		if pipelined {
			name = "pipelined"
		}
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			n := newTestNet(t)
			aliceObj, targetObj := testimpl.New("alice", nil), testimpl.New("target", nil)
			target := targetObj.Client()
			defer target.Release()
			alice := n.vat("alice", capnp.Client(aliceObj.Client()))
			bob := n.vat("bob", capnp.Client{})
			aliceCap := testcapnp.Test(bob.dial("alice").Bootstrap(ctx))
			defer aliceCap.Release()

			// Alice handles nothing until Bob has sent both calls, so
			// seq(0) is pipelined on the question rather than sent to the
			// promise its Return named.
			ac := alice.conn("bob")
			ac.mu.Lock()
			pf, prel := aliceCap.Promise(ctx, nil)
			var f0 testcapnp.Test_seq_Results_Future
			pending := 0
			if pipelined {
				p := pf.Cap().AddRef()
				var rel0 capnp.ReleaseFunc
				f0, rel0 = seq(ctx, p, 0)
				defer rel0()
				p.Release()
				pending = 1
			}
			ac.unlock()
			if _, err := pf.Struct(); err != nil {
				t.Fatalf("promise: %v", err)
			}
			prel()
			waitFor(t, ctx, "Bob to free the results", func() bool { return resultsFreed(bob.conn("alice"), pending) })
			if !pipelined {
				waitFor(t, ctx, "Bob to release the unused promise", func() bool {
					return bob.conn("alice").Stats().Imports == 1 && alice.conn("bob").Stats().Exports == 1
				})
				return
			}
			if s := bob.conn("alice").Stats(); s.Imports != 2 {
				t.Fatalf("Bob imports %d capabilities; want 2 (bootstrap and the latched promise)", s.Imports)
			}
			localCall(t, aliceObj, func(c testcapnp.Test) (*capnp.Future, capnp.ReleaseFunc) {
				f, rel := c.ResolvePromise(ctx, func(p testcapnp.Test_resolvePromise_Params) error { return p.SetCap(target.AddRef()) })
				return f.Future, rel
			})
			if _, err := f0.Struct(); err != nil {
				t.Fatalf("seq(0): %v", err)
			}
			waitFor(t, ctx, "Bob to release the resolved promise", func() bool {
				return bob.conn("alice").Stats().Imports == 1 && alice.conn("bob").Stats().Exports == 1
			})
		})
	}
}
