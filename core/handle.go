package core

import (
	"errors"
	"fmt"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/exc"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"
)

// protocolError is a violation by the peer; it ends the connection with
// an Abort carrying its text.
type protocolError struct{ err error }

func (e protocolError) Error() string { return "protocol violation: " + e.err.Error() }
func (e protocolError) Unwrap() error { return e.err }

func violation(format string, args ...any) error {
	return protocolError{fmt.Errorf(format, args...)}
}

// handleMessage processes one inbound message. It reports false when the
// connection has ended and the reader should stop.
func (c *Conn) handleMessage(msg *capnp.Message) bool {
	var fx effects
	c.dispatching.Store(true)
	keep, err := c.dispatch(&fx, msg)
	fx.run()
	c.dispatching.Store(false)
	if !keep {
		recycleMessage(msg)
	}
	if err != nil {
		var ab peerAbort
		if errors.As(err, &ab) {
			c.shutdown(ab.err, false)
		} else {
			c.abort(err)
		}
		return false
	}
	return true
}

// peerAbort carries the exception from the peer's Abort message.
type peerAbort struct{ err error }

func (e peerAbort) Error() string { return "peer aborted: " + e.err.Error() }

// dispatch decodes msg and applies it to the tables under the lock. keep
// reports that msg's ownership moved elsewhere (call params, results).
func (c *Conn) dispatch(fx *effects, msg *capnp.Message) (keep bool, err error) {
	if fm := decodeFast(msg); fm.kind != fastNone {
		c.mu.Lock()
		defer c.unlock()
		if c.closing {
			return false, nil
		}
		switch fm.kind {
		case fastReturnMsg:
			return c.handleFastReturn(fx, msg, fm.ret, fm.content, fm.payload)
		case fastCallMsg:
			return c.handleFastCall(fx, msg, fm.call, fm.content, fm.payload)
		case fastFinishMsg:
			return false, c.finishLocked(fx, fm.id, fm.flag)
		default: // fastReleaseMsg
			return false, c.releaseLocked(fx, fm.id, fm.count)
		}
	}
	m, err := rpccp.ReadRootMessage(msg)
	if err != nil {
		return false, violation("decode message: %w", err)
	}
	c.mu.Lock()
	defer c.unlock()
	if c.closing {
		return false, nil
	}
	switch m.Which() {
	case rpccp.Message_Which_call:
		return c.handleCall(fx, msg, m)
	case rpccp.Message_Which_return:
		return c.handleReturn(fx, msg, m)
	case rpccp.Message_Which_finish:
		return false, c.handleFinish(fx, m)
	case rpccp.Message_Which_bootstrap:
		return false, c.handleBootstrap(fx, m)
	case rpccp.Message_Which_resolve:
		return false, c.handleResolve(fx, m)
	case rpccp.Message_Which_release:
		rel, err := m.Release()
		if err != nil {
			return false, violation("decode release: %w", err)
		}
		return false, c.releaseLocked(fx, rel.Id(), rel.ReferenceCount())
	case rpccp.Message_Which_disembargo:
		return false, c.handleDisembargo(fx, m)
	case rpccp.Message_Which_abort:
		e, err := m.Abort()
		if err != nil {
			return false, peerAbort{errors.New("unreadable abort message")}
		}
		return false, peerAbort{e.ToError()}
	case rpccp.Message_Which_unimplemented:
		return false, c.handleUnimplemented(fx, m)
	case rpccp.Message_Which_provide:
		return false, c.handleProvide(fx, m)
	case rpccp.Message_Which_accept:
		return false, c.handleAccept(fx, m)
	default:
		// Level 2/3 messages and anything newer: tell the peer we don't
		// implement it, as rpc.capnp asks.
		return false, c.sendUnimplementedLocked(m)
	}
}

// releaseLocked handles a Release of count references to export id.
func (c *Conn) releaseLocked(fx *effects, id, count uint32) error {
	if err := c.releaseExportLocked(fx, id, count); err != nil {
		return violation("%w", err)
	}
	return nil
}

func (c *Conn) sendUnimplementedLocked(m rpccp.Message) error {
	msg, out, err := newMessage()
	if err != nil {
		return err
	}
	defer msg.Release()
	if err := out.SetUnimplemented(m); err != nil {
		return violation("echo unimplemented message: %w", err)
	}
	return c.sendLocked(msg)
}

