package core

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"
)

// An answer is a call (or Bootstrap) the peer sent us. It implements
// capnp.Returner: the local capability writes its results straight into
// the outbound Return message.
type answer struct {
	c   *Conn
	id  uint32
	ctx callCtx // the delivered call's context

	// queued holds calls pipelined on this answer before it returned, in
	// arrival order; flushing is set while they are being delivered, so
	// that later calls queue behind them. (go-capnp's own server pipeline
	// queue cannot be used: it dereferences the nil PipelineCaller of a
	// call that fails at once, crashing the process on a peer's input.)
	queued    []queuedCall
	flushing  bool
	published bool // results visible to pipelined calls (before returned while flushing)

	// Published by Return under c.mu; read by pipelined calls.
	msg     *capnp.Message // the Return message; kept until Finish for pipelining
	ret     rpccp.Return   // unset if msg was built from returnEnvelope (returnOf)
	results capnp.Ptr      // the results content
	err     error          // exception result

	// Written by the handler's goroutine before Return, without the lock.
	out        *capnp.Message
	outRet     rpccp.Return // unset if out was built from returnEnvelope (returnOf)
	outResults capnp.Ptr
	outErr     error

	returned bool // Return queued
	finished bool // Finish received
	// resultExports counts export references carried by the Return, which
	// Finish(releaseResultCaps) gives back.
	resultExports []uint32
	// resultNatives holds, by cap table index, the native objects the
	// Return exports (nil if none; fillCapTableLocked): calls pipelined
	// on them go straight to the object (pipelinedNativeLocked).
	resultNatives []*nativeServer
	// The arrays of resultExports and resultNatives for a Return that
	// carries one capability, the common case.
	resultExportsBuf [1]uint32
	resultNativesBuf [1]*nativeServer
	// sendElsewhere is set for a call with sendResultsTo.yourself: its
	// Return says resultsSentElsewhere and the results stay here for the
	// takers, questions the peer answered with takeFromOtherQuestion.
	sendElsewhere bool
	takers        []*question

	// pipelines are promises we handed out for capabilities in the
	// results (receiverAnswer from the peer); they settle at Return.
	pipelines []pendingPipeline

	argsOnce sync.Once

	// argsBytes is the size of the call's message, counted in
	// Conn.inboundHeld until the arguments are released.
	argsBytes int64

	// pins counts queued writes reading msg's segments in place (large
	// Returns); freeLocked leaves msg to the last one, in freeAfterWrite.
	pins           int
	freeAfterWrite *capnp.Message

	// The call to deliver, set by handleCall under c.mu and taken by the
	// deliver effect after the unlock, in the reader goroutine.
	deliverTarget    capnp.Client
	deliverTargetAns *answer
	deliverTransform []capnp.PipelineOp
	deliverRecv      capnp.Recv

	// Level 3 (thirdparty.go): the capability a Provide answer holds for
	// a third party, or the wait of an Accept answer not yet returned.
	provision *provision
	accept    *acceptWait

	// native is the call's state when its target is a native export
	// (native.go), allocated with the answer (newNativeAnswerLocked) so
	// that serving it allocates nothing more; nil otherwise.
	native *ServerCall
	// deliverNative is the native object a call to one of our exports
	// goes to without capnp.Client.RecvCall; argsMsg holds its arguments
	// (freed by freeNativeArgs rather than a ReleaseFunc).
	deliverNative *nativeServer
	argsMsg       *capnp.Message
	argsPinned    bool // the Return references the arguments' bytes
}

// newAnswerLocked registers an answer for question id qid.
func (c *Conn) newAnswerLocked(qid uint32) *answer {
	a := &answer{c: c, id: qid}
	c.answers[qid] = a
	c.inProgress++
	return a
}

// newNativeAnswerLocked is newAnswerLocked for a call to a native
// export: the answer and the ServerCall in one allocation.
func (c *Conn) newNativeAnswerLocked(qid uint32) *answer {
	x := &struct {
		a  answer
		sc ServerCall
	}{}
	a := &x.a
	a.c, a.id, a.native = c, qid, &x.sc
	c.answers[qid] = a
	c.inProgress++
	return a
}

