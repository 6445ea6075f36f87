package core_test

import (
	"context"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
)

// waitSnapshot polls c.Snapshot until ok accepts one, or fails the test
// with the last one.
func waitSnapshot(t *testing.T, ctx context.Context, c *core.Conn, what string, ok func(core.Snapshot) bool) core.Snapshot {
	t.Helper()
	for {
		s := c.Snapshot()
		if ok(s) {
			return s
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s: never seen; last snapshot: %+v", what, s)
		case <-time.After(2 * time.Millisecond):
		}
	}
}

// A call in flight is a question on the caller's side and a running answer
// on the callee's, each naming it; once cancelled and released, both
// sides' tables are empty again, and so are their snapshots.
func TestSnapshotCallInFlight(t *testing.T) {
	v := newVats(t)
	ctx := testCtx(t)
	boot := testcapnp.Test(v.client.Bootstrap(ctx))
	if err := boot.Resolve(ctx); err != nil {
		t.Fatal(err)
	}
	callCtx, cancel := context.WithCancel(ctx)
	f, release := boot.Block(callCtx, nil)
	select {
	case <-v.root.BlockStarted():
	case <-ctx.Done():
		t.Fatal("block() never started")
	}

	cs := waitSnapshot(t, ctx, v.client, "the block() question", func(s core.Snapshot) bool {
		return len(s.Questions) == 1 && len(s.Imports) == 1
	})
	q := cs.Questions[0]
	if q.Method != "test.capnp:Test.block" || q.Returned || q.Finished || q.Bootstrap || q.State() != "waiting" {
		t.Errorf("client question = %+v (state %q), want block() waiting", q, q.State())
	}
	if im := cs.Imports[0]; im.Refs != 1 || im.Clients < 1 {
		t.Errorf("client import = %+v, want the bootstrap capability held once", im)
	}
	if cs.Stats != v.client.Stats() || cs.Stats.Questions != 1 {
		t.Errorf("snapshot stats %v disagree with Stats %v", cs.Stats, v.client.Stats())
	}

	ss := waitSnapshot(t, ctx, v.server, "the block() answer", func(s core.Snapshot) bool {
		return len(s.Answers) == 1 && len(s.Exports) == 1
	})
	a := ss.Answers[0]
	if a.ID != q.ID || a.Returned || a.Finished || a.State() != "running" || ss.InProgress != 1 {
		t.Errorf("server answer = %+v (state %q, in progress %d), want question %d running", a, a.State(), ss.InProgress, q.ID)
	}
	if e := ss.Exports[0]; e.ID != cs.Imports[0].ID || e.Refs != 1 || !strings.Contains(e.What, "local server") || !strings.Contains(e.What, "testimpl") {
		t.Errorf("server export = %+v, want import %d, a local testimpl server", e, cs.Imports[0].ID)
	}

	cancel()
	if _, err := f.Struct(); err == nil {
		t.Error("cancelled block() succeeded")
	}
	release()
	boot.Release()
	for _, c := range []*core.Conn{v.client, v.server} {
		s := waitSnapshot(t, ctx, c, "empty tables", func(s core.Snapshot) bool { return s.Stats.IsZero() })
		if len(s.Questions)+len(s.Answers)+len(s.Imports)+len(s.Exports)+len(s.Embargoes) != 0 {
			t.Errorf("empty tables but snapshot lists entries: %+v", s)
		}
	}
}

// A capability the client holds shows as an import on its side and an
// export on the server's until released.
func TestSnapshotHeldImport(t *testing.T) {
	v := newVats(t)
	ctx := testCtx(t)
	boot := testcapnp.Test(v.client.Bootstrap(ctx))
	defer boot.Release()
	f, release := boot.Child(ctx, func(p testcapnp.Test_child_Params) error { return p.SetName("held") })
	res, err := f.Struct()
	if err != nil {
		t.Fatal(err)
	}
	child := res.Child().AddRef()
	release()
	if err := child.Resolve(ctx); err != nil {
		t.Fatal(err)
	}

	cs := waitSnapshot(t, ctx, v.client, "two imports, no questions", func(s core.Snapshot) bool {
		return len(s.Imports) == 2 && len(s.Questions) == 0
	})
	ss := waitSnapshot(t, ctx, v.server, "two exports, no answers", func(s core.Snapshot) bool {
		return len(s.Exports) == 2 && len(s.Answers) == 0
	})
	for i := range 2 {
		if cs.Imports[i].ID != ss.Exports[i].ID {
			t.Errorf("import %d and export %d should be the same capability", cs.Imports[i].ID, ss.Exports[i].ID)
		}
	}

	child.Release()
	cs = waitSnapshot(t, ctx, v.client, "the child import released", func(s core.Snapshot) bool { return len(s.Imports) == 1 })
	ss = waitSnapshot(t, ctx, v.server, "the child export released", func(s core.Snapshot) bool { return len(s.Exports) == 1 })
	if cs.Imports[0].ID != ss.Exports[0].ID {
		t.Errorf("left import %d, export %d: want the bootstrap capability on both sides", cs.Imports[0].ID, ss.Exports[0].ID)
	}
}

// Snapshot is safe while the connection works and after it has ended,
// when it reports the end.
func TestSnapshotConcurrentAndAfterClose(t *testing.T) {
	v := newVats(t)
	ctx := testCtx(t)
	boot := testcapnp.Test(v.client.Bootstrap(ctx))
	defer boot.Release()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, c := range []*core.Conn{v.client, v.server} {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				// js/wasm does not preempt: let the connections run.
				runtime.Gosched()
				s := c.Snapshot()
				if len(s.Questions) != s.Stats.Questions || len(s.Exports) != s.Stats.Exports {
					t.Errorf("snapshot lists %d questions, %d exports; stats say %v", len(s.Questions), len(s.Exports), s.Stats)
					return
				}
			}
		})
	}
	for i := range 50 {
		f, release := boot.Child(ctx, func(p testcapnp.Test_child_Params) error { return p.SetName("c") })
		n, rel2 := f.Child().Name(ctx, nil)
		if _, err := n.Struct(); err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
		rel2()
		release()
	}
	close(stop)
	wg.Wait()

	v.client.Close()
	<-v.server.Done()
	s := v.client.Snapshot()
	if !s.Closing || s.Err != "" || !s.Stats.IsZero() {
		t.Errorf("after a local Close: closing %v, err %q, stats %v; want closing, no error, empty", s.Closing, s.Err, s.Stats)
	}
	if s := v.server.Snapshot(); !s.Closing || s.Err == "" {
		t.Errorf("after the peer closed: closing %v, err %q; want the reason", s.Closing, s.Err)
	}
}
