package secure_test

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/captp-go/captp/adapters/secure"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/sturdyref"
	"github.com/captp-go/captp/internal/testnative"
)

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
	root, _ := testnative.New("root", nil) // echo answers, block holds until cancelled
	srvc := make(chan *core.Conn, 1)
	go func() {
		c, err := lis.Accept()
		if err != nil {
			srvc <- nil
			return
		}
		srvc <- core.NewConn(c, &core.Options{BootstrapClient: root})
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
	test := testnative.Test{Client: boot}
	for round := range 3 {
		for range 5 {
			if err := test.EchoOrBlock(ctx, false); err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
		}
		held, stop := context.WithTimeout(ctx, 30*time.Millisecond)
		start := time.Now()
		err := test.EchoOrBlock(held, true)
		stop()
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("round %d: held call: %v, want context.DeadlineExceeded", round, err)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Fatalf("round %d: the cancelled call returned after %v", round, d)
		}
	}
	if err := test.EchoOrBlock(ctx, false); err != nil {
		t.Fatalf("call after interrupted reads: %v", err)
	}
}
