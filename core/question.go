package core

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"time"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"

	"github.com/captp-go/captp/core/flow"
	"github.com/captp-go/captp/internal/callqueue"
)

// A question is a call (or Bootstrap) this side sent and whose Return it
// awaits. Its id stays in the table until the Return has arrived and
// Finish has been sent, as rpc.capnp requires.
type question struct {
	c      *Conn
	id     uint32
	method capnp.Method
	p      *capnp.Promise

	// pipelined records the paths (transforms) that calls were sent to
	// in this question's promised answer, each once, so that a Return
	// naming our own capabilities at those paths can embargo them;
	// pipelinedBuf holds the first.
	pipelined    [][]capnp.PipelineOp
	pipelinedBuf [1][]capnp.PipelineOp

	returned  bool // Return received
	finished  bool // Finish sent
	settled   bool // p resolved (by Return, cancellation or disconnect)
	settling  bool // settled by a Return whose settle effect has not run yet
	released  bool // the caller released the answer
	bootstrap bool
	// bootDropped: the caller released the bootstrap promise before the
	// Return. (The bools sit together: the question and its native part
	// fit the 512-byte size class.)
	bootDropped bool
	noFinish    bool // the Return said noFinishNeeded

	// For Bootstrap: the promise handed to the caller, and the capability
	// it resolved to (kept for calls that raced with the Return).
	bootResolver capnp.Resolver[capnp.Client]
	bootCap      capnp.Client
	// bootSettled records when bootResolver is taken (bootstrapHook's
	// settler); a pointer, so that a question still fits its size class.
	bootSettled *bootSettlement
	// onSettled, if set, runs (as an effect) once the question is settled
	// by its Return, rejected, or dropped unsent.
	onSettled func()

	ctx           context.Context // manual mode: the caller's context, polled
	results       *capnp.Message  // Return message, until released
	resultContent capnp.Ptr       // its content, for calls racing the Return
	resultErr     error           // the exception the Return carried
	paramExports  []uint32        // exports our Call carried, released by Return.releaseParamCaps
	stopCancel    func() bool     // stops a context watch of this question's own
	watch         *ctxWatch       // or the shared watch it is linked into
	sentCtx       context.Context // the context it was sent with, if that can end
	watchPrev     *question
	watchNext     *question

	// What the settle effect delivers to the caller, set under c.mu
	// by settleLocked and taken by runSettle after the unlock.
	settleContent capnp.Ptr
	settleErr     error
	settleBoot    capnp.Resolver[capnp.Client]
	settleBootCap capnp.Client

	// native is set for a question sent by Conn.Call (native.go): it has
	// no go-capnp promise (p is nil); its caller waits on done.
	native *nativeQuestion
}

// newQuestionLocked allocates a question id and its promise.
func (c *Conn) newQuestionLocked(m capnp.Method) *question {
	q := &question{c: c, id: c.questionIDs.get(), method: m}
	q.p = capnp.NewPromise(m, q, nil)
	c.questions[q.id] = q
	c.questionsByAns[q.p.Answer()] = q
	c.read.wakeLoop() // its Return must be read
	return q
}

// PipelineSend sends a call to a capability in this question's results
// before they arrive (promise pipelining).
func (q *question) PipelineSend(ctx context.Context, transform []capnp.PipelineOp, s capnp.Send) (*capnp.Answer, capnp.ReleaseFunc) {
	return q.c.sendCall(ctx, callTarget{question: q, transform: transform}, s)
}

// PipelineRecv forwards a call received elsewhere to a capability in this
// question's results.
func (q *question) PipelineRecv(ctx context.Context, transform []capnp.PipelineOp, r capnp.Recv) capnp.PipelineCaller {
	return q.c.forwardCall(ctx, callTarget{question: q, transform: transform}, r)
}

// callTarget is where an outbound call goes: an import or a promised answer.
type callTarget struct {
	importID  uint32
	question  *question // nil for an import
	transform []capnp.PipelineOp
	lim       *flow.Limiter // the import's flow control, for native calls (Call)
}

func (t callTarget) write(mt rpccp.MessageTarget) error {
	if t.question == nil {
		mt.SetImportedCap(t.importID)
		return nil
	}
	pa, err := mt.NewPromisedAnswer()
	if err != nil {
		return err
	}
	return writePromisedAnswer(pa, t.question.id, t.transform)
}

