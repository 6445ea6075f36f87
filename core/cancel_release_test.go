package core

import (
	"context"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
)

// A caller whose context ends while it waits, and that releases the call
// before the connection's watch of that context runs, still cancels the
// call: before the fix, Release unwatched the question first, no Finish
// was ever sent, and the native object, holding the call until its
// context ended, held up every later call (found by TestReadRoleStress).
func TestReleaseAfterContextEndsCancels(t *testing.T) {
	obj := &holdOrAnswer{}
	cli, srv := rolePair(t, NewClient(obj), capnp.Client{})
	boot := cli.Bootstrap(context.Background())
	defer boot.Release()
	call := func(ctx context.Context, method uint16) error {
		p := Call(ctx, boot, capnp.Send{Method: capnp.Method{InterfaceID: 0x1234, MethodID: method}})
		defer p.Release()
		_, err := p.Wait(ctx)
		return err
	}

	held := make(chan struct{})
	go func() {
		defer close(held)
		for i := range 300 {
			ctx, cancel := context.WithTimeout(context.Background(), time.Duration(i%3)*100*time.Microsecond)
			_ = call(ctx, 1) // held until cancelled
			cancel()
		}
	}()
	for n := 0; ; n++ {
		select {
		case <-held:
			waitFor(t, ctx5(t), "every held call is answered", func() bool { return srv.Stats().Answers == 0 })
			return
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := call(ctx, 0)
		cancel()
		if err != nil {
			t.Fatalf("call %d behind the held ones: %v", n, err)
		}
	}
}
