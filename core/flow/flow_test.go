package flow_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/captp-go/captp/core/flow"
)

// done is a context that is already cancelled: StartMessage with it
// admits a message that fits at once and otherwise fails, without
// blocking, which lets a single goroutine drive a limiter.
func done() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}

func mustStart(t *testing.T, l *flow.Limiter, n uint64) func() {
	t.Helper()
	f, err := l.StartMessage(done(), n)
	if err != nil {
		t.Fatalf("StartMessage(%d) with room: %v", n, err)
	}
	return f
}

func mustWait(t *testing.T, l *flow.Limiter, n uint64) {
	t.Helper()
	if _, err := l.StartMessage(done(), n); !errors.Is(err, context.Canceled) {
		t.Fatalf("StartMessage(%d) on a full window: %v; want it to wait", n, err)
	}
}

func TestFixedWindow(t *testing.T) {
	l := flow.NewLimiter(flow.Config{Mode: flow.Fixed, Window: 10})
	a := mustStart(t, l, 4)
	b := mustStart(t, l, 6)
	mustWait(t, l, 1)
	a()
	c := mustStart(t, l, 4)
	mustWait(t, l, 1)
	b()
	c()
	if st := l.Stats(); st.InFlight != 0 || st.PeakInFlight != 10 || st.Window != 10 {
		t.Errorf("stats %+v; want nothing in flight, peak 10, window 10", st)
	}
	// A message larger than the window goes alone rather than never.
	big := mustStart(t, l, 1000)
	mustWait(t, l, 1)
	big()
}

func TestWaiterIsWokenByAck(t *testing.T) {
	l := flow.NewLimiter(flow.Config{Mode: flow.Fixed, Window: 10})
	a := mustStart(t, l, 10)
	got := make(chan error, 1)
	go func() {
		f, err := l.StartMessage(context.Background(), 5)
		if err == nil {
			f()
		}
		got <- err
	}()
	for l.Stats().Waits == 0 {
		time.Sleep(time.Millisecond)
	}
	select {
	case err := <-got:
		t.Fatalf("StartMessage returned (%v) while the window was full", err)
	default:
	}
	a()
	if err := <-got; err != nil {
		t.Fatal(err)
	}
}

func TestCancelledWaiterLeavesQueue(t *testing.T) {
	l := flow.NewLimiter(flow.Config{Mode: flow.Fixed, Window: 10})
	a := mustStart(t, l, 10)
	ctx, cancel := context.WithCancel(context.Background())
	first := make(chan error, 1)
	go func() {
		_, err := l.StartMessage(ctx, 8)
		first <- err
	}()
	for l.Stats().Waits == 0 {
		time.Sleep(time.Millisecond)
	}
	second := make(chan error, 1)
	go func() {
		f, err := l.StartMessage(context.Background(), 2)
		if err == nil {
			f()
		}
		second <- err
	}()
	for l.Stats().Waits < 2 {
		time.Sleep(time.Millisecond)
	}
	cancel()
	if err := <-first; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled waiter: %v", err)
	}
	a()
	if err := <-second; err != nil {
		t.Fatal(err)
	}
}

func TestPoolBoundsObjectsTogether(t *testing.T) {
	p := flow.NewPool(flow.Config{Mode: flow.Fixed, Window: 10, ConnWindow: 12})
	l1, l2 := p.NewLimiter(), p.NewLimiter()
	a := mustStart(t, l1, 10)
	b := mustStart(t, l2, 2)
	mustWait(t, l2, 2) // l2's window has room; the connection's has not
	a()
	c := mustStart(t, l2, 8)
	if st := p.Stats(); st.InFlight != 10 || st.PeakInFlight != 12 {
		t.Errorf("pool %+v; want 10 in flight, peak 12", st)
	}
	b()
	c()
}

// A waiter held back by its own object's window does not hold back
// another object's.
func TestObjectsDoNotBlockEachOther(t *testing.T) {
	p := flow.NewPool(flow.Config{Mode: flow.Fixed, Window: 10, ConnWindow: 100})
	l1, l2 := p.NewLimiter(), p.NewLimiter()
	a := mustStart(t, l1, 10)
	waiting := make(chan error, 1)
	go func() {
		f, err := l1.StartMessage(context.Background(), 5)
		if err == nil {
			f()
		}
		waiting <- err
	}()
	for l1.Stats().Waits == 0 {
		time.Sleep(time.Millisecond)
	}
	mustStart(t, l2, 10)()
	a()
	if err := <-waiting; err != nil {
		t.Fatal(err)
	}
}

func TestOff(t *testing.T) {
	if l := flow.NewLimiter(flow.Config{Mode: flow.Off}); l != nil {
		t.Fatalf("Off made a limiter: %v", l)
	}
}

// link simulates a path to a receiver that handles bytes at rate bytes
// per nanosecond, one message at a time, delay away each way, driven by a
// fake clock: the sender sends whenever the limiter admits a message.
type link struct {
	now       time.Duration
	rate      float64
	delay     time.Duration
	busyUntil time.Duration
	acks      []ack
	delivered int64
}

type ack struct {
	at   time.Duration
	size int
	f    func()
}

func newLimiter(l *link, cfg flow.Config) *flow.Limiter {
	cfg.Clock = func() time.Duration { return l.now }
	return flow.NewLimiter(cfg)
}