func writePromisedAnswer(pa rpccp.PromisedAnswer, qid uint32, transform []capnp.PipelineOp) error {
	pa.SetQuestionId(qid)
	ops, err := pa.NewTransform(int32(len(transform)))
	if err != nil {
		return err
	}
	for i, op := range transform {
		ops.At(i).SetGetPointerField(op.Field)
	}
	return nil
}

// sendCall sends a Call to t and returns the answer. Arguments are placed
// before the lock is taken, so user code never runs under c.mu.
func (c *Conn) sendCall(ctx context.Context, t callTarget, s capnp.Send) (*capnp.Answer, capnp.ReleaseFunc) {
	pc := c.send(ctx, t, s, false)
	if pc.q == nil {
		if pc.ans != nil {
			return pc.ans, pc.rel
		}
		return capnp.ErrorAnswer(s.Method, pc.err), func() {}
	}
	return pc.q.p.Answer(), pc.q.release
}

// send sends a Call to t: a question with a go-capnp promise, or with
// native set, a native question (Conn.Call) with none.
func (c *Conn) send(ctx context.Context, t callTarget, s capnp.Send, native bool) PendingCall {
	if err := c.waitQueue(ctx); err != nil {
		return PendingCall{err: err}
	}
	ref := takeDataRef(ctx, c.manual)
	var (
		msg  *capnp.Message
		m    rpccp.Message
		data capnp.List
		err  error
		call rpccp.Call
		args capnp.Struct
		// env and envSeg are the envelope a call was built from
		// (newEnvelopeCall) and its segment, nil for one built struct
		// by struct.
		env    *envelope
		envSeg *capnp.Segment
	)
	if ref == nil {
		env = callEnvelopeFor(t, s)
	}
	if env != nil {
		msg, envSeg, args, err = newEnvelopeCall(env, s)
		if err != nil {
			return PendingCall{err: err}
		}
	} else {
		if ref != nil {
			msg, m, data, err = newRefMessage(ref.data)
		} else {
			msg, m, err = newMessage()
		}
		if err != nil {
			return PendingCall{err: fmt.Errorf("build call: %w", err)}
		}
		call, args, err = buildCall(m, s, ref, data)
		if err != nil {
			msg.Release()
			return PendingCall{err: err}
		}
	}

	var size uint64
	if native && t.lim != nil {
		size, _ = msg.TotalSize()
	}
	c.mu.Lock()
	if c.closing {
		err := c.err
		c.unlock()
		msg.Release()
		return PendingCall{err: err}
	}
	if redirect, ok := c.redirectLocked(t); ok {
		// The target already settled: a call made now must queue behind
		// any embargo, not go to the peer after our Disembargo.
		c.unlock()
		defer msg.Release()
		defer redirect.Release()
		rs := capnp.Send{
			Method:    s.Method,
			ArgsSize:  args.Size(),
			PlaceArgs: func(dst capnp.Struct) error { return dst.CopyFrom(args) },
		}
		if native {
			return Call(ctx, redirect, rs)
		}
		ans, rel := redirect.SendCall(ctx, rs)
		return PendingCall{ans: ans, rel: rel}
	}
	if t.question != nil && (t.question.finished || t.question.c != c) {
		c.unlock()
		msg.Release()
		return PendingCall{err: errors.New("captp: pipelined call on a finished question")}
	}
	var q *question
	if native {
		q = c.newNativeQuestionLocked(s.Method)
	} else {
		q = c.newQuestionLocked(s.Method)
	}
	var fx effects
	if envSeg != nil {
		env.setCallTarget(envSeg, q.id, t)
	} else {
		call.SetQuestionId(q.id)
		var mt rpccp.MessageTarget
		if mt, err = call.NewTarget(); err == nil {
			err = t.write(mt)
		}
	}
	if err == nil && msg.CapTable().Len() > 0 {
		var params rpccp.Payload
		if params, err = callParams(msg); err == nil {
			q.paramExports, err = c.fillCapTableLocked(&fx, params, msg.CapTable(), nil, nil, nil)
		}
	}
	var byRef bool
	var written chan struct{}
	wake := c.wakeWriter
	if err == nil {
		byRef, err = c.sendByRefLocked(msg, nil)
		if byRef && ref != nil {
			written = make(chan struct{})
			c.outLarge[len(c.outLarge)-1].written = written
		}
	}
	if err != nil {
		c.dropQuestionLocked(&fx, q)
		c.unlock()
		msg.Release()
		fx.run()
		return PendingCall{err: err}
	}
	if t.question != nil {
		t.question.notePipelinedLocked(t.transform)
	}
	c.watchCancelLocked(q, ctx)
	// A native call's caller reads its Return itself if the read role is
	// free when it waits (readRole), along with the Returns of any calls
	// made with it; a call whose caller will not read needs the loop.
	wakeReader := !native
	if native && (q.sentCtx == nil || c.deadliner != nil) && c.othersSettledLocked(q) {
		// A lone call whose caller could read the Return itself: once
		// the loop has read this one, it leaves the role free if all is
		// quiet. (Not for every call: with calls in flight the loop
		// would check for quiet after every message, in vain.)
		c.read.callerWaited.Store(true)
	}
	var out output
	if native && !byRef && c.corkableLocked(wake) {
		c.wakeWriter = false
		c.corked.Store(true)
	} else {
		out = c.claimOutputLocked()
	}
	c.unlock()
	c.writeClaimed(out)
	if wakeReader {
		c.read.wakeLoop()
	}
	if !byRef {
		recycleMessage(msg)
	}
	fx.run()
	if written != nil {
		// The frame points into the caller's data: hold the caller until
		// it is in the transport (or dropped with the connection).
		<-written
	}
	if native && t.lim != nil {
		c.startFlow(ctx, q, t.lim, size)
	}
	return PendingCall{q: q}
}

