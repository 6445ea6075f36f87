package core_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3/exc"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testnative"
)

// TestNativeQueueBounded: calls that queue behind a native call moved
// off the read loop (Go) count against Limits.MaxAnswers like any other:
// past the limit the peer gets Overloaded at once instead of growing the
// object's queue, and the queued calls run in order once it is free.
func TestNativeQueueBounded(t *testing.T) {
	const maxAnswers = 8
	a, b := pipePair()
	live := new(atomic.Int64)
	rootCap, root := testnative.New("root", live)
	server := core.NewConn(b, &core.Options{BootstrapClient: rootCap, Limits: core.Limits{MaxAnswers: maxAnswers}})
	client := core.NewConn(a, nil)
	ctx := context.Background()
	boot := testnative.Test{Client: client.Bootstrap(ctx)}
	defer func() {
		boot.Release()
		client.Close()
		server.Close()
	}()

	bctx, cancel := context.WithCancel(ctx)
	defer cancel()
	block := boot.Block(bctx)
	defer block.Release()
	<-root.BlockStarted()
	var calls []testnative.Call
	for i := range 3 * maxAnswers {
		calls = append(calls, boot.Seq(ctx, uint32(i)))
	}
	defer func() {
		for _, c := range calls {
			c.Release()
		}
	}()
	// The server handles calls in order: once the last has its answer,
	// every one was either queued or refused.
	wctx, wcancel := context.WithTimeout(ctx, 10*time.Second)
	defer wcancel()
	if _, err := calls[len(calls)-1].Wait(wctx); exc.TypeOf(err) != exc.Overloaded {
		t.Fatalf("last call while the object is blocked: %v; want Overloaded", err)
	}
	if n := len(root.Log()); n != 0 {
		t.Fatalf("%d seq calls ran while block held the object", n)
	}
	cancel()
	if _, err := block.Wait(wctx); err == nil {
		t.Fatal("block returned without error after cancel")
	}
	queued := maxAnswers - 1 // block holds one of the slots
	for i, c := range calls {
		s, err := c.Wait(wctx)
		switch {
		case i < queued && err != nil:
			t.Errorf("seq %d (queued): %v", i, err)
		case i < queued && testcapnp.Test_seq_Results(s).N() != uint32(i):
			t.Errorf("seq %d returned %d", i, testcapnp.Test_seq_Results(s).N())
		case i >= queued && exc.TypeOf(err) != exc.Overloaded:
			t.Errorf("seq %d (past the limit): %v; want Overloaded", i, err)
		}
	}
	if n := len(root.Log()); n != queued {
		t.Errorf("%d seq calls ran; want %d", n, queued)
	}
}
