// Package callqueue holds calls made on a capability that is not known yet
// and delivers them, in the order they were made, once it is.
//
// It replaces go-capnp's AnswerQueue (behind capnp.NewLocalPromise), which
// dereferences the nil PipelineCaller that a delivery returns when the call
// completes at once (go-capnp's own imports, error clients and released
// clients all do), and which frees its resolution when the first reference
// to the promise is released while copies may still deliver through it.
//
// Calls pipelined on a queued call's results wait on that call: they are
// delivered, in order, right after it.
package callqueue

import (
	"context"
	"errors"
	"sync"

	"capnproto.org/go/capnp/v3"
)

// Queue holds calls until Fulfill or Reject, then delivers them. Calls
// that arrive while it delivers wait behind the ones already queued, so
// E-order holds across settling. The zero value is an empty, unsettled
// queue.
type Queue struct {
	mu       sync.Mutex
	calls    []queued
	settled  bool
	draining bool
	target   capnp.Client // owned; valid once settled without error
	err      error
	// dropTarget: nothing can reach the queue any more, so the target
	// goes as soon as the queued calls have been delivered.
	dropTarget bool
}

type queued struct {
	ctx  context.Context
	r    capnp.Recv
	pipe *pipe // where calls pipelined on this call's results wait
}

// Recv queues r, or delivers it if the queue has settled and drained.
// The PipelineCaller it returns is never nil.
func (q *Queue) Recv(ctx context.Context, r capnp.Recv) capnp.PipelineCaller {
	q.mu.Lock()
	if !q.settled || q.draining {
		p := new(pipe)
		q.calls = append(q.calls, queued{ctx: ctx, r: r, pipe: p})
		q.mu.Unlock()
		return p
	}
	target, err := q.target, q.err
	q.mu.Unlock()
	return deliver(ctx, target, err, r)
}

// Send is Recv for a call made through capnp.Client.SendCall.
func (q *Queue) Send(ctx context.Context, s capnp.Send) (*capnp.Answer, capnp.ReleaseFunc) {
	return SendAsRecv(ctx, s, q.Recv)
}

// Fulfill delivers every queued call to target, in order, and later calls
// directly. The queue keeps its own reference to target until Drop.
func (q *Queue) Fulfill(target capnp.Client) { q.settle(target.AddRef(), nil) }

// Reject fails every queued call, and later ones, with err.
func (q *Queue) Reject(err error) {
	if err == nil {
		err = errors.New("callqueue: rejected with a nil error")
	}
	q.settle(capnp.Client{}, err)
}

// Settled reports whether Fulfill or Reject has been called.
func (q *Queue) Settled() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.settled
}

func (q *Queue) settle(target capnp.Client, err error) {
	q.mu.Lock()
	if q.settled {
		q.mu.Unlock()
		target.Release()
		return
	}
	q.settled, q.draining, q.target, q.err = true, true, target, err
	for len(q.calls) > 0 {
		calls := q.calls
		q.calls = nil
		q.mu.Unlock()
		for _, c := range calls {
			deliverQueued(c, target, err)
		}
		q.mu.Lock()
	}
	q.draining = false
	q.releaseIfDroppedLocked()
}

// releaseIfDroppedLocked releases the target, and q.mu, once the queue
// has no more use for the target.
func (q *Queue) releaseIfDroppedLocked() {
	var target capnp.Client
	if q.dropTarget && q.settled && !q.draining {
		target, q.target = q.target, capnp.Client{}
	}
	q.mu.Unlock()
	target.Release()
}

// Drop tells the queue that no new call can reach it: the target is
// released once the calls already queued have been delivered (they still
// are, when the queue settles).
func (q *Queue) Drop() {
	q.mu.Lock()
	q.dropTarget = true
	q.releaseIfDroppedLocked()
}

// deliverQueued delivers a call that waited in the queue; calls pipelined
// on it follow.
func deliverQueued(c queued, target capnp.Client, err error) {
	if err != nil {
		c.r.Reject(err)
		c.pipe.settle(modeFailed, nil, capnp.Struct{}, err)
		return
	}
	deliverWatched(c.pipe, c.r, func(r capnp.Recv) capnp.PipelineCaller { return target.RecvCall(c.ctx, r) })
}

