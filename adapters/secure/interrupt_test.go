package secure_test

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/adapters/secure"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/sturdyref"
)

// holdHandler answers method 0 at once and holds method 1 until its
// context ends.
type holdHandler struct{}

func (holdHandler) HandleCall(_ context.Context, sc *core.ServerCall) {
	if sc.Method().MethodID == 1 {
		sc.Go(func(ctx context.Context, _ *core.ServerCall) error {
			<-ctx.Done()
			return ctx.Err()
		})
		return
	}
	_, err := sc.Results(capnp.ObjectSize{})
	sc.Return(err)
}

// A caller reading its own Return over TLS (core's read role) is
// interrupted with a read deadline when its call is cancelled. A TLS
// read that times out leaves the connection usable: calls go on.
func TestCancelledCallerReadOverTLS(t *testing.T) {
	serverID, err := secure.Generate()
	if err != nil {
		t.Fatal(err)
	}
	clientID, err := secure.Generate()
	if err != nil {
		t.Fatal(err)
	}
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lis := secure.NewListener(raw, serverID)
	defer lis.Close()
	srvc := make(chan *core.Conn, 1)
	go func() {
		c, err := lis.Accept()
		if err != nil {
			srvc <- nil
			return
		}
		srvc <- core.NewConn(c, &core.Options{BootstrapClient: core.NewClient(holdHandler{})})
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rawc, err := (&net.Dialer{}).DialContext(ctx, "tcp", raw.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	ref := sturdyref.Ref{Fingerprint: serverID.Fingerprint(), Address: sturdyref.Address{Transport: sturdyref.TCP, Host: "127.0.0.1", Port: 1}}
	tc, err := secure.Client(ctx, rawc, clientID, ref)
	if err != nil {
		t.Fatal(err)
	}
	cli := core.NewConn(tc, nil)
	srv := <-srvc
	if srv == nil {
		t.Fatal("accept failed")
	}
	defer func() { cli.Close(); srv.Close(); <-cli.Done(); <-srv.Done() }()
	boot := cli.Bootstrap(ctx)
	defer boot.Release()
	call := func(ctx context.Context, method uint16) error {
		p := core.Call(ctx, boot, capnp.Send{Method: capnp.Method{InterfaceID: 1, MethodID: method}})
		defer p.Release()
		_, err := p.Wait(ctx)
		return err
	}
	for round := range 3 {
		for range 5 {
			if err := call(ctx, 0); err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
		}
		held, stop := context.WithTimeout(ctx, 30*time.Millisecond)
		start := time.Now()
		err := call(held, 1)
		stop()
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("round %d: held call: %v, want context.DeadlineExceeded", round, err)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Fatalf("round %d: the cancelled call returned after %v", round, d)
		}
	}
	if err := call(ctx, 0); err != nil {
		t.Fatalf("call after interrupted reads: %v", err)
	}
}