// notePipelinedLocked records that a call went to path in q's promised
// answer (see question.pipelined).
func (q *question) notePipelinedLocked(path []capnp.PipelineOp) {
	if pipelinedOn(q, path) {
		return
	}
	if q.pipelined == nil {
		q.pipelined = q.pipelinedBuf[:0]
	}
	q.pipelined = append(q.pipelined, path)
}

// samePath reports whether two transforms name the same pointer field
// path, as PromisedAnswer carries it (default values do not cross).
func samePath(a, b []capnp.PipelineOp) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].Field != b[i].Field {
			return false
		}
	}
	return true
}

// redirectLocked returns what a call to t should go to instead of the
// wire, when t has settled but the caller's promise may not have switched
// over yet: an imported promise we already resolved, or a question whose
// Return we processed.
func (c *Conn) redirectLocked(t callTarget) (capnp.Client, bool) {
	q := t.question
	if q == nil {
		ie := c.imports[t.importID]
		if ie != nil && ie.resolution.IsValid() {
			return ie.resolution.AddRef(), true
		}
		return capnp.Client{}, false
	}
	switch {
	case q.c != c || !q.returned:
		return capnp.Client{}, false
	case q.resultErr != nil:
		return brokenClient(q.resultErr), true
	case q.results != nil:
		ptr, err := capnp.Transform(q.resultContent, t.transform)
		if err != nil {
			return brokenClient(fmt.Errorf("captp: pipelined call: %w", err)), true
		}
		return ptr.Interface().Client().AddRef(), true
	case q.bootCap.IsValid():
		return q.bootCap.AddRef(), true
	}
	return capnp.Client{}, false
}

func buildCall(m rpccp.Message, s capnp.Send, ref *dataRef, data capnp.List) (rpccp.Call, capnp.Struct, error) {
	call, err := m.NewCall()
	if err != nil {
		return call, capnp.Struct{}, fmt.Errorf("build call: %w", err)
	}
	call.SetInterfaceId(s.Method.InterfaceID)
	call.SetMethodId(s.Method.MethodID)
	params, err := call.NewParams()
	if err != nil {
		return call, capnp.Struct{}, fmt.Errorf("build call: %w", err)
	}
	args, err := capnp.NewStruct(params.Segment(), s.ArgsSize)
	if err != nil {
		return call, args, fmt.Errorf("build call: %w", err)
	}
	if err := params.SetContent(args.ToPtr()); err != nil {
		return call, args, fmt.Errorf("build call: %w", err)
	}
	if ref != nil {
		if err := args.SetPtr(ref.field, data.ToPtr()); err != nil {
			return call, args, fmt.Errorf("build call: reference data: %w", err)
		}
	}
	if s.PlaceArgs != nil {
		if err := s.PlaceArgs(args); err != nil {
			return call, args, fmt.Errorf("place arguments: %w", err)
		}
	}
	return call, args, nil
}

