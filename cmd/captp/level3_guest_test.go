package main

import (
	"context"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/adapters/netstack"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// Guests' MAC addresses; level3vat takes its IP address from the last
// three bytes (10.0.3.2, ...).
const (
	carolMAC = "52:54:00:00:03:02"
	bobMAC   = "52:54:00:00:03:03"
	// bobIsolatedMAC puts Bob on another subnet (10.0.4.3/24), for a
	// segment of his own.
	bobIsolatedMAC = "52:54:00:00:04:03"
)

// handoffTimeout bounds a handoff between guests (a TLS handshake by
// two TCG guests; about a second when the host is idle).
const handoffTimeout = time.Minute

// level3World is Alice in the test process with a stack on each switch,
// Carol and Bob in QEMU.
type level3World struct {
	alice      *hostVat
	carol, bob *level3Guest
}

// bootLevel3 boots Carol on carolSw and Bob on bobSw (the same switch
// for a shared segment) in parallel, and makes Alice, with a stack at
// host number 1 of each guest's subnet.
func bootLevel3(t *testing.T, ctx context.Context, carolSw, bobSw *netstack.Switch, bobMAC string) *level3World {
	t.Helper()
	img := level3Image(t) // may skip: only on the test's goroutine
	log := testLogger(t)
	w := &level3World{}
	var wg sync.WaitGroup
	var errC, errB error
	wg.Add(2)
	go func() { defer wg.Done(); w.carol, errC = startLevel3Guest(ctx, img, "carol", carolMAC, carolSw, log) }()
	go func() { defer wg.Done(); w.bob, errB = startLevel3Guest(ctx, img, "bob", bobMAC, bobSw, log) }()
	wg.Wait()
	for _, g := range []*level3Guest{w.carol, w.bob} {
		if g != nil {
			t.Cleanup(func() {
				if code, err := g.close(); err != nil || code != 0 {
					t.Errorf("%s exit: code %d, %v; want 0", g.name, code, err)
				}
			})
		}
	}
	if errC != nil || errB != nil {
		t.Fatalf("starting guests: carol: %v; bob: %v", errC, errB)
	}
	t.Logf("carol is %s, bob is %s", w.carol.ref, w.bob.ref)
	if w.carol.ref.Fingerprint.Equal(w.bob.ref.Fingerprint) {
		t.Fatal("both guests made the same key: no entropy")
	}
	seen := map[*netstack.Switch]bool{}
	var stacks []*netstack.Stack
	for _, x := range []struct {
		sw *netstack.Switch
		g  *level3Guest
	}{{carolSw, w.carol}, {bobSw, w.bob}} {
		if seen[x.sw] {
			continue
		}
		seen[x.sw] = true
		ip, err := netip.ParseAddr(x.g.ref.Address.Host)
		if err != nil {
			t.Fatal(err)
		}
		b := ip.As4()
		b[3] = 1
		st, err := x.sw.NewStack(netstack.Config{Name: "alice-" + x.g.name, Addrs: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4(b), 24)}, Logger: log})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		stacks = append(stacks, st)
	}
	var err error
	if w.alice, err = newHostVat(log, stacks...); err != nil {
		t.Fatal(err)
	}
	return w
}

// dial connects Alice to g through her network (so that she can hand
// off g's capabilities), closed at the end of the test.
func (w *level3World) dial(t *testing.T, ctx context.Context, g *level3Guest) *core.Conn {
	t.Helper()
	c, err := w.alice.net.Dial(ctx, g.ref)
	if err != nil {
		t.Fatalf("Alice dials %s: %v", g.name, err)
	}
	t.Cleanup(func() { c.Close(); <-c.Done() })
	return c
}

func relaySeq(ctx context.Context, r testcapnp.Test, n uint32) (testcapnp.Test_seq_Results_Future, capnp.ReleaseFunc) {
	return r.Seq(ctx, func(p testcapnp.Test_seq_Params) error { p.SetN(n); return nil })
}