// AllocResults allocates the Return message and its results struct.
func (a *answer) AllocResults(sz capnp.ObjectSize) (capnp.Struct, error) {
	if a.out != nil {
		return capnp.Struct{}, errors.New("captp: results allocated twice")
	}
	if returnEnvelope.fits(sz) {
		return a.allocEnvelopeResults(sz)
	}
	msg, m, err := newMessage()
	if err != nil {
		return capnp.Struct{}, fmt.Errorf("allocate results: %w", err)
	}
	ret, err := m.NewReturn()
	if err != nil {
		msg.Release()
		return capnp.Struct{}, fmt.Errorf("allocate results: %w", err)
	}
	ret.SetAnswerId(a.id)
	ret.SetReleaseParamCaps(false)
	payload, err := ret.NewResults()
	if err != nil {
		msg.Release()
		return capnp.Struct{}, fmt.Errorf("allocate results: %w", err)
	}
	s, err := capnp.NewStruct(payload.Segment(), sz)
	if err == nil {
		err = payload.SetContent(s.ToPtr())
	}
	if err != nil {
		msg.Release()
		return capnp.Struct{}, fmt.Errorf("allocate results: %w", err)
	}
	a.out, a.outRet, a.outResults = msg, ret, s.ToPtr()
	return s, nil
}

// allocEnvelopeResults is AllocResults with the Return built from
// returnEnvelope.
func (a *answer) allocEnvelopeResults(sz capnp.ObjectSize) (capnp.Struct, error) {
	msg, seg, s, err := returnEnvelope.newMessage(sz)
	if err != nil {
		return capnp.Struct{}, fmt.Errorf("allocate results: %w", err)
	}
	returnEnvelope.set(seg, envAnswerID, uint64(a.id))
	// outRet stays unset: most Returns never need it (returnOf).
	a.out, a.outRet, a.outResults = msg, rpccp.Return{}, s.ToPtr()
	return s, nil
}

// allocRefResults is AllocResults for results whose pointer field
// field is data, which lies in the call's arguments: the Return message
// references it (a second segment) rather than copying it, and frees the
// arguments only when it is itself released.
func (a *answer) allocRefResults(sz capnp.ObjectSize, field uint16, data []byte) (capnp.Struct, error) {
	na := &notifyArena{released: a.freeNativeArgs}
	msg, m, list, err := newRefMessageNotify(data, na)
	if err != nil {
		return capnp.Struct{}, fmt.Errorf("allocate results: %w", err)
	}
	fail := func(err error) (capnp.Struct, error) {
		a.argsPinned = false
		na.released = nil // the handler still reads the arguments
		recycleMessage(msg)
		return capnp.Struct{}, fmt.Errorf("allocate results: %w", err)
	}
	a.argsPinned = true
	ret, err := m.NewReturn()
	if err != nil {
		return fail(err)
	}
	ret.SetAnswerId(a.id)
	ret.SetReleaseParamCaps(false)
	payload, err := ret.NewResults()
	if err != nil {
		return fail(err)
	}
	s, err := capnp.NewStruct(payload.Segment(), sz)
	if err == nil {
		err = payload.SetContent(s.ToPtr())
	}
	if err == nil {
		err = s.SetPtr(field, list.ToPtr())
	}
	if err != nil {
		return fail(err)
	}
	a.out, a.outRet, a.outResults = msg, ret, s.ToPtr()
	return s, nil
}

// PrepareReturn finalizes the results: it encodes their capability table
// (exporting local capabilities) now, because the local call may read the
// results for pipelining as soon as it returns, and must see them final.
func (a *answer) PrepareReturn(err error) {
	c := a.c
	var fx effects
	c.mu.Lock()
	c.prepareLocked(&fx, a, err)
	c.unlock()
	fx.run()
}

