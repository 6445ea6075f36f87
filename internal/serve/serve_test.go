package serve_test

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/serve"
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