// Three vats, two of them TamaGo guests: Alice (this process) resolves a
// promise Bob (a guest) has been calling to a capability hosted by Carol
// (another guest). Bob picks it up from Carol over the guests' shared
// segment (the host's switch carries the frames; no vat in the host sees
// them): his calls made before, during and after the handoff reach Carol
// in order, none goes through Alice once he has it, Alice's vine and
// Provide are released, and it keeps working once Alice has left Carol.
func TestLevel3GuestHandoff(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	sw := newSwitch(t)
	w := bootLevel3(t, ctx, sw, sw, bobMAC)

	ac := w.dial(t, ctx, w.carol)
	carolCap := testcapnp.Test(ac.Bootstrap(ctx))
	defer carolCap.Release()
	if err := capnp.Client(carolCap).Resolve(ctx); err != nil {
		t.Fatalf("bootstrap Carol: %v", err)
	}
	ab := w.dial(t, ctx, w.bob)
	relay := testcapnp.Test(ab.Restore(ctx, []byte("relay")))
	defer relay.Release()

	// Bob holds a promise of Alice's and calls it: his calls queue at
	// Alice.
	aliceObj := testimpl.New("alice", nil)
	local := aliceObj.Client()
	defer local.Release()
	pf, prel := local.Promise(ctx, nil)
	promise := pf.Cap().AddRef()
	prel()
	hf, hrel := relay.Hold(ctx, func(p testcapnp.Test_hold_Params) error { return p.SetCap(promise) })
	if _, err := hf.Struct(); err != nil {
		t.Fatalf("Bob holds Alice's promise: %v", err)
	}
	hrel()

	var futures []testcapnp.Test_seq_Results_Future
	call := func() {
		f, rel := relaySeq(ctx, relay, uint32(len(futures)))
		futures = append(futures, f)
		t.Cleanup(rel)
	}
	const before, after = 10, 10
	for range before {
		call()
	}
	// Once the relay answers a later call, Bob has sent the earlier ones.
	nf, nrel := relay.Name(ctx, nil)
	if _, err := nf.Struct(); err != nil {
		t.Fatalf("relay.name: %v", err)
	}
	nrel()

	// Alice resolves her promise to Carol's capability: she forwards the
	// calls queued on it to Carol and hands the capability to Bob.
	rf, rrel := local.ResolvePromise(ctx, func(p testcapnp.Test_resolvePromise_Params) error { return p.SetCap(carolCap.AddRef()) })
	if _, err := rf.Struct(); err != nil {
		t.Fatalf("resolve Alice's promise: %v", err)
	}
	rrel()

	// Bob keeps calling while he connects to Carol, until he no longer
	// needs the vine: Alice exports nothing to him any more (the promise
	// and the vine are released) and her Provide to Carol is finished.
	vineReleased := func() bool { return ab.Stats().Exports == 0 && ac.Stats().Questions == 0 }
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(handoffTimeout)
	during := 0
	for !vineReleased() {
		select {
		case <-ctx.Done():
			t.Fatalf("the vine was not released: %v", ctx.Err())
		case <-deadline:
			t.Fatalf("the vine was not released within %v (did Bob reach Carol?): Alice→Bob %v, Alice→Carol %v; Alice sent Carol %d calls",
				handoffTimeout, ab.Stats(), ac.Stats(), w.alice.calls(w.carol.ref))
		case <-tick.C:
		}
		call()
		during++
	}
	throughAlice := w.alice.calls(w.carol.ref)
	bobToCarol := sw.Frames("bob", "carol")
	for range after {
		call()
	}
	for i, f := range futures {
		if _, err := f.Struct(); err != nil {
			t.Fatalf("relay.seq(%d): %v", i, err)
		}
	}
	t.Logf("Bob made %d calls before the handoff, %d while it ran and %d after; Alice sent Carol %d calls", before, during, after, throughAlice)
	if throughAlice < before {
		t.Errorf("Alice sent Carol %d calls; want at least the %d Bob made on her promise before she resolved it", throughAlice, before)
	}
	if got := w.alice.calls(w.carol.ref) - throughAlice; got != 0 {
		t.Errorf("Alice sent Carol %d more calls once the vine was released; want 0 (Bob calls Carol directly)", got)
	}
	if sw.Frames("bob", "carol") <= bobToCarol {
		t.Errorf("no frame went from Bob to Carol for the calls after the handoff")
	}
	checkLog(t, ctx, w.carol, len(futures))

	// Direct: Bob's capability does not depend on Alice's connection to
	// Carol.
	ac.Close()
	<-ac.Done()
	n := len(futures)
	for range after {
		call()
	}
	for i, f := range futures[n:] {
		if _, err := f.Struct(); err != nil {
			t.Fatalf("relay.seq(%d) once Alice has left Carol: %v", n+i, err)
		}
	}
	checkLog(t, ctx, w.carol, len(futures))
	df, drel := relay.DropHeld(ctx, nil)
	if _, err := df.Struct(); err != nil {
		t.Errorf("relay.dropHeld: %v", err)
	}
	drel()
}