func (c *Conn) prepareLocked(fx *effects, a *answer, err error) {
	a.outErr = err
	if err != nil || c.closing {
		return
	}
	if a.out == nil {
		// Success without AllocResults: an empty results struct.
		if _, err := a.AllocResults(capnp.ObjectSize{}); err != nil {
			a.outErr = err
			return
		}
	}
	if a.sendElsewhere {
		return // the results never cross the wire: nothing to export
	}
	if a.out.CapTable().Len() == 0 {
		return
	}
	payload, err := outResultsPayload(a)
	if err == nil {
		a.resultExports, err = c.fillCapTableLocked(fx, payload, a.out.CapTable(), a.resultExportsBuf[:0], &a.resultNatives, a.resultNativesBuf[:])
	}
	if err != nil {
		a.outErr = fmt.Errorf("captp: encode results: %w", err)
	}
}

// Return queues the Return message. Calls the peer pipelined on this
// answer are delivered first, in order, as go-capnp's Returner contract
// asks: a call the peer makes after seeing the Return must not overtake
// them.
func (a *answer) Return() { a.returnFrom(false) }

// returnFrom is Return; inline says a native handler returns on the
// goroutine that delivered the call, which may be the read loop (see
// claimInlineLocked).
func (a *answer) returnFrom(inline bool) {
	c := a.c
	var fx effects
	c.mu.Lock()
	if len(a.queued) > 0 && !c.closing && c.answers[a.id] == a {
		a.publishLocked()
		// Promises for result capabilities settle first, so queued calls
		// that reach them do not queue here again.
		a.settlePipelinesLocked(&fx)
		a.flushing = true
		c.unlock()
		fx.run()
		c.flushQueued(a, inline)
		return
	}
	c.returnLocked(&fx, a)
	var out output
	if inline {
		out = c.claimInlineLocked()
	} else {
		out = c.claimOutputLocked()
	}
	c.unlock()
	c.writeClaimed(out)
	fx.run()
}

// publishLocked makes the handler's results visible to pipelined calls.
func (a *answer) publishLocked() {
	if a.published {
		return
	}
	a.published = true
	a.msg, a.ret, a.results, a.err = a.out, a.outRet, a.outResults, a.outErr
	a.out = nil
}

// ReleaseResults is a no-op: the results live in the Return message, which
// the connection frees once the peer sends Finish.
func (a *answer) ReleaseResults() {}

// returnLocked sends a's Return: results, exception, or canceled if the
// caller already finished the question.
func (c *Conn) returnLocked(fx *effects, a *answer) {
	if a.returned {
		return
	}
	a.returned = true
	if c.answers[a.id] == a {
		c.inProgress--
	}
	a.publishLocked()
	a.settlePipelinesLocked(fx)
	if len(a.queued) > 0 {
		// Only when shutting down or canceled: they fail in order.
		a.flushing = true
		fx.add(func() { c.flushQueued(a, false) })
	}
	if c.closing || c.answers[a.id] != a {
		a.freeLocked(fx)
		return
	}
	if a.finished || a.err != nil {
		// Nobody will receive capabilities from these results.
		c.releaseResultExportsLocked(fx, a)
	}
	if a.sendElsewhere {
		c.returnElsewhereLocked(fx, a)
		return
	}
	switch {
	case a.finished:
		// The caller gave up; it expects a Return but not the results.
		a.replaceMessage(fx, func(ret rpccp.Return) error { ret.SetCanceled(); return nil })
	case a.err != nil:
		a.replaceMessage(fx, func(ret rpccp.Return) error {
			e, err := ret.NewException()
			if err != nil {
				return err
			}
			return marshalException(e, a.err)
		})
	}
	dropAtReturn := a.msg != nil && c.noFinishNeededLocked(a)
	if dropAtReturn {
		setNoFinishNeeded(a.msg, a.ret)
		if c.finishOptional == nil {
			c.finishOptional = make(map[uint32]struct{})
		}
		c.finishOptional[a.id] = struct{}{}
	}
	if a.msg == nil {
		c.log.Error("captp: could not build return", "answer", a.id)
	} else if _, err := c.sendByRefLocked(a.msg, a); err != nil {
		c.log.Error("captp: queue return", "answer", a.id, "err", err)
	}
	if a.err != nil && a.msg != nil {
		// Nothing pipelines on an exception: keep only the table entry
		// until Finish, not the message.
		fx.recycleMsg(a.msg)
		a.msg = nil
	}
	if a.finished || dropAtReturn {
		c.retireAnswerLocked(fx, a)
	}
}

