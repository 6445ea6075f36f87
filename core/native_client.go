package core

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/core/flow"
)

// The native client path: Call sends a call to a captp import (or a
// promised answer) without go-capnp's Client.SendCall, Promise and Answer
// machinery, and returns the question itself as the pending call. Code
// generated for captp would call it from typed stubs; capnpc-go's
// generated clients keep working through the ordinary path.

// PendingCall is a call sent with Call. It is a small value (copy it
// freely); Release must be called once the results are no longer needed,
// and makes them invalid.
type PendingCall struct {
	q   *question     // a native question (the common case)
	ans *capnp.Answer // the fallback: a call go-capnp sent
	rel capnp.ReleaseFunc
	err error // the call could not be sent
}

// nativeQuestion is what a native question has instead of a promise.
type nativeQuestion struct {
	// done holds a channel closed once the question is settled: made
	// only for a caller that must block on it (doneChan), because most
	// find the call settled or read its Return themselves; settledDone
	// once settled.
	done atomic.Pointer[chan struct{}]

	// flow is the flow-control acknowledgement of the call, called once
	// the Return arrives (or the call fails); acked says that happened
	// before flow was set.
	flow  func()
	acked bool
	// pipelines are the hooks of promises handed out by Pipeline before
	// the Return, settled with the capabilities in the results; the
	// first is kept in pipeBuf (most calls pipeline on one field).
	pipelines []*nativePipeline
	pipeBuf   [1]*nativePipeline
	// pipeRefs counts live pipeline hooks: the question is finished only
	// once the caller and every pipeline client have let go.
	pipeRefs       int
	callerReleased bool

	// Taken under c.mu when the question settles, run after the unlock.
	settleFlow      func()
	settlePipelines []*nativePipeline
}

// newNativeQuestionLocked allocates a question id for a native call.
func (c *Conn) newNativeQuestionLocked(m capnp.Method) *question {
	nq := &struct {
		q question
		n nativeQuestion
	}{} // one allocation for both
	q := &nq.q
	*q = question{c: c, id: c.questionIDs.get(), method: m, native: &nq.n}
	c.questions[q.id] = q
	return q
}

// Call sends a call to target. When target is a capability imported by a
// captp connection (or a promise for a result of a captp call), the call
// goes out with no go-capnp promise, answer or goroutine: the question
// itself is the pending call. Otherwise (a local object, another RPC
// implementation) it falls back to target.SendCall. s.PlaceArgs fills the
// arguments, as with SendCall; it must not block.
func Call(ctx context.Context, target capnp.Client, s capnp.Send) PendingCall {
	snap := target.Snapshot()
	var (
		c *Conn
		t callTarget
	)
	switch h := snap.Brand().Value.(type) {
	case *importClient:
		c, t = h.c, callTarget{importID: h.id, lim: h.lim}
	case *bootstrapHook:
		c, t = h.q.c, callTarget{question: h.q}
	case *nativePipeline:
		c, t = h.q.c, callTarget{question: h.q, transform: h.transform}
	}
	snap.Release()
	if c == nil {
		ans, rel := target.SendCall(ctx, s)
		return PendingCall{ans: ans, rel: rel}
	}
	return c.send(ctx, t, s, true)
}

// startFlow applies the import's flow control to a native call after it
// was sent, as go-capnp's SendCall does: the caller waits while the
// object's window is full.
func (c *Conn) startFlow(ctx context.Context, q *question, lim *flow.Limiter, size uint64) {
	done, ok := lim.TryStartMessage(size)
	if !ok {
		// The window opens as Returns arrive: calls still corked must go
		// out, and someone must read while this caller blocks.
		c.uncork()
		c.read.wakeLoop()
		var err error
		if done, err = lim.StartMessage(ctx, size); err != nil {
			return // ctx ended; the call itself reports that
		}
	}
	c.mu.Lock()
	n := q.native
	if n.acked {
		c.unlock()
		done()
		return
	}
	n.flow = done
	c.unlock()
}

// takeLocked moves what settling runs (flow acknowledgement, pipeline
// promises) out of the shared fields, under c.mu.
func (n *nativeQuestion) takeLocked() {
	n.acked = true
	n.settleFlow, n.flow = n.flow, nil
	n.settlePipelines, n.pipelines = n.pipelines, nil
}

// failNativeLocked settles a native question with err (cancellation,
// shutdown, a call that could not be sent).
func (q *question) failNativeLocked(fx *effects, err error) {
	q.c.interruptReaderLocked(q)
	q.resultErr = err
	n := q.native
	n.takeLocked()
	fx.add(func() { n.settle(capnp.Ptr{}, err) })
}