// newSwitch returns a segment for guests, closed after the guests and
// stacks (cleanups run last first).
func newSwitch(t *testing.T) *netstack.Switch {
	sw := netstack.NewSwitch(&netstack.SwitchOptions{Logger: testLogger(t)})
	t.Cleanup(func() { sw.Close() })
	return sw
}

// checkLog checks that g's Test object received seq(0) .. seq(n-1) in
// that order.
func checkLog(t *testing.T, ctx context.Context, g *level3Guest, n int) {
	t.Helper()
	checkSeqLog(t, ctx, g.name, g.test, n)
}

// checkSeqLog checks that test received seq(0) .. seq(n-1) in that order.
func checkSeqLog(t *testing.T, ctx context.Context, name string, test testcapnp.Test, n int) {
	t.Helper()
	log, err := seqLog(ctx, name, test)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]uint32, n)
	for i := range want {
		want[i] = uint32(i)
	}
	if !slices.Equal(log, want) {
		t.Fatalf("%s received %v; want seq(0..%d) in order (E-order)", name, log, n-1)
	}
}

// When Bob cannot reach Carol (each guest on a segment of its own, the
// host in both), the capability Alice hands him works through her vine;
// the vine and the Provide go when Bob drops the capability.
func TestLevel3GuestFallsBackToVine(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	carolSw, bobSw := newSwitch(t), newSwitch(t)
	w := bootLevel3(t, ctx, carolSw, bobSw, bobIsolatedMAC)

	ac := w.dial(t, ctx, w.carol)
	carolCap := testcapnp.Test(ac.Bootstrap(ctx))
	defer carolCap.Release()
	if err := capnp.Client(carolCap).Resolve(ctx); err != nil {
		t.Fatalf("bootstrap Carol: %v", err)
	}
	ab := w.dial(t, ctx, w.bob)
	relay := testcapnp.Test(ab.Restore(ctx, []byte("relay")))
	defer relay.Release()
	hf, hrel := relay.Hold(ctx, func(p testcapnp.Test_hold_Params) error { return p.SetCap(carolCap.AddRef()) })
	if _, err := hf.Struct(); err != nil {
		t.Fatalf("Bob holds Carol's capability: %v", err)
	}
	hrel()
	const calls = 10
	var futures []testcapnp.Test_seq_Results_Future
	for i := range uint32(calls) {
		f, rel := relaySeq(ctx, relay, i)
		defer rel()
		futures = append(futures, f)
	}
	for i, f := range futures {
		if _, err := f.Struct(); err != nil {
			t.Fatalf("relay.seq(%d) through the vine: %v", i, err)
		}
	}
	checkLog(t, ctx, w.carol, calls)
	if got := w.alice.calls(w.carol.ref); got < calls {
		t.Errorf("Alice sent Carol %d calls; want the %d Bob made through the vine", got, calls)
	}
	if got := ab.Stats().Exports; got != 1 {
		t.Errorf("Alice exports %d capabilities to Bob; want 1, the vine", got)
	}
	df, drel := relay.DropHeld(ctx, nil)
	if _, err := df.Struct(); err != nil {
		t.Fatalf("relay.dropHeld: %v", err)
	}
	drel()
	for ab.Stats().Exports != 0 || ac.Stats().Questions != 0 {
		select {
		case <-ctx.Done():
			t.Fatalf("the vine or the Provide outlived Bob's reference: Alice→Bob %v, Alice→Carol %v", ab.Stats(), ac.Stats())
		case <-time.After(10 * time.Millisecond):
		}
	}
}