// dropQuestionLocked removes a question that was never sent.
func (c *Conn) dropQuestionLocked(fx *effects, q *question) {
	delete(c.questions, q.id)
	c.questionIDs.put(q.id)
	q.settled = true
	q.finished = true
	if q.native != nil {
		q.failNativeLocked(fx, errors.New("captp: call not sent"))
		return
	}
	delete(c.questionsByAns, q.p.Answer())
	// Nobody has seen the promise; resolve it so it holds no waiters.
	p, done := q.p, q.onSettled
	q.onSettled = nil
	fx.add(func() {
		p.Reject(errors.New("captp: call not sent"))
		if done != nil {
			done()
		}
	})
}

// cancel runs when the caller's context ends before the Return: it sends
// Finish (asking the callee to cancel) and rejects the promise now.
func (q *question) cancel(err error) {
	c := q.c
	var fx effects
	c.mu.Lock()
	q.cancelLocked(&fx, err)
	c.unlock()
	fx.run()
}

func (q *question) cancelLocked(fx *effects, err error) {
	c := q.c
	if q.settled || c.closing {
		return
	}
	q.settled = true
	if !q.finished {
		q.finished = true
		c.sendFinishLocked(q.id, true)
	}
	if q.native != nil {
		q.failNativeLocked(fx, err)
		return
	}
	p, br := q.p, q.takeBootResolverLocked(err)
	fx.add(func() {
		p.Reject(err)
		breakPromises(err, br) // skips a nil br
		q.bootSettledAfter(br)
	})
}

// cancelIfEndedLocked cancels q if the context it was sent with has ended
// but the watch has not run yet. A caller that saw the context end (its
// wait returned) and released q would otherwise unwatch it first: the
// call then stayed outstanding, never cancelled, and a callee holding it
// (a native object serving one call at a time) held up every later call.
func (q *question) cancelIfEndedLocked(fx *effects) {
	if q.sentCtx == nil || q.settled {
		return
	}
	if err := q.sentCtx.Err(); err != nil {
		q.cancelLocked(fx, err)
	}
}

// release is the ReleaseFunc of an answer: the caller no longer needs the
// results. If they have arrived, Finish is sent now; otherwise when they do.
func (q *question) release() {
	c := q.c
	var fx effects
	c.mu.Lock()
	if q.released {
		c.unlock()
		return
	}
	q.released = true
	q.cancelIfEndedLocked(&fx)
	q.c.unwatchLocked(q)
	if q.settled && !q.settling {
		// (While settling, afterSettle finishes: the results must stay
		// until the promise has them, or a call racing the release
		// would find neither the promise resolved nor the results.)
		q.finishLocked(&fx)
	}
	c.unlock()
	fx.run()
}

// finishLocked sends Finish if needed, retires the question once both
// Return and Finish are done, and releases its results.
func (q *question) finishLocked(fx *effects) {
	c := q.c
	if !q.finished {
		q.finished = true
		if !c.closing && !q.noFinish {
			wake := c.wakeWriter
			c.sendFinishLocked(q.id, false)
			if q.returned {
				c.noHasteLocked(wake) // the callee is done already
			}
		}
	}
	if q.returned || c.closing {
		q.retireLocked(fx)
	}
}

// retireLocked removes the question from the table and frees its results.
func (q *question) retireLocked(fx *effects) {
	c := q.c
	if c.questions[q.id] == q {
		delete(c.questions, q.id)
		c.questionIDs.put(q.id)
	}
	if q.native == nil {
		delete(c.questionsByAns, q.p.Answer())
		fx.push(effect{retire: q})
	}
	if q.results == nil {
		return
	}
	// The grace is for calls on capabilities taken from the results'
	// pipeline. A native question's pipeline clients hold it until they
	// are released, and results without capabilities have nothing to
	// pipeline on: such results go back at once, so a large body is
	// reused by the next call rather than allocated again.
	if c.manual || c.closing || q.native != nil && q.results.CapTable().Len() == 0 {
		fx.recycleMsg(q.results)
		q.results, q.resultContent = nil, capnp.Ptr{}
		return
	}
	c.buryLocked(q)
}

// resultsGrace is how long a retired question keeps its results. A call
// on a capability taken from an answer's pipeline can pass go-capnp's
// "not resolved yet" check, then reach us only after the caller released
// the answer and we retired the question; with the results still here it
// goes to the capability (redirectLocked) instead of failing with
// "pipelined call on a finished question".
const resultsGrace = 10 * time.Millisecond