// deliverWatched delivers a call that others may be pipelining on through
// p, and settles p from whichever comes first: the call's return, or the
// pipeline caller its delivery returns.
func deliverWatched(p *pipe, r capnp.Recv, send func(capnp.Recv) capnp.PipelineCaller) {
	r.Returner = &watchReturner{inner: r.Returner, pipe: p}
	pc := send(r)
	if _, aq := pc.(*capnp.AnswerQueue); aq {
		// go-capnp's own queue (server.Server, local promises) crashes
		// when a call it holds completes at once; pipelined calls wait
		// for the results instead, which the returner gives us.
		return
	}
	if pc != nil {
		p.settle(modeCaller, NonNil(pc), capnp.Struct{}, nil)
	} else {
		// Returned at once, so the returner has settled p, unless the
		// callee broke the contract (nil caller without a return).
		p.settle(modeFailed, nil, capnp.Struct{}, errors.New("callee returned no pipeline caller and no results"))
	}
}

func deliver(ctx context.Context, target capnp.Client, err error, r capnp.Recv) capnp.PipelineCaller {
	if err != nil {
		r.Reject(err)
		return Failed(err)
	}
	return NonNil(target.RecvCall(ctx, r))
}

// pipe is the PipelineCaller of a queued call: calls pipelined on it wait
// until the call is delivered, then follow it, either through the caller
// its delivery returned or, for a call that returned at once (nil
// caller), through the capabilities in its results.
type pipe struct {
	mu       sync.Mutex
	calls    []piped
	mode     pipeMode
	draining bool
	pc       capnp.PipelineCaller // modeCaller
	results  capnp.Struct         // modeResults, until the callee releases them
	err      error                // modeFailed
}

type pipeMode uint8

const (
	modeWaiting pipeMode = iota
	modeCaller
	modeResults
	modeFailed
)

type piped struct {
	ctx       context.Context
	transform []capnp.PipelineOp
	r         capnp.Recv
	pipe      *pipe
}

func (p *pipe) PipelineRecv(ctx context.Context, transform []capnp.PipelineOp, r capnp.Recv) capnp.PipelineCaller {
	p.mu.Lock()
	if p.mode == modeWaiting || p.draining {
		child := new(pipe)
		p.calls = append(p.calls, piped{ctx: ctx, transform: transform, r: r, pipe: child})
		p.mu.Unlock()
		return child
	}
	if p.mode == modeResults {
		// Take the capability while the results are certainly alive.
		c, err := resultsCaller{p.results}.client(transform)
		c = c.AddRef()
		p.mu.Unlock()
		defer c.Release()
		if err != nil {
			r.Reject(err)
			return Failed(err)
		}
		return NonNil(c.RecvCall(ctx, r))
	}
	pc := p.target()
	p.mu.Unlock()
	return pc.PipelineRecv(ctx, transform, r)
}

func (p *pipe) PipelineSend(ctx context.Context, transform []capnp.PipelineOp, s capnp.Send) (*capnp.Answer, capnp.ReleaseFunc) {
	return SendAsRecv(ctx, s, func(ctx context.Context, r capnp.Recv) capnp.PipelineCaller {
		return p.PipelineRecv(ctx, transform, r)
	})
}

// target returns where pipelined calls go in the current mode; p.mu held.
func (p *pipe) target() capnp.PipelineCaller {
	switch p.mode {
	case modeCaller:
		return p.pc
	case modeResults:
		return resultsCaller{p.results}
	default:
		return Failed(p.err)
	}
}

// settle moves p out of the waiting state (the first settlement wins)
// and delivers the calls waiting on it, in order.
func (p *pipe) settle(mode pipeMode, pc capnp.PipelineCaller, results capnp.Struct, err error) {
	p.mu.Lock()
	if p.mode != modeWaiting {
		p.mu.Unlock()
		return
	}
	p.mode, p.pc, p.results, p.err, p.draining = mode, pc, results, err, true
	for len(p.calls) > 0 {
		calls := p.calls
		p.calls = nil
		target := p.target()
		p.mu.Unlock()
		for _, c := range calls {
			deliverWatched(c.pipe, c.r, func(r capnp.Recv) capnp.PipelineCaller {
				return target.PipelineRecv(c.ctx, c.transform, r)
			})
		}
		p.mu.Lock()
	}
	p.draining = false
	p.mu.Unlock()
}

// resultsReleased is called before the callee releases the results that
// p may be pipelining on: calls racing past that point fail.
func (p *pipe) resultsReleased() {
	p.mu.Lock()
	if p.mode == modeResults {
		p.mode, p.results = modeFailed, capnp.Struct{}
		p.err = errors.New("pipelined call arrived after its call's results were released")
	}
	p.mu.Unlock()
}

// resultsCaller pipelines on a call's returned results.
type resultsCaller struct{ results capnp.Struct }