// noFinishNeededLocked decides whether a's Return tells the peer that no
// Finish is needed (rpc.capnp's Return.noFinishNeeded): results without
// capabilities leave nothing to pipeline on or to release, so the answer
// is dropped at once and the peer saves a message per call. Peers that
// predate the flag send their Finish anyway; we remember the ids
// (finishOptional) to ignore those Finishes, and to answer calls
// pipelined on the dropped results (which had no capability to reach)
// with an error instead of treating them as violations. A peer that
// never finishes nor reuses its ids fills that set; then answers wait
// for their Finish again, bounded by the answer table.
func (c *Conn) noFinishNeededLocked(a *answer) bool {
	if a.finished || a.sendElsewhere || a.provision != nil || a.accept != nil ||
		len(a.resultExports) > 0 || len(a.takers) > 0 ||
		len(c.finishOptional) >= answerTableLimit(c.lim) {
		return false
	}
	// An exception stays until Finish: calls pipelined on it must fail
	// with it.
	return a.err == nil && a.msg != nil && a.msg.CapTable().Len() == 0
}

// returnElsewhereLocked completes a tail call: the peer gets a Return
// saying resultsSentElsewhere, the waiting questions get the results.
func (c *Conn) returnElsewhereLocked(fx *effects, a *answer) {
	for _, q := range a.takers {
		if c.questions[q.id] == q && !q.settled {
			c.takeResultsLocked(fx, q, a)
		}
	}
	a.takers = nil
	msg, m, err := newMessage()
	if err == nil {
		var ret rpccp.Return
		if ret, err = m.NewReturn(); err == nil {
			ret.SetAnswerId(a.id)
			ret.SetReleaseParamCaps(false)
			ret.SetResultsSentElsewhere()
			err = c.sendLocked(msg)
		}
		msg.Release()
	}
	if err != nil {
		c.log.Error("captp: queue return", "answer", a.id, "err", err)
	}
	if a.finished {
		c.retireAnswerLocked(fx, a)
	}
}

// releaseResultExportsLocked gives back the export references the results
// took, for results the peer will never see or was told to drop.
func (c *Conn) releaseResultExportsLocked(fx *effects, a *answer) {
	for _, id := range a.resultExports {
		_ = c.releaseExportLocked(fx, id, 1)
	}
	a.resultExports, a.resultNatives = nil, nil
}

// replaceMessage swaps the results message for a fresh Return built by fill.
func (a *answer) replaceMessage(fx *effects, fill func(rpccp.Return) error) {
	if old := a.msg; old != nil {
		fx.recycleMsg(old)
	}
	a.msg, a.results, a.resultNatives = nil, capnp.Ptr{}, nil
	msg, m, err := newMessage()
	if err != nil {
		return
	}
	ret, err := m.NewReturn()
	if err == nil {
		ret.SetAnswerId(a.id)
		ret.SetReleaseParamCaps(false)
		err = fill(ret)
	}
	if err != nil {
		msg.Release()
		return
	}
	a.msg, a.ret = msg, ret
}

// retireAnswerLocked removes a finished, returned answer and frees it.
func (c *Conn) retireAnswerLocked(fx *effects, a *answer) {
	if c.answers[a.id] == a {
		delete(c.answers, a.id)
	}
	a.freeLocked(fx)
}

