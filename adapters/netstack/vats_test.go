package netstack

import (
	"bytes"
	"fmt"
	"sync"
	"testing"

	"go.uber.org/goleak"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// TestTenVats runs ten vats on one virtual network. Every vat connects to
// every other (90 connections) and, for each ordered pair i→j with a third
// vat k, at once:
//   - pipelines child("c").child("g").name() on j's bootstrap promise;
//   - passes k's capability to j in callBack, so j calls k through i;
//   - has a child of j hold k's capability and hand it back through
//     getHeld, pipelined, and calls it: the capability comes home to i.
func TestTenVats(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	const vats = 10
	ctx := testContext(t)
	network := NewNetwork(&NetworkOptions{Logger: testLogger(t)})
	defer network.Close()
	var live testimpl.Live

	stacks := make([]*Stack, vats)
	stops := make([]func() error, vats)
	for i := range stacks {
		s, err := network.NewStack(Config{Name: fmt.Sprintf("vat%d", i)})
		if err != nil {
			t.Fatal(err)
		}
		stacks[i] = s
		stops[i] = serveVat(t, s, fmt.Sprintf("vat%d", i), &live)
	}

	conns := make([][]*core.Conn, vats)
	boots := make([][]testcapnp.Test, vats)
	for i := range vats {
		conns[i] = make([]*core.Conn, vats)
		boots[i] = make([]testcapnp.Test, vats)
		for j := range vats {
			if i == j {
				continue
			}
			c, err := stacks[i].Dial(ctx, stacks[j].Addr().String()+":4000", nil)
			if err != nil {
				t.Fatalf("vat%d dials vat%d: %v", i, j, err)
			}
			conns[i][j] = c
			boots[i][j] = testcapnp.Test(c.Bootstrap(ctx))
		}
	}

	var wg sync.WaitGroup
	for i := range vats {
		for j := range vats {
			if i == j {
				continue
			}
			k := (j + 1) % vats
			if k == i {
				k = (k + 1) % vats
			}
			wg.Go(func() { pairCalls(t, i, j, k, boots[i][j], boots[i][k]) })
		}
	}
	wg.Wait()

	for i := range vats {
		for j := range vats {
			if i == j {
				continue
			}
			boots[i][j].Release()
			if err := conns[i][j].Close(); err != nil {
				t.Errorf("closing vat%d→vat%d: %v", i, j, err)
			}
		}
	}
	for i, stop := range stops {
		if err := stop(); err == nil {
			t.Errorf("vat%d: Serve returned nil", i)
		}
	}
	if err := live.WaitZero(ctx); err != nil {
		t.Errorf("%d test objects still live after every connection closed", live.Count())
	}
	st := network.Stats()
	t.Logf("network: %+v", st)
	if st.Undeliverable != 0 {
		t.Errorf("network dropped %d frames", st.Undeliverable)
	}
	if err := network.Close(); err != nil {
		t.Error(err)
	}
}

// pairCalls makes vat i's calls on vat j (bj), with vat k's capability bk.
func pairCalls(t *testing.T, i, j, k int, bj, bk testcapnp.Test) {
	ctx := testContext(t)
	tag := fmt.Sprintf("%d→%d", i, j)
	setName := func(name string) func(testcapnp.Test_child_Params) error {
		return func(p testcapnp.Test_child_Params) error { return p.SetName(name) }
	}

	// Pipelining: two levels of promises, one round trip.
	cf, r1 := bj.Child(ctx, setName("c"+tag))
	defer r1()
	gf, r2 := cf.Child().Child(ctx, setName("g"+tag))
	defer r2()
	if got := callName(ctx, t, gf.Child()); got != "g"+tag {
		t.Errorf("%s: pipelined grandchild name %q", tag, got)
	}

	// Capability passing: j calls k's object through i.
	data := []byte("hello from " + tag)
	bf, r3 := bj.CallBack(ctx, func(p testcapnp.Test_callBack_Params) error {
		if err := p.SetCb(bk.AddRef()); err != nil {
			return err
		}
		return p.SetData(data)
	})
	defer r3()
	if res, err := bf.Struct(); err != nil {
		t.Errorf("%s: callBack through vat%d: %v", tag, k, err)
	} else if got, _ := res.Data(); !bytes.Equal(got, data) {
		t.Errorf("%s: callBack returned %q, want %q", tag, got, data)
	}

	// A capability to k, held by an object of j, handed back to i: calls
	// on it reach k. All pipelined on the child promise.
	child := cf.Child()
	hf, r4 := child.Hold(ctx, func(p testcapnp.Test_hold_Params) error { return p.SetCap(bk.AddRef()) })
	defer r4()
	held, r5 := child.GetHeld(ctx, nil)
	defer r5()
	if got, want := callName(ctx, t, held.Cap()), fmt.Sprintf("vat%d", k); got != want {
		t.Errorf("%s: held capability is named %q, want %q", tag, got, want)
	}
	if _, err := hf.Struct(); err != nil {
		t.Errorf("%s: hold: %v", tag, err)
	}
	if got := callName(ctx, t, bk); got != fmt.Sprintf("vat%d", k) {
		t.Errorf("%s: vat%d's bootstrap is named %q", tag, k, got)
	}
}
