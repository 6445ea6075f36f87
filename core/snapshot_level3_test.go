package core

import (
	"context"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// Level 3 state shows in snapshots while a handoff is under way: the
// introducer's vine export and Provide, the host's provision and Provide
// answer, the recipient's pickup; all gone once the Accept has returned.
func TestSnapshotLevel3(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	n := newTestNet(t)
	n.gate = make(chan struct{}) // Bob cannot reach Carol until it closes
	aliceObj, carolObj := testimpl.New("alice", nil), testimpl.New("carol", nil)
	alice := n.vat("alice", capnp.Client(aliceObj.Client()))
	bob := n.vat("bob", capnp.Client{})
	carol := n.vat("carol", capnp.Client(carolObj.Client()))

	aliceCap := testcapnp.Test(bob.dial("alice").Bootstrap(ctx))
	defer aliceCap.Release()
	pf, prel := aliceCap.Promise(ctx, nil)
	promise := pf.Cap().AddRef()
	defer promise.Release()
	// The answer stays until the promise has resolved: a capability
	// pipelined on it with no call made follows a Resolve that comes
	// after the results are freed only if calls were pipelined (see
	// latch.go), and on js/wasm the Resolve comes that late.
	defer prel()
	// Once Alice answers a later call, she has made the promise.
	nf, nrel := aliceCap.Name(ctx, nil)
	if _, err := nf.Struct(); err != nil {
		t.Fatal(err)
	}
	nrel()
	carolCap := testcapnp.Test(alice.dial("carol").Bootstrap(ctx))
	defer carolCap.Release()
	if err := capnp.Client(carolCap).Resolve(ctx); err != nil {
		t.Fatal(err)
	}
	localCall(t, aliceObj, func(c testcapnp.Test) (*capnp.Future, capnp.ReleaseFunc) {
		f, rel := c.ResolvePromise(ctx, func(p testcapnp.Test_resolvePromise_Params) error { return p.SetCap(carolCap.AddRef()) })
		return f.Future, rel
	})

	var vine ExportInfo
	waitFor(t, ctx, "the handoff to be under way", func() bool {
		ab, ac := alice.conn("bob").Snapshot(), alice.conn("carol").Snapshot()
		ca, ba := carol.conn("alice").Snapshot(), bob.conn("alice").Snapshot()
		vine = ExportInfo{}
		for _, e := range ab.Exports {
			if e.Vine {
				vine = e
			}
		}
		provideAnswer := false
		for _, a := range ca.Answers {
			provideAnswer = provideAnswer || a.Provide
		}
		return vine.Vine && len(ac.Provides) == 1 && ac.Provides[0].Sent && provideAnswer &&
			carol.vat.Snapshot().Provisions == 1 && ba.Handoffs == 1
	})
	if vine.Refs != 1 || vine.What == "" {
		t.Errorf("vine export %+v: want one reference and a description", vine)
	}

	close(n.gate)
	if err := capnp.Client(promise).Resolve(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, "the vine, the Provide and the provision to go", func() bool {
		ab, ac := alice.conn("bob").Snapshot(), alice.conn("carol").Snapshot()
		for _, e := range ab.Exports {
			if e.Vine {
				return false
			}
		}
		return len(ac.Provides) == 0 && carol.vat.Snapshot() == VatSnapshot{} && bob.conn("alice").Snapshot().Handoffs == 0
	})
}