func (c *Conn) handleBootstrap(fx *effects, m rpccp.Message) error {
	b, err := m.Bootstrap()
	if err != nil {
		return violation("decode bootstrap: %w", err)
	}
	qid := b.QuestionId()
	if err := c.checkNewAnswerLocked("bootstrap", qid); err != nil {
		return err
	}
	a := c.newAnswerLocked(qid)
	if c.bootstrapRestoreLocked(fx, a, b) {
		return nil // a service ID: answered by the restorer (restore.go)
	}
	if !c.bootstrap.IsValid() {
		a.outErr = exc.New(exc.Failed, "captp", "this vat offers no bootstrap capability")
		c.returnLocked(fx, a)
		return nil
	}
	if _, err := a.AllocResults(capnp.ObjectSize{}); err != nil {
		a.outErr = err
		c.returnLocked(fx, a)
		return nil
	}
	payload, err := outResultsPayload(a)
	if err == nil {
		iface := capnp.NewInterface(payload.Segment(), a.out.CapTable().Add(c.bootstrap.AddRef()))
		a.outResults = iface.ToPtr()
		err = payload.SetContent(a.outResults)
	}
	c.prepareLocked(fx, a, err)
	c.returnLocked(fx, a)
	return nil
}

func (c *Conn) handleCall(fx *effects, msg *capnp.Message, m rpccp.Message) (bool, error) {
	c.peerCalls++
	call, err := m.Call()
	if err != nil {
		return false, violation("decode call: %w", err)
	}
	qid := call.QuestionId()
	if err := c.checkNewAnswerLocked("call", qid); err != nil {
		return false, err
	}
	var sendElsewhere bool
	switch call.SendResultsTo().Which() {
	case rpccp.Call_sendResultsTo_Which_caller:
	case rpccp.Call_sendResultsTo_Which_yourself:
		// A tail call: keep the results for the peer's
		// Return.takeFromOtherQuestion instead of sending them.
		sendElsewhere = true
	default:
		return false, c.sendUnimplementedLocked(m)
	}
	mt, err := call.Target()
	if err != nil {
		return false, violation("decode call target: %w", err)
	}
	var to callTargets
	switch mt.Which() {
	case rpccp.MessageTarget_Which_importedCap:
		if to, err = c.exportTargetLocked(fx, mt.ImportedCap()); err != nil {
			return false, err
		}
	case rpccp.MessageTarget_Which_promisedAnswer:
		pa, err := mt.PromisedAnswer()
		if err != nil {
			return false, violation("decode call target: %w", err)
		}
		if to, err = c.answerTargetLocked(pa); err != nil {
			return false, err
		}
	default:
		return false, violation("unknown call target type %d", mt.Which())
	}
	params, err := call.Params()
	if err != nil {
		return false, violation("decode call params: %w", err)
	}
	content, err := params.Content()
	if err != nil {
		return false, violation("decode call params: %w", err)
	}
	if err := c.importCapTableLocked(fx, msg, params, nil); err != nil {
		return false, err
	}
	method := capnp.Method{InterfaceID: call.InterfaceId(), MethodID: call.MethodId()}
	return c.startAnswerLocked(fx, msg, qid, sendElsewhere, to, method, content)
}

// exportTargetLocked is where a call to export id goes.
func (c *Conn) exportTargetLocked(fx *effects, id uint32) (callTargets, error) {
	e := c.exports[id]
	if e == nil {
		return callTargets{}, violation("call to unknown export %d", id)
	}
	c.vineUsedLocked(fx, e)
	return callTargets{target: e.client, native: e.native}, nil
}

