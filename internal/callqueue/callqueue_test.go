package callqueue_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"

	"capnproto.org/go/capnp/v3"
	"go.uber.org/goleak"

	"github.com/captp-go/captp/internal/callqueue"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var method = capnp.Method{InterfaceID: 0xabcd, MethodID: 1, InterfaceName: "T", MethodName: "call"}

// recorder is a capability that records the first word of each call's
// arguments and returns a fresh recorder (so calls can pipeline on it).
// It returns a nil PipelineCaller, as go-capnp's own imports do for calls
// that completed at once.
type recorder struct {
	name string
	w    *world
}

// world is what every recorder of a test shares.
type world struct {
	mu       sync.Mutex
	log      []string
	shutdown int
}

func (w *world) snapshot() ([]string, int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.log), w.shutdown
}

func newRecorder(name string, w *world) capnp.Client {
	return capnp.NewClient(&recorder{name: name, w: w})
}

func (o *recorder) Send(ctx context.Context, s capnp.Send) (*capnp.Answer, capnp.ReleaseFunc) {
	return callqueue.SendAsRecv(ctx, s, o.Recv)
}

func (o *recorder) Recv(ctx context.Context, r capnp.Recv) capnp.PipelineCaller {
	o.w.mu.Lock()
	o.w.log = append(o.w.log, fmt.Sprintf("%s:%d", o.name, r.Args.Uint64(0)))
	o.w.mu.Unlock()
	n := r.Args.Uint64(0)
	r.ReleaseArgs()
	res, err := r.Returner.AllocResults(capnp.ObjectSize{PointerCount: 1})
	if err == nil {
		child := newRecorder(fmt.Sprintf("%s/%d", o.name, n), o.w)
		id := res.Message().CapTable().Add(child)
		err = res.SetPtr(0, capnp.NewInterface(res.Segment(), id).ToPtr())
	}
	r.Returner.PrepareReturn(err)
	r.Returner.Return()
	r.Returner.ReleaseResults()
	return nil // completed at once: the case go-capnp's AnswerQueue crashes on
}

func (o *recorder) Brand() capnp.Brand { return capnp.Brand{Value: o} }
func (o *recorder) String() string     { return "recorder " + o.name }
func (o *recorder) Shutdown() {
	o.w.mu.Lock()
	o.w.shutdown++
	o.w.mu.Unlock()
}

func call(ctx context.Context, c capnp.Client, n uint64) (*capnp.Answer, capnp.ReleaseFunc) {
	return c.SendCall(ctx, capnp.Send{
		Method:    method,
		ArgsSize:  capnp.ObjectSize{DataSize: 8},
		PlaceArgs: func(s capnp.Struct) error { s.SetUint64(0, n); return nil },
	})
}

func pipelined(ctx context.Context, a *capnp.Answer, n uint64) (*capnp.Answer, capnp.ReleaseFunc) {
	return call(ctx, a.Future().Field(0, nil).Client(), n)
}

func await(t *testing.T, a *capnp.Answer) {
	t.Helper()
	if _, err := a.Struct(); err != nil {
		t.Fatalf("call failed: %v", err)
	}
}

func TestPromiseDeliversQueuedCallsInOrderThenDirect(t *testing.T) {
	ctx := context.Background()
	w := new(world)
	p, res := callqueue.NewPromise()
	var rels []capnp.ReleaseFunc
	var answers []*capnp.Answer
	for i := uint64(1); i <= 3; i++ {
		a, rel := call(ctx, p, i)
		answers, rels = append(answers, a), append(rels, rel)
	}
	// Pipelined on a queued call: waits for it, then follows it.
	a, rel := pipelined(ctx, answers[1], 20)
	answers, rels = append(answers, a), append(rels, rel)
	a, rel = pipelined(ctx, a, 200)
	answers, rels = append(answers, a), append(rels, rel)
	if log, _ := w.snapshot(); len(log) != 0 {
		t.Fatalf("calls delivered before the promise settled: %v", log)
	}
	target := newRecorder("t", w)
	res.Fulfill(target)
	a, rel = call(ctx, p, 4)
	answers, rels = append(answers, a), append(rels, rel)
	for _, a := range answers {
		await(t, a)
	}
	log, _ := w.snapshot()
	want := []string{"t:1", "t:2", "t/2:20", "t/2/20:200", "t:3", "t:4"}
	if !slices.Equal(log, want) {
		t.Errorf("delivery order %v, want %v", log, want)
	}
	for _, r := range rels {
		r()
	}
	p.Release()
	target.Release()
	// t and the six children its calls returned.
	if _, shut := w.snapshot(); shut != 7 {
		t.Errorf("%d recorders shut down, want 7 (references leaked or double-released)", shut)
	}
}

