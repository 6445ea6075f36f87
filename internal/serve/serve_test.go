package serve_test

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/serve"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// The accept hook sees each connection Serve starts, with its peer's
// address, and the connection is live then.
func TestAcceptHook(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Skipf("SKIPPED: no TCP loopback here: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	type accepted struct {
		conn *core.Conn
		peer string
	}
	got := make(chan accepted, 1)
	sctx := serve.WithAcceptHook(ctx, func(c *core.Conn, peer string) { got <- accepted{c, peer} })
	done := make(chan error, 1)
	go func() {
		done <- serve.Serve(sctx, lis, nil, serve.Config{Name: "test", FormatAddr: func(a net.Addr) string { return a.String() }})
	}()

	raw, err := net.Dial("tcp", lis.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	client := core.NewConn(raw, nil)
	defer client.Close()
	var a accepted
	select {
	case a = <-got:
	case <-ctx.Done():
		t.Fatal("the hook was not called")
	}
	if a.peer != raw.LocalAddr().String() {
		t.Errorf("peer = %q, want %q", a.peer, raw.LocalAddr())
	}
	select {
	case <-a.conn.Done():
		t.Fatal("the hooked connection is already done")
	default:
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Serve = %v, want context.Canceled", err)
	}
	select {
	case <-a.conn.Done():
	default:
		t.Fatal("Serve returned before the hooked connection was done")
	}
}

// The hook runs before the connection handles the peer's first message:
// a registry it fills is never behind the peer's calls.
func TestAcceptHookBeforeMessages(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Skipf("SKIPPED: no TCP loopback here: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	seen := make(chan core.Stats, 1)
	sctx := serve.WithAcceptHook(ctx, func(c *core.Conn, peer string) {
		time.Sleep(50 * time.Millisecond) // the client's Bootstrap is on its way
		seen <- c.Snapshot().Stats
	})
	done := make(chan error, 1)
	go func() {
		opts := &core.Options{BootstrapClient: capnp.Client(testimpl.New("root", nil).Client())}
		done <- serve.Serve(sctx, lis, opts, serve.Config{Name: "test", FormatAddr: func(a net.Addr) string { return a.String() }})
	}()
	defer func() {
		cancel()
		<-done
	}()

	raw, err := net.Dial("tcp", lis.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	client := core.NewConn(raw, nil)
	defer client.Close()
	boot := testcapnp.Test(client.Bootstrap(ctx))
	defer boot.Release()
	if err := boot.Resolve(ctx); err != nil {
		t.Fatalf("bootstrap after the hook: %v", err)
	}
	if st := <-seen; st != (core.Stats{}) {
		t.Fatalf("the hook saw %v; want nothing handled yet", st)
	}
}