// buryLocked keeps q's results for at least resultsGrace (two timer
// generations: a question buried just before a sweep survives it).
func (c *Conn) buryLocked(q *question) {
	c.graveNew = append(c.graveNew, q)
	if c.graveArmed {
		return
	}
	c.graveArmed = true
	if c.graveTimer == nil {
		c.graveTimer = time.AfterFunc(resultsGrace, c.sweepGraves)
	} else {
		c.graveTimer.Reset(resultsGrace)
	}
}

// sweepGraves frees the results of questions buried before the last sweep.
func (c *Conn) sweepGraves() {
	c.mu.Lock()
	dead := c.graveOld
	c.graveOld, c.graveNew = c.graveNew, dead[:0]
	msgs := c.unburyLocked(dead)
	if len(c.graveOld) > 0 && !c.closing {
		c.graveTimer.Reset(resultsGrace)
	} else {
		c.graveArmed = false
	}
	c.unlock()
	for _, m := range msgs {
		recycleMessage(m)
	}
}

// unburyLocked takes the results of qs for recycling.
func (c *Conn) unburyLocked(qs []*question) []*capnp.Message {
	var msgs []*capnp.Message
	for i, q := range qs {
		if q.results != nil {
			msgs = append(msgs, q.results)
		}
		q.results, q.resultContent = nil, capnp.Ptr{}
		qs[i] = nil
	}
	return msgs
}

// dropGravesLocked frees every buried result now (at shutdown).
func (c *Conn) dropGravesLocked(fx *effects) {
	for _, m := range c.unburyLocked(c.graveOld) {
		fx.recycleMsg(m)
	}
	for _, m := range c.unburyLocked(c.graveNew) {
		fx.recycleMsg(m)
	}
	c.graveOld, c.graveNew = nil, nil
	if c.graveTimer != nil {
		c.graveTimer.Stop()
	}
	c.graveArmed = false
}

// rejectLocked settles the question with err at shutdown.
func (q *question) rejectLocked(fx *effects, err error) {
	q.c.unwatchLocked(q)
	if !q.settled && q.native != nil {
		q.settled = true
		q.failNativeLocked(fx, err)
	} else if !q.settled {
		q.settled = true
		p, br, done := q.p, q.takeBootResolverLocked(err), q.onSettled
		q.onSettled = nil
		fx.add(func() {
			p.Reject(err)
			breakPromises(err, br) // skips a nil br
			q.bootSettledAfter(br)
			if done != nil {
				done()
			}
		})
	}
	if bc := q.bootCap; bc.IsValid() {
		q.bootCap = capnp.Client{}
		fx.releaseClient(bc)
	}
	// Results the caller has not released stay readable: its release
	// frees them (finishLocked retires the question even when closing).
}

func (c *Conn) sendFinishLocked(id uint32, releaseResultCaps bool) {
	t := &finishTemplates[0]
	if releaseResultCaps {
		t = &finishTemplates[1]
	}
	c.sendTemplateLocked(t, id)
}

// finishTemplates are the encoded Finish frames (releaseResultCaps false,
// true), patched with the question id.
var finishTemplates = [2]frameTemplate{newFinishTemplate(false), newFinishTemplate(true)}

func newFinishTemplate(releaseResultCaps bool) frameTemplate {
	return newFrameTemplate("Finish", 1, func(m rpccp.Message, v []uint32) error {
		f, err := m.NewFinish()
		if err != nil {
			return err
		}
		f.SetQuestionId(v[0])
		f.SetReleaseResultCaps(releaseResultCaps)
		return nil
	})
}

// forwardCall sends a call that arrived as a Recv (from another
// connection or a local promise) on to t, copying arguments and results.
func (c *Conn) forwardCall(ctx context.Context, t callTarget, r capnp.Recv) capnp.PipelineCaller {
	ans, release := c.sendCall(ctx, t, capnp.Send{
		Method:    r.Method,
		ArgsSize:  r.Args.Size(),
		PlaceArgs: func(args capnp.Struct) error { return args.CopyFrom(r.Args) },
	})
	r.ReleaseArgs()
	c.whenDone(ans.Done(), func() {
		defer release()
		res, err := ans.Struct()
		if err == nil {
			var out capnp.Struct
			out, err = r.Returner.AllocResults(res.Size())
			if err == nil {
				err = out.CopyFrom(res)
			}
		}
		r.Returner.PrepareReturn(err)
		r.Returner.Return()
		r.Returner.ReleaseResults()
	})
	return callqueue.NonNil(ans)
}