// answerTargetLocked is where a call pipelined on pa goes.
func (c *Conn) answerTargetLocked(pa rpccp.PromisedAnswer) (callTargets, error) {
	// Decoded on the stack: a call pipelined on a native object in the
	// results (the common case) needs no copy of the transform.
	var opsBuf [2]capnp.PipelineOp
	targetAns, ops, err := c.promisedAnswerLocked(pa, opsBuf[:0])
	if err != nil {
		if _, ok := c.finishOptional[pa.QuestionId()]; !ok {
			return callTargets{}, violation("call target: %w", err)
		}
		// Pipelined before the peer saw that the results, which had no
		// capability, were dropped: it fails as it would have.
		return callTargets{target: brokenClient(errNoCapability)}, nil
	}
	if ns := targetAns.pipelinedNativeLocked(ops); ns != nil {
		return callTargets{native: ns}, nil
	}
	if len(ops) > 0 {
		return callTargets{targetAns: targetAns, transform: append([]capnp.PipelineOp(nil), ops...)}, nil
	}
	return callTargets{targetAns: targetAns}, nil
}

// callTargets is where a peer's call goes: a capability (native, if a
// native object), or a capability at transform in targetAns's results.
type callTargets struct {
	target    capnp.Client
	targetAns *answer
	transform []capnp.PipelineOp
	native    *nativeServer
}

// handleFastCall handles a Call that decodeFast read, with its parameters
// (content, and payload if they carry capabilities).
func (c *Conn) handleFastCall(fx *effects, msg *capnp.Message, f fastCall, content capnp.Ptr, payload rpccp.Payload) (bool, error) {
	c.peerCalls++
	if err := c.checkNewAnswerLocked("call", f.qid); err != nil {
		return false, err
	}
	var to callTargets
	var err error
	if f.promisedAnswer.IsValid() {
		to, err = c.answerTargetLocked(f.promisedAnswer)
	} else {
		to, err = c.exportTargetLocked(fx, f.importedCap)
	}
	if err != nil {
		return false, err
	}
	if err := c.importCapTableLocked(fx, msg, payload, nil); err != nil {
		return false, err
	}
	return c.startAnswerLocked(fx, msg, f.qid, false, to, f.method, content)
}

// startAnswerLocked answers a peer's call, decoded and checked: it is
// refused when over the limits, else delivered to its target.
func (c *Conn) startAnswerLocked(fx *effects, msg *capnp.Message, qid uint32, sendElsewhere bool, to callTargets, method capnp.Method, content capnp.Ptr) (bool, error) {
	target, targetAns, transform, native := to.target, to.targetAns, to.transform, to.native
	size := messageBytes(msg)
	held := c.inboundHeld.Load()
	var overloaded string
	switch {
	case c.inProgress >= c.lim.MaxAnswers:
		overloaded = fmt.Sprintf("too many calls in progress (limit %d)", c.lim.MaxAnswers)
	case held > 0 && held+size > int64(c.lim.MaxInboundBytes):
		overloaded = fmt.Sprintf("too many bytes of calls held (limit %d)", c.lim.MaxInboundBytes)
	}
	if overloaded != "" {
		a := c.newAnswerLocked(qid)
		a.sendElsewhere = sendElsewhere // the peer may take these (error) results
		a.outErr = exc.New(exc.Overloaded, "captp", overloaded)
		c.returnLocked(fx, a)
		return false, nil
	}
	var a *answer
	if native != nil {
		a = c.newNativeAnswerLocked(qid)
	} else {
		a = c.newAnswerLocked(qid)
	}
	a.sendElsewhere = sendElsewhere
	a.argsBytes = size
	c.inboundHeld.Add(size)
	recv := capnp.Recv{
		Method:   method,
		Args:     content.Struct(),
		Returner: a,
	}
	if native != nil {
		// Straight to the native object: no ReleaseFunc, no RecvCall.
		a.deliverNative, a.argsMsg = native, msg
	} else {
		recv.ReleaseArgs = a.releaseArgs(msg)
	}
	// The export's own reference, not a new one (AddRef costs three
	// allocations): releases that could drop it arrive in later messages,
	// which this reader handles only after the delivery. A concurrent
	// shutdown may release it first; the call then fails, as it would.
	a.deliverTarget, a.deliverTargetAns, a.deliverTransform, a.deliverRecv = target, targetAns, transform, recv
	fx.push(effect{deliver: a})
	return true, nil
}