// freeLocked releases what the answer holds.
func (a *answer) freeLocked(fx *effects) {
	a.ctx.cancel()
	if msg := a.msg; msg != nil {
		a.msg = nil
		a.results = capnp.Ptr{}
		if a.pins > 0 {
			a.freeAfterWrite = msg // the writer still reads it
		} else {
			fx.recycleMsg(msg)
		}
	}
}

// unpin runs once the writer has written (or dropped) the Return it
// wrote from a.msg, and frees the message if the answer is done with it.
func (a *answer) unpin() {
	c := a.c
	c.mu.Lock()
	a.pins--
	var msg *capnp.Message
	if a.pins == 0 {
		msg, a.freeAfterWrite = a.freeAfterWrite, nil
	}
	c.unlock()
	if msg != nil {
		recycleMessage(msg)
	}
}

// pendingPipeline is a promise for the capability at transform in an
// answer's results.
type pendingPipeline struct {
	transform []capnp.PipelineOp
	resolver  capnp.Resolver[capnp.Client]
	hook      *localPipeline
	// self keeps the promise resolvable until the answer settles it, as
	// an embargo's does (embargo.self); localPipeline's Shutdown does
	// nothing, so holding it changes no lifetime the peer sees.
	self capnp.Client
}

// settlePipelinesLocked resolves the promises handed out for capabilities
// in a's results, now that they are known.
func (a *answer) settlePipelinesLocked(fx *effects) {
	for _, pp := range a.pipelines {
		var cl capnp.Client
		var err error
		switch {
		case a.err != nil:
			err = a.err
		case a.msg == nil || a.finished:
			err = errors.New("captp: call ended without results")
		default:
			ptr, terr := capnp.Transform(a.results, pp.transform)
			if terr != nil {
				err = fmt.Errorf("captp: %w", terr)
			} else {
				cl = ptr.Interface().Client().AddRef()
			}
		}
		r, hook, self := pp.resolver, pp.hook, pp.self
		fx.add(func() {
			defer self.Release()
			if err == nil && resolvesToHook(cl, hook) {
				// The results contain the very promise for them.
				cl.Release()
				err = errors.New("captp: a call's result is a promise for itself")
			}
			if err != nil {
				breakPromises(err, r)
				return
			}
			r.Fulfill(cl)
			cl.Release()
		})
	}
	a.pipelines = nil
}

// dropLocked discards the answer at shutdown. Its handler may still be
// running; its context is cancelled and a later Return is dropped.
func (a *answer) dropLocked(fx *effects) {
	for _, q := range a.queued {
		r := q.recv
		fx.add(func() { r.Reject(errors.New("captp: connection closed before the call returned")) })
	}
	a.queued = nil
	for _, pp := range a.pipelines {
		r, self := pp.resolver, pp.self
		fx.add(func() {
			breakPromises(errors.New("captp: connection closed before the call returned"), r)
			self.Release()
		})
	}
	a.pipelines = nil
	a.freeLocked(fx)
}

// queuedCall is a call pipelined on an answer that has not returned.
type queuedCall struct {
	ctx       context.Context
	transform []capnp.PipelineOp
	recv      capnp.Recv
}

// deliver is the effect that hands the peer's call to its target.
func (a *answer) deliver() {
	target, ta, transform, recv := a.deliverTarget, a.deliverTargetAns, a.deliverTransform, a.deliverRecv
	a.deliverTarget, a.deliverTargetAns, a.deliverTransform, a.deliverRecv = capnp.Client{}, nil, nil, capnp.Recv{}
	a.c.deliverCall(a, target, ta, transform, recv)
}

// deliverCall runs outside the lock, in the reader goroutine, so calls
// reach local capabilities in the order they arrived.
func (c *Conn) deliverCall(a *answer, target capnp.Client, targetAns *answer, transform []capnp.PipelineOp, recv capnp.Recv) {
	if ns := a.deliverNative; ns != nil {
		a.deliverNative = nil
		ns.Recv(&a.ctx, recv)
		return
	}
	if targetAns == nil {
		target.RecvCall(&a.ctx, recv)
		return
	}
	c.pipelineCall(targetAns, &a.ctx, transform, recv)
}