func TestPromiseRejectFailsQueuedAndLaterCalls(t *testing.T) {
	ctx := context.Background()
	p, res := callqueue.NewPromise()
	defer p.Release()
	a1, r1 := call(ctx, p, 1)
	defer r1()
	a2, r2 := pipelined(ctx, a1, 2)
	defer r2()
	boom := errors.New("boom")
	res.Reject(boom)
	a3, r3 := call(ctx, p, 3)
	defer r3()
	for i, a := range []*capnp.Answer{a1, a2, a3} {
		if _, err := a.Struct(); err == nil {
			t.Errorf("call %d on a rejected promise succeeded", i+1)
		}
	}
	if _, err := a1.Struct(); !errors.Is(err, boom) {
		t.Errorf("queued call failed with %v, want %v", err, boom)
	}
}

// Calls queued on a promise are delivered even if every reference to the
// promise is dropped before it settles, and the target is then released.
func TestPromiseDroppedBeforeSettleStillDelivers(t *testing.T) {
	ctx := context.Background()
	w := new(world)
	p, res := callqueue.NewPromise()
	a, rel := call(ctx, p, 7)
	p.Release()
	target := newRecorder("t", w)
	res.Fulfill(target)
	target.Release()
	await(t, a)
	rel()
	log, shut := w.snapshot()
	if !slices.Equal(log, []string{"t:7"}) {
		t.Errorf("log %v, want [t:7]", log)
	}
	if shut != 2 {
		t.Errorf("%d recorders shut down, want 2 (the queue kept its target)", shut)
	}
}

// Calls racing the settlement from other goroutines keep per-goroutine
// order.
func TestPromiseConcurrentCallsKeepOrder(t *testing.T) {
	ctx := context.Background()
	w := new(world)
	p, res := callqueue.NewPromise()
	target := newRecorder("t", w)
	const callers, perCaller = 4, 50
	var wg sync.WaitGroup
	for g := range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range perCaller {
				a, rel := call(ctx, p, uint64(g*1000+i))
				if _, err := a.Struct(); err != nil {
					t.Errorf("call: %v", err)
				}
				rel()
			}
		}()
	}
	res.Fulfill(target)
	wg.Wait()
	p.Release()
	target.Release()
	log, _ := w.snapshot()
	last := map[int]int{}
	for _, e := range log {
		var n int
		fmt.Sscanf(e, "t:%d", &n)
		g, i := n/1000, n%1000
		if prev, ok := last[g]; ok && i <= prev {
			t.Fatalf("caller %d: call %d delivered after %d", g, i, prev)
		}
		last[g] = i
	}
	if len(log) != callers*perCaller {
		t.Errorf("%d calls delivered, want %d", len(log), callers*perCaller)
	}
}

func TestNonNil(t *testing.T) {
	pc := callqueue.NonNil(nil)
	if pc == nil {
		t.Fatal("NonNil(nil) returned nil")
	}
	var got error
	r := capnp.Recv{Method: method, ReleaseArgs: func() {}, Returner: rejectRecorder{&got}}
	if next := pc.PipelineRecv(context.Background(), nil, r); next == nil {
		t.Error("failed pipeline returned a nil caller")
	}
	if got == nil {
		t.Error("a call pipelined on a call that returned at once did not fail")
	}
}

type rejectRecorder struct{ err *error }

func (r rejectRecorder) AllocResults(capnp.ObjectSize) (capnp.Struct, error) {
	return capnp.Struct{}, errors.New("unexpected")
}
func (r rejectRecorder) PrepareReturn(err error) { *r.err = err }
func (r rejectRecorder) Return()                 {}
func (r rejectRecorder) ReleaseResults()         {}