// importCapTableLocked decodes payload's cap table into msg's. When
// embargo is non-nil it is called for each capability that names one of
// ours and may replace it.
func (c *Conn) importCapTableLocked(fx *effects, msg *capnp.Message, payload rpccp.Payload, embargo func(i int, cl capnp.Client) (capnp.Client, error)) error {
	if !payload.HasCapTable() {
		return nil // an inbound message's own table starts empty
	}
	list, err := payload.CapTable()
	if err != nil {
		return violation("decode cap table: %w", err)
	}
	clients := make([]capnp.Client, list.Len())
	for i := range clients {
		// A capability handed off in a Return that calls were pipelined
		// on is embargoed like one in a Resolve: those calls went
		// through the introducer.
		cl, local, err := c.importCapLocked(fx, list.At(i), embargo != nil)
		if err == nil && local && embargo != nil {
			cl, err = embargo(i, cl)
		}
		if err != nil {
			// Releasing an import takes c.mu; do it after the lock.
			for _, cl := range clients[:i] {
				fx.releaseClient(cl)
			}
			return violation("cap table entry %d: %w", i, err)
		}
		clients[i] = cl
	}
	msg.CapTable().Reset(clients...)
	return nil
}

// returnFields are a Return's fields besides its results or error.
type returnFields struct {
	id                               uint32
	releaseParamCaps, noFinishNeeded bool
}

// returnedQuestionLocked returns the question a Return with answer id id
// is for.
func (c *Conn) returnedQuestionLocked(id uint32) (*question, error) {
	q := c.questions[id]
	if q == nil {
		return nil, violation("return for unknown question %d", id)
	}
	if q.returned {
		return nil, violation("second return for question %d", q.id)
	}
	return q, nil
}

// handleFastReturn handles a Return of results that decodeFast read.
func (c *Conn) handleFastReturn(fx *effects, msg *capnp.Message, f returnFields, content capnp.Ptr, payload rpccp.Payload) (bool, error) {
	q, err := c.returnedQuestionLocked(f.id)
	if err != nil {
		return false, err
	}
	return c.applyReturnLocked(fx, msg, q, f, content, payload, nil, nil)
}

func (c *Conn) handleReturn(fx *effects, msg *capnp.Message, m rpccp.Message) (bool, error) {
	ret, err := m.Return()
	if err != nil {
		return false, violation("decode return: %w", err)
	}
	f := returnFields{id: ret.AnswerId(), releaseParamCaps: ret.ReleaseParamCaps(), noFinishNeeded: ret.NoFinishNeeded()}
	q, err := c.returnedQuestionLocked(f.id)
	if err != nil {
		return false, err
	}
	// Validate everything before changing state: on a violation the
	// question must still be pending, so that shutdown rejects it.
	var (
		content capnp.Ptr
		payload rpccp.Payload
		rerr    error
		source  *answer // takeFromOtherQuestion
	)
	switch ret.Which() {
	case rpccp.Return_Which_results:
		if payload, err = ret.Results(); err == nil {
			content, err = payload.Content()
		}
		if err != nil {
			return false, violation("decode results: %w", err)
		}
	case rpccp.Return_Which_exception:
		e, err := ret.Exception()
		if err != nil {
			return false, violation("decode exception: %w", err)
		}
		rerr = e.ToError()
	case rpccp.Return_Which_canceled:
		rerr = exc.New(exc.Failed, "captp", "call canceled by the callee")
	case rpccp.Return_Which_takeFromOtherQuestion:
		// A tail call: the results are those of a call the peer made to
		// us with sendResultsTo.yourself.
		id := ret.TakeFromOtherQuestion()
		if source = c.answers[id]; source == nil || !source.sendElsewhere {
			return false, violation("return for question %d takes the results of question %d, which is not a call with sendResultsTo.yourself", q.id, id)
		}
	default:
		// We never ask for results to be sent elsewhere or to a third
		// party, so the peer cannot answer with those.
		return false, violation("return type %v for question %d, which did not ask for it", ret.Which(), q.id)
	}
	return c.applyReturnLocked(fx, msg, q, f, content, payload, rerr, source)
}