// pipelineCall delivers a call made on a capability in answer ta's
// results: now if they are there, else after ta returns, in order.
func (c *Conn) pipelineCall(ta *answer, ctx context.Context, transform []capnp.PipelineOp, recv capnp.Recv) {
	c.mu.Lock()
	if !ta.returned || ta.flushing {
		ta.queued = append(ta.queued, queuedCall{ctx, transform, recv})
		c.unlock()
		return
	}
	client, err := ta.resultCapLocked(transform)
	c.unlock()
	deliverTo(client, err, ctx, recv)
}

// pipelinedNativeLocked returns the native object at transform in a's
// results, if a has returned with one there and no call pipelined
// earlier waits to be delivered (pipelineCall would deliver at once):
// then a call pipelined on it can go to the object the way a call to an
// export does, with no capnp.Client.RecvCall. The object lives while a's
// results hold it, until the Finish, which the reader handles only after
// this delivery.
func (a *answer) pipelinedNativeLocked(transform []capnp.PipelineOp) *nativeServer {
	if a.resultNatives == nil || !a.returned || a.flushing || a.finished || a.err != nil || a.msg == nil {
		return nil
	}
	ptr, err := capnp.Transform(a.results, transform)
	if err != nil {
		return nil
	}
	iface := ptr.Interface()
	if !iface.IsValid() {
		return nil
	}
	if i := int(iface.Capability()); i < len(a.resultNatives) {
		return a.resultNatives[i]
	}
	return nil
}

// resultCapLocked returns the capability at transform in a's results.
func (a *answer) resultCapLocked(transform []capnp.PipelineOp) (capnp.Client, error) {
	switch {
	case a.err != nil:
		return capnp.Client{}, a.err
	case a.finished || a.msg == nil:
		return capnp.Client{}, errors.New("captp: pipelined call on a call that ended without results")
	}
	ptr, err := capnp.Transform(a.results, transform)
	if err != nil {
		return capnp.Client{}, fmt.Errorf("captp: pipelined call: %w", err)
	}
	return ptr.Interface().Client().AddRef(), nil
}

func deliverTo(client capnp.Client, err error, ctx context.Context, recv capnp.Recv) {
	defer client.Release()
	switch {
	case err != nil:
		recv.Reject(err)
	case !client.IsValid():
		recv.Reject(errors.New("captp: pipelined call on a null capability"))
	default:
		client.RecvCall(ctx, recv)
	}
}

// flushQueued delivers, in order, the calls pipelined on a while it ran
// (and any that arrive meanwhile), then lets later calls go directly.
func (c *Conn) flushQueued(a *answer, inline bool) {
	for {
		c.mu.Lock()
		if len(a.queued) == 0 {
			a.flushing = false
			// With the queue empty and the lock held, nothing can
			// slip between the last queued call and the Return.
			var fx effects
			c.returnLocked(&fx, a)
			var out output
			if inline {
				out = c.claimInlineLocked()
			}
			c.unlock()
			c.writeClaimed(out)
			fx.run()
			return
		}
		q := a.queued[0]
		a.queued = a.queued[1:]
		client, err := a.resultCapLocked(q.transform)
		c.unlock()
		deliverTo(client, err, q.ctx, q.recv)
	}
}

// releaseArgs returns a ReleaseFunc that frees the inbound message once.
func (a *answer) releaseArgs(msg *capnp.Message) capnp.ReleaseFunc {
	return func() {
		a.argsOnce.Do(func() {
			a.c.inboundHeld.Add(-a.argsBytes)
			recycleMessage(msg)
		})
	}
}

// freeNativeArgs frees the arguments of a call delivered straight to a
// native object (deliverNative), which carries no ReleaseFunc.
func (a *answer) freeNativeArgs() {
	a.argsOnce.Do(func() {
		a.c.inboundHeld.Add(-a.argsBytes)
		if msg := a.argsMsg; msg != nil {
			a.argsMsg = nil
			recycleMessage(msg)
		}
	})
}