// A call pipelined on a queued call delivered to a generated server waits
// for that call's results instead of going into go-capnp's server queue,
// which dereferences the nil caller of a delivery that completes at once
// (the recorder's, like go-capnp's own imports').
func TestPipelineOnServerCallWhoseResultReturnsAtOnce(t *testing.T) {
	ctx := context.Background()
	w := new(world)
	rec := newRecorder("r", w)
	obj := testimpl.New("holder", nil)
	srv := capnp.Client(obj.Client())
	defer srv.Release()
	hf, hrel := testcapnp.Test(srv).Hold(ctx, func(p testcapnp.Test_hold_Params) error {
		return p.SetCap(testcapnp.Test(rec.AddRef()))
	})
	if _, err := hf.Struct(); err != nil {
		t.Fatal(err)
	}
	hrel()
	rec.Release()

	p, res := callqueue.NewPromise()
	defer p.Release()
	gf, grel := testcapnp.Test(p).GetHeld(ctx, nil)
	defer grel()
	a, rel := call(ctx, capnp.Client(gf.Cap()), 5)
	defer rel()
	res.Fulfill(srv)
	await(t, a)
	if log, _ := w.snapshot(); !slices.Equal(log, []string{"r:5"}) {
		t.Errorf("log %v, want [r:5]", log)
	}
}

// aqServer completes calls the way go-capnp's server.Server does: its Recv
// returns a capnp.AnswerQueue for calls pipelined on the call, and finish
// fulfills that queue between PrepareReturn and Return.
type aqServer struct{ calls chan aqCall }

type aqCall struct {
	r  capnp.Recv
	aq *capnp.AnswerQueue
}

func (s *aqServer) Recv(ctx context.Context, r capnp.Recv) capnp.PipelineCaller {
	aq := capnp.NewAnswerQueue(r.Method)
	s.calls <- aqCall{r, aq}
	return aq
}

func (s *aqServer) Send(ctx context.Context, send capnp.Send) (*capnp.Answer, capnp.ReleaseFunc) {
	return callqueue.SendAsRecv(ctx, send, s.Recv)
}

func (s *aqServer) Brand() capnp.Brand { return capnp.Brand{Value: s} }
func (s *aqServer) String() string     { return "answer-queue server" }
func (s *aqServer) Shutdown()          {}

// finish returns results holding result, as server.Server's handleCall does.
func (c aqCall) finish(t *testing.T, result capnp.Client) {
	t.Helper()
	c.r.ReleaseArgs()
	res, err := c.r.Returner.AllocResults(capnp.ObjectSize{PointerCount: 1})
	if err == nil {
		id := res.Message().CapTable().Add(result)
		err = res.SetPtr(0, capnp.NewInterface(res.Segment(), id).ToPtr())
	}
	if err != nil {
		t.Fatal(err)
	}
	c.r.Returner.PrepareReturn(nil)
	c.aq.Fulfill(res.ToPtr()) // crashes if it holds a call whose delivery returns nil
	c.r.Returner.Return()
	c.r.Returner.ReleaseResults()
}

// A call pipelined on a guarded server's unreturned call waits for the
// call's results in the guard, not in the server's AnswerQueue, so its
// delivery to a result that completes it at once (the recorder, as
// go-capnp's imports do when the Return beat them) does not crash.
func TestGuardKeepsPipelinedCallsOutOfAnswerQueue(t *testing.T) {
	ctx := context.Background()
	w := new(world)
	srv := &aqServer{calls: make(chan aqCall, 1)}
	c := capnp.NewClient(callqueue.Guard(srv))
	defer c.Release()
	// Released at the end, not deferred: a release waits for its call,
	// so a deferred one would turn the crash this test looks for into a
	// hang.
	a, rel := call(ctx, c, 1)
	p, prel := pipelined(ctx, a, 2)
	sc := <-srv.calls
	if log, _ := w.snapshot(); len(log) != 0 {
		t.Fatalf("pipelined call delivered before its call returned: %v", log)
	}
	sc.finish(t, newRecorder("r", w))
	await(t, a)
	await(t, p)
	q, qrel := pipelined(ctx, a, 3) // after the Return: straight to the result
	await(t, q)
	if log, _ := w.snapshot(); !slices.Equal(log, []string{"r:2", "r:3"}) {
		t.Errorf("log %v, want [r:2 r:3]", log)
	}
	qrel()
	prel()
	rel()
}