// applyReturnLocked settles q with a Return, validated: its results
// (content, with payload's cap table), rerr, or a source's results.
func (c *Conn) applyReturnLocked(fx *effects, msg *capnp.Message, q *question, f returnFields, content capnp.Ptr, payload rpccp.Payload, rerr error, source *answer) (bool, error) {
	if f.releaseParamCaps {
		for _, id := range q.paramExports {
			if err := c.releaseExportLocked(fx, id, 1); err != nil {
				return false, violation("return releases parameter capabilities: %w", err)
			}
		}
	}
	q.paramExports = nil
	q.returned = true
	// The callee dropped its answer: release sends no Finish.
	q.noFinish = f.noFinishNeeded
	c.unwatchLocked(q)
	if q.settled {
		// Cancelled earlier: Finish (with releaseResultCaps) is already
		// sent, so the callee owns any capabilities in the results.
		q.retireLocked(fx)
		return false, nil
	}
	switch {
	case source != nil:
		if source.returned {
			c.takeResultsLocked(fx, q, source)
		} else {
			source.takers = append(source.takers, q)
		}
		return false, nil
	case rerr == nil:
		if err := c.importCapTableLocked(fx, msg, payload, c.returnEmbargo(q, content)); err != nil {
			return false, err
		}
		c.settleLocked(fx, q, msg, content, nil)
		return true, nil
	default:
		c.settleLocked(fx, q, nil, capnp.Ptr{}, rerr)
		return false, nil
	}
}

// settleLocked resolves q with its results (kept in msg) or err.
func (c *Conn) settleLocked(fx *effects, q *question, msg *capnp.Message, content capnp.Ptr, rerr error) {
	q.settled = true
	if rerr != nil {
		q.resultErr = rerr
	} else {
		q.results, q.resultContent = msg, content
	}
	if q.bootstrap && rerr == nil && !q.bootDropped {
		q.bootCap = content.Interface().Client().AddRef()
	}
	br := q.takeBootResolverLocked(rerr)
	q.settleContent, q.settleErr, q.settleBoot, q.settleBootCap = content, rerr, br, q.bootCap
	q.settling = true
	if q.native != nil {
		q.native.takeLocked()
	}
	fx.push(effect{settle: q})
}

// runSettle resolves the caller's promise as settleLocked decided; it runs
// as an effect, outside c.mu.
func (q *question) runSettle() {
	if hook := testBeforeSettle.Load(); hook != nil {
		(*hook)(q)
	}
	content, rerr, br, bootCap := q.settleContent, q.settleErr, q.settleBoot, q.settleBootCap
	q.settleContent, q.settleErr, q.settleBoot, q.settleBootCap = capnp.Ptr{}, nil, nil, capnp.Client{}
	switch {
	case q.native != nil:
		q.native.settle(content, rerr)
	case rerr != nil:
		q.p.Reject(rerr)
	default:
		q.c.latchPipelines(q, content)
		q.p.Fulfill(content)
	}
	if br != nil {
		if rerr != nil {
			breakPromises(rerr, br)
		} else {
			br.Fulfill(bootCap)
		}
		q.bootSettledAfter(br)
	}
	q.c.afterSettle(q)
	if done := q.onSettled; done != nil {
		q.onSettled = nil
		done()
	}
}

// takeResultsLocked settles q with a copy of the results of answer a (a
// tail call the peer redirected back to us). The capabilities are ours;
// calls pipelined on q went through the peer, so they are embargoed.
func (c *Conn) takeResultsLocked(fx *effects, q *question, a *answer) {
	if a.err != nil {
		c.settleLocked(fx, q, nil, capnp.Ptr{}, a.err)
		return
	}
	msg, _, err := capnp.NewMessage(capnp.SingleSegment(nil))
	if err == nil && a.msg != nil {
		err = msg.SetRoot(a.results)
	}
	var content capnp.Ptr
	if err == nil {
		content, err = msg.Root()
	}
	if err != nil {
		msg.Release()
		c.settleLocked(fx, q, nil, capnp.Ptr{}, fmt.Errorf("captp: copy tail call results: %w", err))
		return
	}
	if embargo := c.returnEmbargo(q, content); embargo != nil {
		table := msg.CapTable()
		for i := 0; i < table.Len(); i++ {
			cl, err := embargo(i, table.At(i))
			if err != nil {
				continue
			}
			table.Set(capnp.CapabilityID(i), cl)
		}
	}
	c.settleLocked(fx, q, msg, content, nil)
}

