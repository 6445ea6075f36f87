package netstack

import (
	"context"
	"errors"
	"testing"

	"capnproto.org/go/capnp/v3"
	"go.uber.org/goleak"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// TestTeardown closes a whole network while its vats are busy: a call
// blocked in the server, capabilities held across connections, a listener
// accepting. Everything must end: the blocked call fails as disconnected,
// Serve returns, every test object is released, and no goroutine (ours,
// the core's or gVisor's) is left.
func TestTeardown(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	ctx := testContext(t)
	network := NewNetwork(&NetworkOptions{Logger: testLogger(t)})
	var live testimpl.Live

	server, err := network.NewStack(Config{Name: "server"})
	if err != nil {
		t.Fatal(err)
	}
	obj := testimpl.New("server", &live)
	lis, err := server.Listen("*:4000")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() {
		served <- Serve(context.Background(), lis, &core.Options{BootstrapClient: capnp.Client(obj.Client())})
	}()

	var boots []testcapnp.Test
	for _, name := range []string{"b", "c"} {
		s, err := network.NewStack(Config{Name: name})
		if err != nil {
			t.Fatal(err)
		}
		conn, err := s.Dial(ctx, "10.0.0.1:4000", &core.Options{
			BootstrapClient: capnp.Client(testimpl.New(name, &live).Client()),
		})
		if err != nil {
			t.Fatal(err)
		}
		boots = append(boots, testcapnp.Test(conn.Bootstrap(ctx)))
	}
	// An object of c's, held by the server: an import on the server side.
	hf, release := boots[1].Hold(ctx, func(p testcapnp.Test_hold_Params) error {
		return p.SetCap(testimpl.New("held", &live).Client())
	})
	if _, err := hf.Struct(); err != nil {
		t.Fatal(err)
	}
	release()
	// b's call blocks in the server until the connection ends.
	bf, release := boots[0].Block(ctx, nil)
	defer release()
	select {
	case <-obj.BlockStarted():
	case <-ctx.Done():
		t.Fatal("block() never started")
	}

	if err := network.Close(); err != nil {
		t.Fatal(err)
	}

	if _, err := bf.Struct(); !capnp.IsDisconnected(err) {
		t.Errorf("blocked call ended with %v, want a disconnected error", err)
	}
	select {
	case err := <-served:
		if !errors.Is(err, ErrClosed) {
			t.Errorf("Serve returned %v, want an error wrapping ErrClosed", err)
		}
		t.Logf("Serve: %v", err)
	case <-ctx.Done():
		t.Fatal("Serve did not return after its stack closed")
	}
	for _, b := range boots {
		b.Release()
	}
	if err := live.WaitZero(ctx); err != nil {
		t.Errorf("%d test objects still live", live.Count())
	}
	// Closing again is harmless.
	if err := network.Close(); err != nil {
		t.Error(err)
	}
	if err := server.Close(); err != nil {
		t.Error(err)
	}
}