// run sends size-byte messages through lim until the clock reaches end.
func (l *link) run(lim *flow.Limiter, size int, end time.Duration, observe func()) {
	for l.now < end {
		for {
			f, err := lim.StartMessage(done(), uint64(size))
			if err != nil {
				break
			}
			start := max(l.now+l.delay, l.busyUntil)
			l.busyUntil = start + time.Duration(float64(size)/l.rate)
			l.acks = append(l.acks, ack{at: l.busyUntil + l.delay, size: size, f: f})
		}
		a := l.acks[0]
		l.acks = l.acks[1:]
		l.now = a.at
		l.delivered += int64(a.size)
		a.f()
		if observe != nil {
			observe()
		}
	}
}

func TestAdaptiveFindsBandwidthDelayProduct(t *testing.T) {
	const size = 64 << 10
	l := &link{rate: 1, delay: 50 * time.Microsecond} // 1 GB/s
	lim := newLimiter(l, flow.Config{MinWindow: size, Window: 2 * size, MaxWindow: 64 << 20})
	l.run(lim, size, 100*time.Millisecond, nil)

	from, at := l.delivered, l.now
	var peak int
	l.run(lim, size, 200*time.Millisecond, func() { peak = max(peak, lim.Stats().InFlight) })
	rate := float64(l.delivered-from) / float64(l.now-at)
	minRTT := 2*l.delay + time.Duration(size/l.rate)
	bdp := l.rate * float64(minRTT)
	st := lim.Stats()
	t.Logf("rate %.3f B/ns, window %d, BDP %.0f, peak in flight %d, estimated bw %.3g B/s, min RTT %v",
		rate, st.Window, bdp, peak, st.Bandwidth, st.MinRTT)
	if rate < 0.9*l.rate {
		t.Errorf("delivered %.3f bytes/ns; want ≥ 90%% of the link's %.3f", rate, l.rate)
	}
	if w := float64(st.Window); w < bdp || w > 3*bdp {
		t.Errorf("window %d; want between 1 and 3 bandwidth-delay products (%.0f)", st.Window, bdp)
	}
	if st.MinRTT < minRTT || st.MinRTT > minRTT+minRTT/4 {
		t.Errorf("min RTT estimate %v; true %v", st.MinRTT, minRTT)
	}
}

func TestAdaptiveFollowsBandwidthDrop(t *testing.T) {
	const size = 16 << 10
	l := &link{rate: 1, delay: 100 * time.Microsecond}
	lim := newLimiter(l, flow.Config{MinWindow: size, MaxWindow: 64 << 20})
	l.run(lim, size, 50*time.Millisecond, nil)
	before := lim.Stats().Window
	l.rate = 0.05 // 50 MB/s
	l.run(lim, size, 500*time.Millisecond, nil)
	after := lim.Stats().Window
	bdp := l.rate * float64(2*l.delay+time.Duration(size/l.rate))
	t.Logf("window %d at 1 GB/s, %d at 50 MB/s (BDP %.0f)", before, after, bdp)
	if float64(after) > 3*bdp || after >= before {
		t.Errorf("window %d after the drop (was %d); want ≤ 3 BDP (%.0f)", after, before, 3*bdp)
	}
}

// The window keeps a queue at the receiver, so RTT samples run above the
// minimum; the periodic drain must keep the minimum from drifting up.
func TestAdaptiveMinRTTDoesNotDrift(t *testing.T) {
	const size = 16 << 10
	l := &link{rate: 0.01, delay: 2 * time.Millisecond} // 10 MB/s
	lim := newLimiter(l, flow.Config{MinWindow: size, MaxWindow: 64 << 20})
	l.run(lim, size, 65*time.Second, nil)
	minRTT := 2*l.delay + time.Duration(size/l.rate)
	st := lim.Stats()
	t.Logf("after 65 s: min RTT estimate %v (true %v), window %d", st.MinRTT, minRTT, st.Window)
	if st.MinRTT > minRTT+minRTT/4 {
		t.Errorf("min RTT estimate drifted to %v; true %v", st.MinRTT, minRTT)
	}
}

// Same inputs, same windows: the limiter depends on nothing but its calls
// and its clock.
func TestAdaptiveIsDeterministic(t *testing.T) {
	trace := func() []int {
		l := &link{rate: 0.3, delay: 70 * time.Microsecond}
		lim := newLimiter(l, flow.Config{})
		var w []int
		l.run(lim, 32<<10, 30*time.Millisecond, func() { w = append(w, lim.Stats().Window) })
		return w
	}
	a, b := trace(), trace()
	if len(a) != len(b) {
		t.Fatalf("%d and %d acknowledgements", len(a), len(b))
	}
	for i := range a {
		if a[i] != b[i] {
			t.Fatalf("window differs at ack %d: %d vs %d", i, a[i], b[i])
		}
	}
}

// A message costs no allocation once the limiter has recycled tokens:
// the limiter sits on every call to an imported capability.
func TestNoAllocationPerMessage(t *testing.T) {
	l := flow.NewLimiter(flow.Config{})
	ctx := context.Background()
	allocs := testing.AllocsPerRun(1000, func() {
		f, err := l.StartMessage(ctx, 100)
		if err != nil {
			t.Fatal(err)
		}
		f()
	})
	if allocs != 0 {
		t.Errorf("%.1f allocations per message; want 0", allocs)
	}
}

func BenchmarkStartMessage(b *testing.B) {
	l := flow.NewLimiter(flow.Config{})
	ctx := context.Background()
	for b.Loop() {
		f, _ := l.StartMessage(ctx, 100)
		f()
	}
}