// settle runs outside c.mu once the question is settled: the caller's
// Wait returns, pipeline promises resolve.
func (n *nativeQuestion) settle(content capnp.Ptr, rerr error) {
	if f := n.settleFlow; f != nil {
		n.settleFlow = nil
		f()
	}
	pipes := n.settlePipelines
	n.settlePipelines = nil
	for _, p := range pipes {
		r := p.resolver
		p.resolver = nil // the hook may live on; the promise is settled
		if rerr != nil {
			breakPromises(rerr, r)
			continue
		}
		ptr, err := capnp.Transform(content, p.transform)
		if err != nil {
			breakPromises(fmt.Errorf("captp: pipelined capability: %w", err), r)
			continue
		}
		// Fulfill takes a reference of its own; the results hold this
		// one until the caller releases them, which waits for settling.
		r.Fulfill(ptr.Interface().Client())
	}
	n.markDone()
}

// settledDone is nativeQuestion.done once the question is settled.
var settledDone = &closedChan

// markDone records that the question is settled and wakes whoever waits.
func (n *nativeQuestion) markDone() {
	if p := n.done.Swap(settledDone); p != nil && p != settledDone {
		close(*p)
	}
}

// isDone reports whether the question is settled. What settling set is
// visible once it reports true, as after receiving from doneChan.
func (n *nativeQuestion) isDone() bool { return n.done.Load() == settledDone }

// doneChan returns a channel closed once the question is settled.
func (n *nativeQuestion) doneChan() <-chan struct{} {
	p := n.done.Load()
	if p == nil {
		ch := make(chan struct{})
		if n.done.CompareAndSwap(nil, &ch) {
			return ch
		}
		p = n.done.Load() // another waiter's, or settledDone
	}
	return *p
}

// Err reports whether the call could not be sent at all.
func (p PendingCall) Err() error { return p.err }

// Done is closed once the call has settled (returned, failed or been
// cancelled): Wait then returns at once.
func (p PendingCall) Done() <-chan struct{} { return p.done() }

// done is closed once the call has settled (returned, failed or been
// cancelled).
func (p PendingCall) done() <-chan struct{} {
	switch {
	case p.q != nil:
		p.q.c.uncork()
		p.q.c.read.wakeLoop() // whoever selects on it does not read
		return p.q.native.doneChan()
	case p.ans != nil:
		return p.ans.Done()
	}
	return closedChan
}

// Wait blocks until the call returns or ctx ends, and returns the
// results, which stay valid until Release. Ending ctx stops only the
// wait; the call is cancelled through the context it was sent with.
//
// When this is the connection's only call outstanding and the
// connection is otherwise quiet, Wait reads the Return from the
// transport itself instead of waiting for the connection's read loop to
// hand it over (one thread wake-up less per call); it then also handles
// whatever else arrives meanwhile, as the read loop would. That needs
// ctx to be the call's own context or one that never ends, and, if it
// can end, a transport with SetReadDeadline (to interrupt the read).
func (p PendingCall) Wait(ctx context.Context) (capnp.Struct, error) {
	if p.err != nil {
		return capnp.Struct{}, p.err
	}
	if p.ans != nil {
		select {
		case <-p.ans.Done():
		case <-ctx.Done():
			return capnp.Struct{}, ctx.Err()
		}
		return p.ans.Struct()
	}
	p.q.wait(ctx)
	if ctx.Err() != nil && !p.q.native.isDone() {
		return capnp.Struct{}, ctx.Err()
	}
	// done was closed after these were set under c.mu, and they change
	// again only once the caller releases the question.
	q := p.q
	if q.resultErr != nil {
		return capnp.Struct{}, q.resultErr
	}
	return q.resultContent.Struct(), nil
}

// wait blocks until q settles or ctx ends. When neither ctx nor the
// context q was sent with can end, and the connection is otherwise quiet,
// the caller reads its Return itself (see readRole).
func (q *question) wait(ctx context.Context) {
	q.c.uncork()
	n := q.native
	if n.isDone() {
		return
	}
	r := &q.c.read
	if q.c.canReadFor(q, ctx) && q.c.readForCaller(q) {
		return
	}
	r.wakeLoop()
	select {
	case <-n.doneChan():
	case <-ctx.Done():
	}
}

// Release tells the connection the results are no longer needed: Finish
// goes out (now, or at the Return), as for go-capnp's ReleaseFunc.
// Releasing twice is harmless.
func (p PendingCall) Release() {
	switch {
	case p.q != nil:
		q := p.q
		c := q.c
		c.uncork() // a call released unawaited still goes out now
		var fx effects
		c.mu.Lock()
		if !q.native.callerReleased {
			q.native.callerReleased = true
			if q.native.pipeRefs == 0 {
				q.releaseNativeLocked(&fx)
			}
		}
		c.unlock()
		fx.run()
	case p.rel != nil:
		p.rel()
	}
}