func (rc resultsCaller) client(transform []capnp.PipelineOp) (capnp.Client, error) {
	ptr, err := capnp.Transform(rc.results.ToPtr(), transform)
	if err != nil {
		return capnp.Client{}, err
	}
	return ptr.Interface().Client(), nil
}

func (rc resultsCaller) PipelineRecv(ctx context.Context, transform []capnp.PipelineOp, r capnp.Recv) capnp.PipelineCaller {
	c, err := rc.client(transform)
	if err != nil {
		r.Reject(err)
		return Failed(err)
	}
	return NonNil(c.RecvCall(ctx, r))
}

func (rc resultsCaller) PipelineSend(ctx context.Context, transform []capnp.PipelineOp, s capnp.Send) (*capnp.Answer, capnp.ReleaseFunc) {
	c, err := rc.client(transform)
	if err != nil {
		return capnp.ErrorAnswer(s.Method, err), func() {}
	}
	return c.SendCall(ctx, s)
}

// watchReturner passes a queued call's return through to the caller's
// Returner, first letting calls pipelined on the queued call follow it to
// the capabilities in its results.
type watchReturner struct {
	inner   capnp.Returner
	pipe    *pipe
	results capnp.Struct
	err     error
}

func (w *watchReturner) AllocResults(sz capnp.ObjectSize) (capnp.Struct, error) {
	s, err := w.inner.AllocResults(sz)
	w.results = s
	return s, err
}

func (w *watchReturner) PrepareReturn(err error) {
	w.err = err
	w.inner.PrepareReturn(err)
}

func (w *watchReturner) Return() {
	if w.err != nil {
		w.pipe.settle(modeFailed, nil, capnp.Struct{}, w.err)
	} else {
		w.pipe.settle(modeResults, nil, w.results, nil)
	}
	w.inner.Return()
}

func (w *watchReturner) ReleaseResults() {
	w.pipe.resultsReleased()
	w.inner.ReleaseResults()
}

// Held is the PipelineCaller of a call its callee holds before
// delivering it (a native object's call pipelined on a call that is
// still queued): calls pipelined on the held call wait in it, then follow
// the call once Deliver or Fail settles it.
type Held struct{ p *pipe }

// NewHeld returns a Held for one call.
func NewHeld() Held { return Held{new(pipe)} }

// Caller is the PipelineCaller to return for the held call meanwhile.
func (h Held) Caller() capnp.PipelineCaller { return h.p }

// Deliver delivers r through send; the calls pipelined on it follow,
// through the caller send returns or the capabilities in r's results.
func (h Held) Deliver(r capnp.Recv, send func(capnp.Recv) capnp.PipelineCaller) {
	deliverWatched(h.p, r, send)
}

// Fail rejects r with err, and the calls pipelined on it.
func (h Held) Fail(r capnp.Recv, err error) {
	r.Reject(err)
	h.p.settle(modeFailed, nil, capnp.Struct{}, err)
}

// Guard wraps the hook of a go-capnp server (server.Server) so that calls
// pipelined on its calls wait here for the call's results, never in the
// server's own AnswerQueue. That queue dereferences the nil caller of a
// queued call that completes at once, which happens whenever the result
// is a go-capnp import whose call returns before the import's Recv looks
// (a fast peer, a preempted goroutine): a crash that depends on timing.
func Guard(h capnp.ClientHook) capnp.ClientHook { return &guard{h} }

type guard struct{ capnp.ClientHook }

func (g *guard) Recv(ctx context.Context, r capnp.Recv) capnp.PipelineCaller {
	if _, watched := r.Returner.(*watchReturner); watched {
		// Delivered from one of our queues, whose pipe already waits for
		// the results (deliverWatched ignores the server's AnswerQueue).
		// A second pipe here would fail calls that the outer one drains
		// into it after the results were released.
		return g.ClientHook.Recv(ctx, r)
	}
	p := new(pipe)
	deliverWatched(p, r, func(r capnp.Recv) capnp.PipelineCaller { return g.ClientHook.Recv(ctx, r) })
	return p
}

func (g *guard) Send(ctx context.Context, s capnp.Send) (*capnp.Answer, capnp.ReleaseFunc) {
	return SendAsRecv(ctx, s, g.Recv)
}

