package main

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

func TestAddrFromMAC(t *testing.T) {
	got, err := addrFromMAC(net.HardwareAddr{0x52, 0x54, 0, 0, 3, 2})
	if err != nil || got.String() != "10.0.3.2/24" {
		t.Errorf("addrFromMAC(52:54:00:00:03:02) = %v, %v; want 10.0.3.2/24", got, err)
	}
	for _, mac := range []net.HardwareAddr{{1, 2, 3}, {0x52, 0x54, 0, 0, 3, 0}, {0x52, 0x54, 0, 0, 3, 255}} {
		if p, err := addrFromMAC(mac); err == nil {
			t.Errorf("addrFromMAC(%v) = %v; want an error", mac, p)
		}
	}
}

// The relay forwards seq calls to what it holds, in the order they
// arrive, even when they are pipelined.
func TestRelay(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r := testcapnp.Test_ServerToClient(&relay{})
	defer r.Release()

	f, rel := r.Seq(ctx, func(p testcapnp.Test_seq_Params) error { p.SetN(1); return nil })
	if _, err := f.Struct(); err == nil || !strings.Contains(err.Error(), "nothing held") {
		t.Errorf("seq with nothing held: %v", err)
	}
	rel()

	var live testimpl.Live
	carol := testimpl.New("carol", &live)
	hf, hrel := r.Hold(ctx, func(p testcapnp.Test_hold_Params) error { return p.SetCap(carol.Client()) })
	var futures []testcapnp.Test_seq_Results_Future
	for i := range uint32(50) {
		f, rel := r.Seq(ctx, func(p testcapnp.Test_seq_Params) error { p.SetN(i); return nil })
		defer rel()
		futures = append(futures, f)
	}
	if _, err := hf.Struct(); err != nil {
		t.Fatalf("hold: %v", err)
	}
	hrel()
	for i, f := range futures {
		res, err := f.Struct()
		if err != nil || res.N() != uint32(i) {
			t.Fatalf("seq(%d) = %v, %v", i, res.N(), err)
		}
	}
	log := carol.Log()
	for i, n := range log {
		if n != uint32(i) {
			t.Fatalf("the held capability got %v: out of order", log)
		}
	}
	if len(log) != 50 {
		t.Fatalf("the held capability got %d calls; want 50", len(log))
	}

	nf, nrel := r.Echo(ctx, nil)
	if _, err := nf.Struct(); !capnp.IsUnimplemented(err) {
		t.Errorf("echo: %v; want unimplemented", err)
	}
	nrel()
	df, drel := r.DropHeld(ctx, nil)
	if _, err := df.Struct(); err != nil {
		t.Fatal(err)
	}
	drel()
	// dropHeld released the relay's reference: Carol's object is gone.
	if err := live.WaitZero(ctx); err != nil {
		t.Fatalf("the held capability outlived dropHeld: %v", err)
	}
}

// A relay that holds itself answers seq with an error instead of calling
// itself without end.
func TestRelayHoldingItself(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	r := testcapnp.Test_ServerToClient(&relay{})
	defer r.Release()
	hf, hrel := r.Hold(ctx, func(p testcapnp.Test_hold_Params) error { return p.SetCap(r.AddRef()) })
	if _, err := hf.Struct(); err != nil {
		t.Fatalf("hold: %v", err)
	}
	hrel()
	f, rel := r.Seq(ctx, func(p testcapnp.Test_seq_Params) error { p.SetN(7); return nil })
	defer rel()
	if _, err := f.Struct(); err == nil || !strings.Contains(err.Error(), "in flight") {
		t.Fatalf("seq on a relay holding itself: %v; want the in-flight limit's error", err)
	}
	// The cycle through the held reference is broken by dropHeld.
	df, drel := r.DropHeld(ctx, nil)
	if _, err := df.Struct(); err != nil {
		t.Fatal(err)
	}
	drel()
}
