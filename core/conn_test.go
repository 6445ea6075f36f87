package core_test

import (
	"context"
	"errors"
	"io"
	"sync"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/exc"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// pipeEnd is one end of an in-memory full-duplex stream.
type pipeEnd struct {
	*io.PipeReader
	*io.PipeWriter
	once sync.Once
}

func (p *pipeEnd) Close() error {
	p.once.Do(func() {
		p.PipeReader.Close()
		p.PipeWriter.Close()
	})
	return nil
}

func pipePair() (*pipeEnd, *pipeEnd) {
	ar, bw := io.Pipe()
	br, aw := io.Pipe()
	return &pipeEnd{PipeReader: ar, PipeWriter: aw}, &pipeEnd{PipeReader: br, PipeWriter: bw}
}

type vats struct {
	client, server *core.Conn
	root           *testimpl.Object
	live           *testimpl.Live
}

func newVats(t *testing.T) *vats {
	t.Helper()
	a, b := pipePair()
	live := new(testimpl.Live)
	root := testimpl.New("root", live)
	v := &vats{
		server: core.NewConn(b, &core.Options{BootstrapClient: capnp.Client(root.Client())}),
		client: core.NewConn(a, nil),
		root:   root,
		live:   live,
	}
	t.Cleanup(func() {
		v.client.Close()
		v.server.Close()
	})
	return v
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestEcho(t *testing.T) {
	v := newVats(t)
	ctx := testCtx(t)
	boot := testcapnp.Test(v.client.Bootstrap(ctx))
	defer boot.Release()
	f, rel := boot.Echo(ctx, func(p testcapnp.Test_echo_Params) error { return p.SetData([]byte("hello")) })
	defer rel()
	res, err := f.Struct()
	if err != nil {
		t.Fatal(err)
	}
	data, _ := res.Data()
	if string(data) != "hello" {
		t.Fatalf("echo = %q", data)
	}
}

func TestPipelineChainAndRelease(t *testing.T) {
	v := newVats(t)
	ctx := testCtx(t)
	boot := testcapnp.Test(v.client.Bootstrap(ctx))
	c1, r1 := boot.Child(ctx, func(p testcapnp.Test_child_Params) error { return p.SetName("a") })
	c2, r2 := c1.Child().Child(ctx, func(p testcapnp.Test_child_Params) error { return p.SetName("b") })
	c3, r3 := c2.Child().Child(ctx, func(p testcapnp.Test_child_Params) error { return p.SetName("c") })
	n, r4 := c3.Child().Name(ctx, nil)
	res, err := n.Struct()
	if err != nil {
		t.Fatal(err)
	}
	name, _ := res.Name()
	if name != "c" {
		t.Fatalf("name = %q", name)
	}
	r4()
	r3()
	r2()
	r1()
	boot.Release()
	waitStats(t, ctx, v.client)
	waitStats(t, ctx, v.server)
	// Only the root, which the server holds as its bootstrap, is left.
	if n := v.live.Count(); n != 1 {
		t.Fatalf("live objects = %d, want 1", n)
	}
}

func waitStats(t *testing.T, ctx context.Context, c *core.Conn) {
	t.Helper()
	for {
		s := c.Stats()
		if s.IsZero() {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("tables not empty: %v", s)
		case <-time.After(5 * time.Millisecond):
		}
	}
}

func TestExceptions(t *testing.T) {
	v := newVats(t)
	ctx := testCtx(t)
	boot := testcapnp.Test(v.client.Bootstrap(ctx))
	defer boot.Release()
	for kind, want := range map[testcapnp.ExceptionKind]exc.Type{
		testcapnp.ExceptionKind_failed:        exc.Failed,
		testcapnp.ExceptionKind_overloaded:    exc.Overloaded,
		testcapnp.ExceptionKind_disconnected:  exc.Disconnected,
		testcapnp.ExceptionKind_unimplemented: exc.Unimplemented,
	} {
		f, rel := boot.Fail(ctx, func(p testcapnp.Test_fail_Params) error {
			p.SetKind(kind)
			return p.SetReason("boom " + kind.String())
		})
		_, err := f.Struct()
		rel()
		var e *exc.Exception
		if !errors.As(err, &e) || e.Type != want {
			t.Fatalf("%v: err = %v", kind, err)
		}
	}
}