// SendAsRecv turns a Send into a Recv for hooks that only implement Recv:
// it places the arguments in a fresh message and collects the results in
// an answer.
func SendAsRecv(ctx context.Context, s capnp.Send, recv func(context.Context, capnp.Recv) capnp.PipelineCaller) (*capnp.Answer, capnp.ReleaseFunc) {
	_, seg := capnp.NewMultiSegmentMessage(nil)
	args, err := capnp.NewRootStruct(seg, s.ArgsSize)
	if err == nil && s.PlaceArgs != nil {
		err = s.PlaceArgs(args)
	}
	if err != nil {
		args.Message().Release()
		return capnp.ErrorAnswer(s.Method, err), func() {}
	}
	ret := new(capnp.StructReturner)
	pcall := recv(ctx, capnp.Recv{Method: s.Method, Args: args, ReleaseArgs: args.Message().Release, Returner: ret})
	return ret.Answer(s.Method, pcall)
}

// NonNil stands in for the nil PipelineCaller of a call that returned at
// once, with a caller that fails pipelined calls: callers up the chain
// (go-capnp's AnswerQueue among them) call whatever a delivery returns.
func NonNil(pc capnp.PipelineCaller) capnp.PipelineCaller {
	switch pc.(type) {
	case nil:
		return Failed(errors.New("pipelined call on a call that already returned"))
	case safeCaller, failedPipeline, *pipe:
		return pc
	default:
		return safeCaller{pc}
	}
}

// safeCaller passes pipelined calls to pc and never returns a nil caller:
// an answer's PipelineRecv returns whatever its resolution's Recv does.
type safeCaller struct{ pc capnp.PipelineCaller }

func (s safeCaller) PipelineSend(ctx context.Context, t []capnp.PipelineOp, send capnp.Send) (*capnp.Answer, capnp.ReleaseFunc) {
	return s.pc.PipelineSend(ctx, t, send)
}

func (s safeCaller) PipelineRecv(ctx context.Context, t []capnp.PipelineOp, r capnp.Recv) capnp.PipelineCaller {
	return NonNil(s.pc.PipelineRecv(ctx, t, r))
}

// Failed returns a PipelineCaller that fails every pipelined call with err.
func Failed(err error) capnp.PipelineCaller { return failedPipeline{err} }

type failedPipeline struct{ err error }

func (f failedPipeline) PipelineSend(ctx context.Context, _ []capnp.PipelineOp, s capnp.Send) (*capnp.Answer, capnp.ReleaseFunc) {
	return capnp.ErrorAnswer(s.Method, f.err), func() {}
}

func (f failedPipeline) PipelineRecv(ctx context.Context, _ []capnp.PipelineOp, r capnp.Recv) capnp.PipelineCaller {
	r.Reject(f.err)
	return f
}

// Promise is a capability whose calls queue until it is resolved. Unlike
// capnp.NewLocalPromise, calls queued on it are delivered even when every
// reference to the promise has been dropped, and a delivery that completes
// at once is not a crash.
type Promise struct {
	queue    Queue
	resolver capnp.Resolver[capnp.Client]
}

// NewPromise returns a promised client and the Promise that settles it.
// Exactly one of Fulfill or Reject should be called.
func NewPromise() (capnp.Client, *Promise) {
	p := new(Promise)
	client, resolver := capnp.NewPromisedClient(&promiseHook{q: &p.queue})
	p.resolver = resolver
	return client, p
}

// Fulfill delivers the queued calls to target, in order, then resolves the
// promise to it. It does not take ownership of target.
func (p *Promise) Fulfill(target capnp.Client) {
	p.queue.Fulfill(target)
	p.resolver.Fulfill(target)
}

// Reject fails the queued calls and breaks the promise with err.
func (p *Promise) Reject(err error) {
	p.queue.Reject(err)
	p.resolver.Reject(err)
}

type promiseHook struct{ q *Queue }

// Unsettled reports whether b is the brand of a promise from NewPromise
// that has not been fulfilled or rejected yet.
func Unsettled(b capnp.Brand) bool {
	h, ok := b.Value.(*promiseHook)
	return ok && !h.q.Settled()
}

func (h *promiseHook) Send(ctx context.Context, s capnp.Send) (*capnp.Answer, capnp.ReleaseFunc) {
	return h.q.Send(ctx, s)
}

func (h *promiseHook) Recv(ctx context.Context, r capnp.Recv) capnp.PipelineCaller {
	return h.q.Recv(ctx, r)
}

func (h *promiseHook) Brand() capnp.Brand { return capnp.Brand{Value: h} }
func (h *promiseHook) String() string     { return "local promise" }

// Shutdown runs when no reference can reach the hook any more. Calls
// already queued still go wherever the promise settles; once it has,
// the queue's reference to the target is dropped.
func (h *promiseHook) Shutdown() { h.q.Drop() }