// watchCancelLocked arranges for q to be cancelled when ctx ends. Calls
// made under the same context share one watch (one context.AfterFunc),
// so a caller issuing many calls under one context pays for it once.
func (c *Conn) watchCancelLocked(q *question, ctx context.Context) {
	if ctx.Done() == nil {
		return
	}
	q.sentCtx = ctx
	if c.manual {
		q.ctx = ctx
		c.pending = append(c.pending, pendingWork{cancel: q})
		return
	}
	if reflect.TypeOf(ctx).Kind() != reflect.Pointer {
		// Only pointer contexts (all of package context's) are safe map keys.
		q.stopCancel = context.AfterFunc(ctx, func() { q.cancel(ctx.Err()) })
		return
	}
	w := c.watches[ctx]
	if w == nil {
		if len(c.watches) >= maxIdleWatches {
			c.dropIdleWatchesLocked()
		}
		w = &ctxWatch{ctx: ctx}
		w.stop = context.AfterFunc(ctx, func() { c.contextDone(w) })
		if c.watches == nil {
			c.watches = make(map[context.Context]*ctxWatch)
		}
		c.watches[ctx] = w
	}
	q.watch, q.watchNext = w, w.head
	if w.head != nil {
		w.head.watchPrev = q
	}
	w.head = q
}

// maxIdleWatches bounds the watches kept for contexts with no question in
// flight (kept so that the next call under the same context reuses them).
const maxIdleWatches = 8

// A ctxWatch cancels the questions asked under ctx when it ends.
type ctxWatch struct {
	ctx  context.Context
	stop func() bool
	head *question // linked through watchNext/watchPrev
}

// unwatchLocked stops watching q's context.
func (c *Conn) unwatchLocked(q *question) {
	if q.stopCancel != nil {
		q.stopCancel()
		q.stopCancel = nil
	}
	w := q.watch
	if w == nil {
		return
	}
	if q.watchPrev != nil {
		q.watchPrev.watchNext = q.watchNext
	} else {
		w.head = q.watchNext
	}
	if q.watchNext != nil {
		q.watchNext.watchPrev = q.watchPrev
	}
	q.watch, q.watchPrev, q.watchNext = nil, nil, nil
}

// dropIdleWatchesLocked stops the watches no question uses.
func (c *Conn) dropIdleWatchesLocked() {
	for ctx, w := range c.watches {
		if w.head == nil {
			w.stop()
			delete(c.watches, ctx)
		}
	}
}

// dropWatchesLocked stops every watch (at shutdown).
func (c *Conn) dropWatchesLocked() {
	for ctx, w := range c.watches {
		w.stop()
		delete(c.watches, ctx)
		for q := w.head; q != nil; {
			next := q.watchNext
			q.watch, q.watchPrev, q.watchNext = nil, nil, nil
			q = next
		}
	}
}

// contextDone cancels the questions still watched by w.
func (c *Conn) contextDone(w *ctxWatch) {
	c.mu.Lock()
	if c.watches[w.ctx] == w {
		delete(c.watches, w.ctx)
	}
	var qs []*question
	for q := w.head; q != nil; q = q.watchNext {
		qs = append(qs, q)
	}
	for _, q := range qs {
		c.unwatchLocked(q)
	}
	c.unlock()
	err := w.ctx.Err()
	for _, q := range qs {
		q.cancel(err)
	}
}

// takeBootResolverLocked takes q's bootstrap resolver, to settle with err
// (nil: with q.bootCap); bootSettledAfter closes the settlement once it
// has.
func (q *question) takeBootResolverLocked(err error) capnp.Resolver[capnp.Client] {
	br := q.bootResolver
	q.bootResolver = nil
	if br != nil { // requestCap sets bootSettled with bootResolver
		q.bootSettled.err = err
	}
	return br
}

// bootSettledAfter runs, outside c.mu, after the bootstrap resolver br
// taken by takeBootResolverLocked has settled (br nil: none was taken).
func (q *question) bootSettledAfter(br capnp.Resolver[capnp.Client]) {
	if br != nil {
		close(q.bootSettled.done)
	}
}

// A bootSettlement is closed (done) when a bootstrap promise settles,
// with the error it settled with (nil: the question's bootCap).
type bootSettlement struct {
	done chan struct{}
	err  error
}
