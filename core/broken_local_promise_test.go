package core_test

import (
	"strings"
	"testing"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/internal/testcapnp"
)

// A capability the peer breaks (a promise it rejects) can fulfill a local
// go-capnp promise with calls queued on it. go-capnp's queue (its
// AnswerQueue, also behind every server.Server call pipelined on) then
// delivers each queued call to the broken capability and uses the
// PipelineCaller it returns; go-capnp's own broken clients return nil
// there, and the queue crashed on it. captp's broken capabilities return
// a caller that fails the calls.
func TestPeerBrokenPromiseFulfillsLocalPromise(t *testing.T) {
	_, boot, imported := importPromise(t)
	ctx := testCtx(t)
	bf, brel := boot.BreakPromise(ctx, func(p testcapnp.Test_breakPromise_Params) error { return p.SetReason("peer broke it") })
	defer brel()
	if _, err := bf.Struct(); err != nil {
		t.Fatal(err)
	}
	if err := capnp.Client(imported).Resolve(ctx); err != nil {
		t.Fatal(err)
	}
	fulfillQueuedLocalPromise(t, imported, "peer broke it")
}

// The same with a promise broken because the connection ended.
func TestDisconnectBrokenPromiseFulfillsLocalPromise(t *testing.T) {
	v, _, imported := importPromise(t)
	v.server.Close()
	<-v.client.Done()
	if err := capnp.Client(imported).Resolve(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	fulfillQueuedLocalPromise(t, imported, "")
}

// importPromise returns a pair of vats, the client's bootstrap and a
// promise the server exported (unresolved); the test's cleanup releases
// both.
func importPromise(t *testing.T) (*vats, testcapnp.Test, testcapnp.Test) {
	v := newVats(t)
	ctx := testCtx(t)
	boot := testcapnp.Test(v.client.Bootstrap(ctx))
	t.Cleanup(boot.Release)
	pf, prel := boot.Promise(ctx, nil)
	t.Cleanup(prel)
	imported := pf.Cap().AddRef()
	t.Cleanup(imported.Release)
	if _, err := pf.Struct(); err != nil {
		t.Fatal(err)
	}
	return v, boot, imported
}

// fulfillQueuedLocalPromise fulfills a go-capnp local promise with broken,
// with two calls queued on it, and checks that both fail with a message
// that contains reason.
func fulfillQueuedLocalPromise(t *testing.T, broken testcapnp.Test, reason string) {
	ctx := testCtx(t)
	local, resolve := capnp.NewLocalPromise[testcapnp.Test]()
	defer local.Release()
	// Pipelined twice, so the queue has a call that depends on another.
	child, crel := local.Child(ctx, func(p testcapnp.Test_child_Params) error { return p.SetName("c") })
	defer crel()
	name, nrel := child.Child().Name(ctx, nil)
	defer nrel()
	resolve.Fulfill(broken.AddRef())
	for what, f := range map[string]*capnp.Future{"queued call": child.Future, "call pipelined on it": name.Future} {
		if _, err := f.Struct(); err == nil || !strings.Contains(err.Error(), reason) {
			t.Errorf("%s: err = %v, want an error containing %q", what, err, reason)
		}
	}
}