// afterSettle finishes a question whose caller already released it (or a
// bootstrap question, whose answer only serves its capability).
func (c *Conn) afterSettle(q *question) {
	var fx effects
	c.mu.Lock()
	q.settling = false
	if q.released && !q.bootstrap {
		q.finishLocked(&fx)
	}
	c.unlock()
	fx.run()
	if q.bootstrap {
		q.release()
	}
}

// returnEmbargo embargoes capabilities in q's results that name our own
// objects and that calls were pipelined to: those calls went through the
// peer and must arrive before calls made directly from now on.
func (c *Conn) returnEmbargo(q *question, content capnp.Ptr) func(int, capnp.Client) (capnp.Client, error) {
	if len(q.pipelined) == 0 {
		return nil
	}
	return func(i int, cl capnp.Client) (capnp.Client, error) {
		for _, t := range q.pipelined {
			ptr, err := capnp.Transform(content, t)
			if err != nil || !ptr.Interface().IsValid() || int(ptr.Interface().Capability()) != i {
				continue
			}
			return c.embargoLocked(cl, func(mt rpccp.MessageTarget) error {
				pa, err := mt.NewPromisedAnswer()
				if err != nil {
					return err
				}
				return writePromisedAnswer(pa, q.id, t)
			})
		}
		return cl, nil
	}
}

func (c *Conn) handleFinish(fx *effects, m rpccp.Message) error {
	f, err := m.Finish()
	if err != nil {
		return violation("decode finish: %w", err)
	}
	return c.finishLocked(fx, f.QuestionId(), f.ReleaseResultCaps())
}

// finishLocked handles a Finish for question qid.
func (c *Conn) finishLocked(fx *effects, qid uint32, releaseResultCaps bool) error {
	a := c.answers[qid]
	if a == nil {
		if _, ok := c.finishOptional[qid]; ok {
			// We said no Finish was needed; the peer sent one anyway.
			delete(c.finishOptional, qid)
			return nil
		}
		return violation("finish for unknown question %d", qid)
	}
	if a.finished {
		return violation("second finish for question %d", a.id)
	}
	if a.provision != nil {
		// The introducer is done with its Provide.
		delete(c.answers, a.id)
		c.dropProvisionLocked(fx, a)
		return nil
	}
	if a.accept != nil {
		// The recipient gave up on a waiting Accept.
		c.vat.forget(a.accept)
		a.accept = nil
		a.finished = true
		a.outErr = ErrNoProvision
		c.returnLocked(fx, a) // canceled, and retired
		return nil
	}
	a.finished = true
	if !a.returned {
		a.ctx.cancel() // the handler sees its context end
		return nil
	}
	if releaseResultCaps {
		c.releaseResultExportsLocked(fx, a)
	}
	a.resultExports = nil
	c.retireAnswerLocked(fx, a)
	return nil
}

func (c *Conn) handleResolve(fx *effects, m rpccp.Message) error {
	r, err := m.Resolve()
	if err != nil {
		return violation("decode resolve: %w", err)
	}
	id := r.PromiseId()
	ie := c.imports[id]
	// Only an unresolved promise we still hold takes a resolution; one we
	// released already (the Resolve crossed our Release) is ignored.
	pending := ie != nil && ie.promise && !ie.resolved
	switch r.Which() {
	case rpccp.Resolve_Which_cap:
		d, err := r.Cap()
		if err != nil {
			return violation("decode resolve: %w", err)
		}
		cl, local, err := c.importCapLocked(fx, d, true)
		if err != nil {
			return violation("resolve of promise %d: %w", id, err)
		}
		if !pending {
			fx.releaseClient(cl) // give back the reference the peer just sent
			return nil
		}
		if local {
			embargoed, err := c.embargoLocked(cl, func(mt rpccp.MessageTarget) error {
				mt.SetImportedCap(id)
				return nil
			})
			if err != nil {
				fx.releaseClient(cl)
				return err
			}
			cl = embargoed
		}
		// Calls that reach the import before its clients switch over
		// must follow the resolution too; the entry owns cl from now on.
		hook := ie.hook
		signal := ie.settledSignalLocked()
		ie.resolved, ie.resolution = true, cl
		cl = cl.AddRef()
		ie.settleLocked(fx, func(resolvers []capnp.Resolver[capnp.Client]) {
			defer closeSignal(signal)
			defer cl.Release()
			// A promise resolved to itself (directly or through other
			// promises) would make go-capnp chase the cycle forever.
			if resolvesTo(cl, hook) {
				err := exc.New(exc.Failed, "captp", fmt.Sprintf("promise %d resolved to itself", id))
				breakPromises(err, resolvers...)
				return
			}
			for _, r := range resolvers {
				r.Fulfill(cl)
			}
		})
	case rpccp.Resolve_Which_exception:
		e, err := r.Exception()
		if err != nil {
			return violation("decode resolve: %w", err)
		}
		if pending {
			rerr := e.ToError()
			signal := ie.settledSignalLocked()
			ie.resolved, ie.resolution = true, brokenClient(rerr)
			ie.settleLocked(fx, func(resolvers []capnp.Resolver[capnp.Client]) {
				breakPromises(rerr, resolvers...)
				closeSignal(signal)
			})
		}
	default:
		return violation("unknown resolve type %d", r.Which())
	}
	return nil
}

