package netstack

import (
	"context"
	"testing"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/adapters/secure"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/sturdyref"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// Three vats on one virtual network, each with an identity and a
// secure.Network: Alice hands Bob a capability of Carol's, and it keeps
// working (in order) once Alice's connection to Carol is gone, because
// Bob picked it up from Carol directly.
func TestLevel3HandoffOverNetstack(t *testing.T) {
	ctx := testContext(t)
	network := NewNetwork(nil)
	defer network.Close()
	type vat struct {
		obj   *testimpl.Object
		stack *Stack
		net   *secure.Network
		ref   sturdyref.Ref
	}
	start := func(name string) *vat {
		st, err := network.NewStack(Config{Name: name})
		if err != nil {
			t.Fatal(err)
		}
		id, err := secure.Generate()
		if err != nil {
			t.Fatal(err)
		}
		v := &vat{obj: testimpl.New(name, nil), stack: st, net: secure.NewNetwork(id)}
		v.net.SetDialer(st.SturdyDialer(id, &core.Options{Vat: v.net.Vat()}))
		lis, err := st.Listen("*:4000")
		if err != nil {
			t.Fatal(err)
		}
		addr, err := st.SturdyAddress(lis)
		if err != nil {
			t.Fatal(err)
		}
		v.ref = sturdyref.Ref{Fingerprint: id.Fingerprint(), Address: addr}
		sctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() {
			done <- ServeSturdy(sctx, lis, id, &core.Options{Vat: v.net.Vat(), BootstrapClient: capnp.Client(v.obj.Client())})
		}()
		t.Cleanup(func() { cancel(); <-done })
		return v
	}
	alice, bob, carol := start("alice"), start("bob"), start("carol")
	dial := func(from, to *vat) *core.Conn {
		c, err := from.net.Dial(ctx, to.ref)
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		t.Cleanup(func() { c.Close(); <-c.Done() })
		return c
	}
	ac := dial(alice, carol)
	carolCap := testcapnp.Test(ac.Bootstrap(ctx))
	defer carolCap.Release()
	if err := capnp.Client(carolCap).Resolve(ctx); err != nil {
		t.Fatal(err)
	}
	bobCap := testcapnp.Test(dial(alice, bob).Bootstrap(ctx))
	defer bobCap.Release()
	hf, hrel := bobCap.Hold(ctx, func(p testcapnp.Test_hold_Params) error { return p.SetCap(carolCap.AddRef()) })
	if _, err := hf.Struct(); err != nil {
		t.Fatal(err)
	}
	hrel()
	held := testcapnp.Test(bob.obj.Held())
	defer held.Release()
	call := func(n uint32) error {
		f, rel := held.Seq(ctx, func(p testcapnp.Test_seq_Params) error { p.SetN(n); return nil })
		defer rel()
		_, err := f.Struct()
		return err
	}
	for i := range uint32(10) {
		if err := call(i); err != nil {
			t.Fatalf("seq(%d): %v", i, err)
		}
	}
	if err := capnp.Client(held).Resolve(ctx); err != nil {
		t.Fatal(err)
	}
	ac.Close()
	<-ac.Done()
	for i := uint32(10); i < 20; i++ {
		if err := call(i); err != nil {
			t.Fatalf("seq(%d) once Alice has left Carol (it must go to Carol directly): %v", i, err)
		}
	}
	log := carol.obj.Log()
	if len(log) != 20 {
		t.Fatalf("Carol got %d calls; want 20", len(log))
	}
	for i, n := range log {
		if n != uint32(i) {
			t.Fatalf("Carol's log %v is out of order", log)
		}
	}
}
