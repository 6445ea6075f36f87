package inspect_test

import (
	"context"
	"errors"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/inspect"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// connect starts a connection pair: the server side offers boot.
func connect(t *testing.T, boot capnp.Client) (client, server *core.Conn) {
	t.Helper()
	a, b := net.Pipe()
	server = core.NewConn(b, &core.Options{BootstrapClient: boot})
	client = core.NewConn(a, nil)
	t.Cleanup(func() {
		client.Close()
		server.Close()
	})
	return client, server
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// An inspector, reached over a connection of its own, reports a tracked
// connection's tables as they are: a held capability and a call in
// flight, then nothing once they are released.
func TestInspectorReportsTables(t *testing.T) {
	ctx := testCtx(t)
	reg := inspect.NewRegistry(&inspect.Options{Name: "test vat"})

	// The application connection: a client holding the root and a child,
	// with a block() call in flight.
	root := testimpl.New("root", nil)
	appClient, appServer := connect(t, capnp.Client(root.Client()))
	if !reg.Track(appServer, "app peer") {
		t.Fatal("Track refused the first connection")
	}
	boot := testcapnp.Test(appClient.Bootstrap(ctx))
	defer boot.Release()
	cf, crel := boot.Child(ctx, func(p testcapnp.Test_child_Params) error { return p.SetName("kid") })
	res, err := cf.Struct()
	if err != nil {
		t.Fatal(err)
	}
	kid := res.Child().AddRef()
	crel()
	callCtx, cancel := context.WithCancel(ctx)
	bf, brel := boot.Block(callCtx, nil)
	<-root.BlockStarted()

	// The inspecting connection.
	inClient, inServer := connect(t, capnp.Client(reg.Inspector()))
	reg.Track(inServer, "inspector peer")
	in := inspect.Inspector(inClient.Bootstrap(ctx))
	defer in.Release()

	// Finishes of the calls that returned may still be on their way.
	rep := fetchUntil(t, ctx, in, "the block() answer alone", func(rep inspect.Report) bool {
		return len(rep.Conns) == 2 && rep.Conns[0].Snapshot.Stats.Answers == 1
	})
	if rep.Vat.Name != "test vat" || rep.Vat.Connections != 2 {
		t.Fatalf("vat = %+v, want test vat with 2 connections", rep.Vat)
	}
	app := rep.Conns[0]
	if app.Label != "app peer" || app.ID != 1 || rep.Conns[1].Label != "inspector peer" {
		t.Fatalf("connections %q, %q: want app peer first", app.Label, rep.Conns[1].Label)
	}
	s := app.Snapshot
	if s.Stats.Exports != 2 || len(s.Exports) != 2 || s.Stats.Answers != 1 || len(s.Answers) != 1 {
		t.Fatalf("app connection: stats %v, %d exports, %d answers listed; want 2 exports (root, kid) and the block() answer", s.Stats, len(s.Exports), len(s.Answers))
	}
	for _, e := range s.Exports {
		if !strings.Contains(e.What, "testimpl") || e.Refs != 1 {
			t.Errorf("export %+v: want a testimpl server held once", e)
		}
	}
	if a := s.Answers[0]; a.Returned || a.State() != "running" {
		t.Errorf("answer %+v: want block() running", a)
	}
	if s.InProgress != 1 {
		t.Errorf("in progress = %d, want 1", s.InProgress)
	}

	// Entries are cut at maxEntries; the counts stay whole.
	rep, err = inspect.Fetch(ctx, in, 1)
	if err != nil {
		t.Fatal(err)
	}
	if s := rep.Conns[0].Snapshot; len(s.Exports) != 1 || s.Stats.Exports != 2 {
		t.Errorf("maxEntries 1: %d exports listed of %d, want 1 of 2", len(s.Exports), s.Stats.Exports)
	}

	cancel()
	bf.Struct()
	brel()
	kid.Release()
	fetchUntil(t, ctx, in, "the root export alone", func(rep inspect.Report) bool {
		s := rep.Conns[0].Snapshot
		return len(s.Exports) == 1 && len(s.Answers) == 0 && s.InProgress == 0
	})

	// A closed connection is forgotten.
	appClient.Close()
	<-appServer.Done()
	rep, err = inspect.Fetch(ctx, in, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Conns) != 1 || rep.Conns[0].Label != "inspector peer" {
		t.Fatalf("after close: %d connections, want the inspector's only", len(rep.Conns))
	}
}

// fetchUntil fetches reports until ok accepts one.
func fetchUntil(t *testing.T, ctx context.Context, in inspect.Inspector, what string, ok func(inspect.Report) bool) inspect.Report {
	t.Helper()
	for {
		rep, err := inspect.Fetch(ctx, in, 0)
		if err != nil {
			t.Fatal(err)
		}
		if ok(rep) {
			return rep
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s: never seen; last report: %+v", what, rep)
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// The registry is bounded: beyond MaxConns it refuses and counts.
func TestRegistryBounded(t *testing.T) {
	reg := inspect.NewRegistry(&inspect.Options{MaxConns: 2})
	var conns []*core.Conn
	for range 3 {
		c, _ := connect(t, capnp.Client{})
		conns = append(conns, c)
	}
	if !reg.Track(conns[0], "a") || !reg.Track(conns[1], "b") || !reg.Track(conns[1], "b again") {
		t.Fatal("Track refused within the bound")
	}
	if reg.Track(conns[2], "c") {
		t.Fatal("Track accepted a third connection with MaxConns 2")
	}
	rep := reg.Report(0)
	if len(rep.Conns) != 2 || rep.Vat.Dropped != 1 {
		t.Fatalf("%d connections, %d dropped; want 2 and 1", len(rep.Conns), rep.Vat.Dropped)
	}
	// Room again once one is done.
	conns[0].Close()
	if !reg.Track(conns[2], "c") {
		t.Fatal("Track refused after a tracked connection ended")
	}
}

// Fetch on a capability that is not an Inspector says so.
func TestFetchNotAnInspector(t *testing.T) {
	ctx := testCtx(t)
	client, _ := connect(t, capnp.Client(testimpl.New("root", nil).Client()))
	c := inspect.Inspector(client.Bootstrap(ctx))
	defer c.Release()
	if _, err := inspect.Fetch(ctx, c, 0); !errors.Is(err, inspect.ErrNotInspector) {
		t.Fatalf("Fetch on a Test capability: %v, want ErrNotInspector", err)
	}
}

// Registry use races with connections ending and with inspection.
func TestRegistryConcurrent(t *testing.T) {
	reg := inspect.NewRegistry(nil)
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 20 {
				c, s := connect(t, capnp.Client{})
				reg.Track(s, "x")
				reg.Report(10)
				c.Close()
			}
		})
	}
	wg.Wait()
}

// MaxTotalEntries bounds a reply's entries across all tables and
// connections: a busy connection that exhausts it leaves the others with
// their counts only (it was once spent per connection and went negative).
func TestReportTotalBudget(t *testing.T) {
	ctx := testCtx(t)
	reg := inspect.NewRegistry(&inspect.Options{MaxTotalEntries: 1})
	root := testimpl.New("root", nil)
	client, busy := connect(t, capnp.Client(root.Client()))
	_, idle := connect(t, capnp.Client{})
	reg.Track(busy, "busy")
	reg.Track(idle, "idle")
	boot := testcapnp.Test(client.Bootstrap(ctx))
	defer boot.Release()
	callCtx, cancel := context.WithCancel(ctx)
	bf, brel := boot.Block(callCtx, nil)
	defer brel()
	<-root.BlockStarted()

	rep := reg.Report(0) // busy has an export and an answer: two tables
	listed := 0
	for _, c := range rep.Conns {
		s := c.Snapshot
		listed += len(s.Questions) + len(s.Answers) + len(s.Imports) + len(s.Exports) + len(s.Embargoes) + len(s.Provides)
	}
	if s := rep.Conns[0].Snapshot.Stats; listed != 1 || s.Exports != 1 || s.Answers == 0 {
		t.Fatalf("%d entries listed (want 1); busy stats %v, want an export and an answer counted", listed, s)
	}
	cancel()
	bf.Struct()
}

// hugeInspector answers with one connection listing n embargoes: a few
// bytes each on the wire.
type hugeInspector struct{ n int32 }

func (h hugeInspector) Vat(ctx context.Context, call inspect.Inspector_vat) error {
	res, err := call.AllocResults()
	if err != nil {
		return err
	}
	_, err = res.NewInfo()
	return err
}

func (h hugeInspector) Connections(ctx context.Context, call inspect.Inspector_connections) error {
	res, err := call.AllocResults()
	if err != nil {
		return err
	}
	list, err := res.NewConns(1)
	if err != nil {
		return err
	}
	_, err = list.At(0).NewEmbargoes(h.n)
	return err
}

// Fetch bounds what it decodes from a vat's reply, whatever the vat sends.
func TestFetchBoundsReply(t *testing.T) {
	ctx := testCtx(t)
	for _, tc := range []struct {
		n  int32
		ok bool
	}{{1<<18 - 1, true}, {1 << 18, false}} { // the connection counts too
		client, _ := connect(t, capnp.Client(inspect.Inspector_ServerToClient(hugeInspector{tc.n})))
		in := inspect.Inspector(client.Bootstrap(ctx))
		rep, err := inspect.Fetch(ctx, in, 0)
		in.Release()
		switch {
		case tc.ok && (err != nil || len(rep.Conns) != 1 || len(rep.Conns[0].Snapshot.Embargoes) != int(tc.n)):
			t.Errorf("%d embargoes: err %v; want them all decoded", tc.n, err)
		case !tc.ok && (err == nil || !strings.Contains(err.Error(), "more than")):
			t.Errorf("%d embargoes: err %v, want the reply refused", tc.n, err)
		}
	}
}