func (c *Conn) handleDisembargo(fx *effects, m rpccp.Message) error {
	d, err := m.Disembargo()
	if err != nil {
		return violation("decode disembargo: %w", err)
	}
	dc := d.Context()
	switch dc.Which() {
	case rpccp.Disembargo_context_Which_senderLoopback:
		mt, err := d.Target()
		if err != nil {
			return violation("decode disembargo target: %w", err)
		}
		back, err := c.loopbackTargetLocked(mt)
		if err != nil {
			return violation("disembargo: %w", err)
		}
		msg, out, err := newMessage()
		if err != nil {
			return err
		}
		defer msg.Release()
		reply, err := out.NewDisembargo()
		if err != nil {
			return err
		}
		rt, err := reply.NewTarget()
		if err == nil {
			err = back.write(rt)
		}
		if err != nil {
			return err
		}
		reply.Context().SetReceiverLoopback(dc.SenderLoopback())
		return c.sendLocked(msg)
	case rpccp.Disembargo_context_Which_receiverLoopback:
		id := dc.ReceiverLoopback()
		em := c.embargoes[id]
		if em == nil {
			return violation("disembargo for unknown embargo %d", id)
		}
		delete(c.embargoes, id)
		c.embargoIDs.put(id)
		fx.add(func() { em.end(nil) })
		return nil
	case rpccp.Disembargo_context_Which_accept:
		err := c.handleAcceptDisembargoLocked(fx, d)
		if errors.Is(err, errUnimplementedHere) {
			return c.sendUnimplementedLocked(m)
		}
		return err
	default:
		return c.sendUnimplementedLocked(m)
	}
}

// loopbackTargetLocked checks that a senderLoopback Disembargo targets a
// promise or answer of ours that resolved to a capability of the peer,
// and returns that capability in the peer's terms.
func (c *Conn) loopbackTargetLocked(mt rpccp.MessageTarget) (*loopbackTarget, error) {
	switch mt.Which() {
	case rpccp.MessageTarget_Which_importedCap:
		e := c.exports[mt.ImportedCap()]
		if e == nil {
			return nil, fmt.Errorf("unknown export %d", mt.ImportedCap())
		}
		if !e.resolved || e.loopback == nil {
			return nil, fmt.Errorf("export %d is not a promise resolved to a capability of the sender", e.id)
		}
		return e.loopback, nil
	case rpccp.MessageTarget_Which_promisedAnswer:
		pa, err := mt.PromisedAnswer()
		if err != nil {
			return nil, err
		}
		a, transform, err := c.promisedAnswerLocked(pa, nil)
		if err != nil {
			return nil, err
		}
		if !a.returned || a.err != nil || a.msg == nil {
			return nil, fmt.Errorf("question %d has no results to disembargo", a.id)
		}
		ptr, err := capnp.Transform(a.results, transform)
		if err != nil {
			return nil, err
		}
		// Answer with what our Return said that capability was.
		if iface := ptr.Interface(); iface.IsValid() {
			ret, err := returnOf(a.msg, a.ret)
			if err != nil {
				return nil, err
			}
			payload, err := ret.Results()
			if err != nil {
				return nil, err
			}
			list, err := payload.CapTable()
			if err != nil {
				return nil, err
			}
			if i := int(iface.Capability()); i < list.Len() {
				if back := loopbackOf(list.At(i)); back != nil {
					return back, nil
				}
			}
		}
		return nil, fmt.Errorf("question %d's result is not a capability of the sender", a.id)
	default:
		return nil, fmt.Errorf("unknown target type %d", mt.Which())
	}
}

