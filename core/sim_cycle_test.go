package core

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/captp-go/captp/internal/testcapnp"
)

// Simulated objects must not build promise cycles. Seed 25916 (2 vats) at
// 500 steps hung at step 355 in go-capnp's clientCursor.compress, with no
// core frame on the stack: object o4 held h12, the pipelined result of a
// getHeld() call queued on o4's own promise; when o4 resolved that promise
// to itself, the queued getHeld() reached o4 and returned h12, so the
// answer resolved to itself and go-capnp chased the cycle forever.

// simNoHang runs f and fails the test if it has not returned within d (a
// promise cycle spins forever rather than failing).
func simNoHang(t *testing.T, d time.Duration, what string, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("%s did not finish within %v (a promise cycle?)", what, d)
	}
}

func TestSimSeed25916NoPromiseCycle(t *testing.T) {
	cfg := simConfig{Seed: 25916, Vats: 2, Steps: 356}
	var f *simFailure
	simNoHang(t, 30*time.Second, "the simulation", func() { f = runSim(cfg) })
	if f != nil {
		t.Fatalf("%v\n%s", f, lastLines(f.Trace, 60))
	}
}

// The minimal form of the seed above: a getHeld() queued on an object's
// promise, the object holding that call's pipelined result, then the
// promise resolved to the object. The call must fail, not return (and
// so resolve to) its own result.
func TestSimObjectReturnsNoCycle(t *testing.T) {
	s := &sim{}
	o := testcapnp.Test(s.newObject(0, "o"))
	ctx := context.Background()
	var errText string
	simNoHang(t, 10*time.Second, "the calls", func() {
		p, relP := o.Promise(ctx, nil)
		defer relP()
		held, relHeld := p.Cap().GetHeld(ctx, nil) // queued on the promise
		defer relHeld()
		_, relHold := o.Hold(ctx, func(ps testcapnp.Test_hold_Params) error {
			return ps.SetCap(held.Cap().AddRef())
		})
		defer relHold()
		_, relRes := o.ResolvePromise(ctx, func(ps testcapnp.Test_resolvePromise_Params) error {
			return ps.SetCap(o.AddRef())
		})
		defer relRes()
		if _, err := held.Struct(); err != nil {
			errText = err.Error()
		}
	})
	if !strings.Contains(errText, "unsettled") {
		t.Fatalf("getHeld() of a pending pipelined result: got error %q, want a refusal", errText)
	}
	if s.fail != nil {
		t.Fatal(s.fail)
	}
	o.Release()
	for _, obj := range s.objects {
		if !obj.shutdown {
			t.Fatalf("object o%d still alive after its last reference was dropped", obj.id)
		}
	}
}
