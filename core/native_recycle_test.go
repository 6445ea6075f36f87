package core

import (
	"context"
	"net"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
)

// echoOrCap answers method 0 with empty results and method 1 with a
// capability.
type echoOrCap struct{}

func (echoOrCap) HandleCall(_ context.Context, sc *ServerCall) {
	res, err := sc.Results(capnp.ObjectSize{PointerCount: 1})
	if err == nil && sc.Method().MethodID == 1 {
		id := res.Message().CapTable().Add(NewClient(echoOrCap{}))
		err = res.SetPtr(0, capnp.NewInterface(res.Segment(), id).ToPtr())
	}
	sc.Return(err)
}

// A native call's results without capabilities go back as soon as the
// caller releases them: nothing can be pipelined on them, and the grace
// that other results get kept every large echo's body out of the pool
// (a fresh 1 MiB allocation per echo). Results with a capability keep
// the grace.
func TestNativeResultsWithoutCapsRecycledAtOnce(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	a, b := net.Pipe()
	srv := NewConn(b, &Options{BootstrapClient: NewClient(echoOrCap{})})
	cli := NewConn(a, nil)
	defer func() { cli.Close(); srv.Close(); <-cli.Done(); <-srv.Done() }()
	boot := cli.Bootstrap(ctx)
	defer boot.Release()

	// kept reports whether the connection still holds the results of a
	// native call after the caller released it.
	kept := func(id uint16) bool {
		t.Helper()
		p := Call(ctx, boot, capnp.Send{Method: capnp.Method{InterfaceID: 0x1234, MethodID: id}})
		if _, err := p.Wait(ctx); err != nil {
			t.Fatalf("method %d: %v", id, err)
		}
		q := p.q
		p.Release()
		held := func() bool {
			cli.mu.Lock()
			defer cli.unlock()
			return q.results != nil
		}
		if id == 0 {
			// Wait can return while the settle effect that closed its
			// channel still runs; the release then takes effect when it
			// ends, well before resultsGrace.
			for end := time.Now().Add(resultsGrace / 2); held() && time.Now().Before(end); {
				time.Sleep(100 * time.Microsecond)
			}
		}
		return held()
	}
	if kept(0) {
		t.Error("results without capabilities are still kept after Release")
	}
	if !kept(1) {
		t.Error("results with a capability were freed at Release; they keep the grace for late pipelined calls")
	}
}