func (c *Conn) handleUnimplemented(fx *effects, m rpccp.Message) error {
	inner, err := m.Unimplemented()
	if err != nil {
		return violation("decode unimplemented: %w", err)
	}
	switch inner.Which() {
	case rpccp.Message_Which_resolve:
		// The peer ignored our Resolve; take back the reference it carried.
		r, err := inner.Resolve()
		if err != nil || r.Which() != rpccp.Resolve_Which_cap {
			return nil
		}
		d, err := r.Cap()
		if err != nil {
			return nil
		}
		switch d.Which() {
		case rpccp.CapDescriptor_Which_senderHosted:
			return c.releaseExportIfPresent(fx, d.SenderHosted())
		case rpccp.CapDescriptor_Which_senderPromise:
			return c.releaseExportIfPresent(fx, d.SenderPromise())
		}
	case rpccp.Message_Which_bootstrap, rpccp.Message_Which_call:
		var qid uint32
		if inner.Which() == rpccp.Message_Which_call {
			call, err := inner.Call()
			if err != nil {
				return nil
			}
			qid = call.QuestionId()
		} else {
			b, err := inner.Bootstrap()
			if err != nil {
				return nil
			}
			qid = b.QuestionId()
		}
		if q := c.questions[qid]; q != nil && !q.returned {
			q.returned = true
			if !q.settled && q.native != nil {
				q.settled = true
				q.failNativeLocked(fx, exc.New(exc.Unimplemented, "captp", "peer does not implement this message"))
			} else if !q.settled {
				q.settled = true
				p := q.p
				fx.add(func() {
					p.Reject(exc.New(exc.Unimplemented, "captp", "peer does not implement this message"))
					c.afterSettle(q)
				})
			}
		}
	default:
		c.log.Info("captp: peer does not implement a message we sent", "which", inner.Which().String())
	}
	return nil
}

func (c *Conn) releaseExportIfPresent(fx *effects, id uint32) error {
	if c.exports[id] == nil {
		return nil
	}
	return c.releaseExportLocked(fx, id, 1)
}

// marshalException fills e from err, keeping its exception type.
func marshalException(e rpccp.Exception, err error) error {
	e.SetType(rpccp.Exception_Type(exc.TypeOf(err)))
	return e.SetReason(err.Error())
}

// resolvesTo reports whether client, followed as far as it has resolved,
// ends at hook: an imported promise resolving to itself.
func resolvesTo(client capnp.Client, hook *importClient) bool {
	return resolvesToHook(client, hook)
}

// resolvesToHook reports whether client, followed as far as it has
// resolved, ends at the capnp.ClientHook hook (a promise cycle that
// go-capnp would chase forever).
func resolvesToHook(client capnp.Client, hook capnp.ClientHook) bool {
	if !client.IsValid() {
		return false
	}
	snap := client.Snapshot()
	defer snap.Release()
	return snap.Brand().Value == any(hook)
}

// checkNewAnswerLocked checks that the peer may open an answer with id qid
// for a message of kind what: the id is free, and the table has room.
// Answered calls stay in the table until the peer's Finish; a peer that
// never finishes would grow it forever.
func (c *Conn) checkNewAnswerLocked(what string, qid uint32) error {
	if c.answers[qid] != nil {
		return violation("%s reuses question id %d still in use", what, qid)
	}
	if len(c.finishOptional) > 0 {
		delete(c.finishOptional, qid) // the peer knew it needed no Finish
	}
	if len(c.answers) >= answerTableLimit(c.lim) {
		return violation("peer keeps more than %d calls unfinished", answerTableLimit(c.lim))
	}
	return nil
}

// answerTableLimit bounds answers returned but not yet finished by the
// peer, on top of the MaxAnswers still running.
func answerTableLimit(l Limits) int { return 4 * l.MaxAnswers }