// releaseNativeLocked is question.release for a native question whose
// caller and pipeline clients have all let go.
func (q *question) releaseNativeLocked(fx *effects) {
	if q.released {
		return
	}
	q.released = true
	q.cancelIfEndedLocked(fx)
	q.c.unwatchLocked(q)
	if q.settled && !q.settling {
		q.finishLocked(fx)
	}
}

// Pipeline returns the capability at the pointer field path in the
// call's results, usable before they arrive (promise pipelining): calls
// on it go to the callee along with the call. It holds the question open
// until released.
func (p PendingCall) Pipeline(fields ...uint16) capnp.Client {
	switch {
	case p.err != nil:
		return brokenClient(p.err)
	case p.ans != nil:
		f := p.ans.Future()
		for _, fld := range fields {
			f = f.Field(fld, nil)
		}
		return f.Client().AddRef()
	}
	q := p.q
	c := q.c
	hook := &nativePipeline{q: q}
	transform := hook.ops[:0]
	if len(fields) > len(hook.ops) {
		transform = make([]capnp.PipelineOp, 0, len(fields))
	}
	for _, f := range fields {
		transform = append(transform, capnp.PipelineOp{Field: f})
	}
	hook.transform = transform
	c.mu.Lock()
	if q.settled {
		c.unlock()
		<-q.native.doneChan() // settled: its effect is about to close it, if not yet
		if q.resultErr != nil {
			return brokenClient(q.resultErr)
		}
		ptr, err := capnp.Transform(q.resultContent, transform)
		if err != nil {
			return brokenClient(fmt.Errorf("captp: pipelined capability: %w", err))
		}
		return ptr.Interface().Client().AddRef()
	}
	if q.native.callerReleased {
		c.unlock()
		return brokenClient(errors.New("captp: Pipeline on a released call"))
	}
	cl, r := capnp.NewPromisedClient(hook)
	hook.resolver = r
	if q.native.pipelines == nil {
		q.native.pipelines = q.native.pipeBuf[:0]
	}
	q.native.pipelines = append(q.native.pipelines, hook)
	q.native.pipeRefs++
	c.unlock()
	return cl
}

// nativePipeline carries calls on a capability in a native question's
// results until the Return resolves it.
type nativePipeline struct {
	q         *question
	transform []capnp.PipelineOp
	ops       [2]capnp.PipelineOp // transform's array when it is short
	// resolver settles the promise at the Return (nativeQuestion.settle).
	resolver capnp.Resolver[capnp.Client]
}

func (h *nativePipeline) Send(ctx context.Context, s capnp.Send) (*capnp.Answer, capnp.ReleaseFunc) {
	return h.q.c.sendCall(ctx, callTarget{question: h.q, transform: h.transform}, s)
}

func (h *nativePipeline) Recv(ctx context.Context, r capnp.Recv) capnp.PipelineCaller {
	return h.q.c.forwardCall(ctx, callTarget{question: h.q, transform: h.transform}, r)
}

func (h *nativePipeline) settledSignal() <-chan struct{} { return h.q.native.doneChan() }
func (h *nativePipeline) isSettled() bool                { return h.q.native.isDone() }

// settledTo returns the capability at h's path in the call's results, or
// the call's error. The caller's client keeps the question and its
// results (pipeRefs).
func (h *nativePipeline) settledTo() capnp.Client {
	q := h.q
	c := q.c
	c.mu.Lock()
	defer c.unlock()
	if q.resultErr != nil {
		return brokenClient(q.resultErr)
	}
	if cl, ok := c.redirectLocked(callTarget{question: q, transform: h.transform}); ok {
		return cl
	}
	return brokenClient(errors.New("captp: pipelined capability: the call's results are gone"))
}

func (h *nativePipeline) Brand() capnp.Brand { return capnp.Brand{Value: h} }
func (h *nativePipeline) String() string     { return "captp native pipeline" }

// Shutdown runs once no call can use the hook any more (released, or
// resolved and switched over): the question may then be finished.
func (h *nativePipeline) Shutdown() { h.q.c.scheduleTask(h) }

// runTask is Shutdown's work, under c.mu.
func (h *nativePipeline) runTask(fx *effects) {
	q := h.q
	n := q.native
	n.pipeRefs--
	if n.pipeRefs == 0 && n.callerReleased {
		q.releaseNativeLocked(fx)
	}
}
