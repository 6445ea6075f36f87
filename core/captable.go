package core

import (
	"context"
	"errors"
	"fmt"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/exc"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"

	"github.com/captp-go/captp/core/flow"
	"github.com/captp-go/captp/internal/callqueue"
)

// An importEntry is a capability the peer exported to us. refs counts the
// descriptors received for it, which one Release gives back.
//
// Repeated descriptors return the same capnp client while it lives (so
// IsSame holds); once it is shutting down a new one wraps the same hook,
// and the hook counts its wrappers: the last to shut down releases.
type importEntry struct {
	id      uint32
	refs    uint32
	hook    *importClient
	weak    capnp.WeakClient // the newest wrapper
	clients int              // live wrappers around hook
	promise bool
	// resolvers settle the promise clients handed out (promise imports).
	resolvers []capnp.Resolver[capnp.Client]
	// latches keep the resolvers working for capabilities that hold the
	// import's hook rather than one of its clients (latch.go).
	latches  []latch
	resolved bool
	// resolution is what the promise resolved to; calls still arriving at
	// the import hook go there.
	resolution capnp.Client
}

// importClient is the capnp.ClientHook of an imported capability.
type importClient struct {
	c  *Conn
	id uint32
	// lim is the object's flow control, shared by every client handed
	// out for it; nil when flow control is off.
	lim *flow.Limiter
	// settled, made for a promise import, is closed once the promise
	// resolves or the connection ends (settledSignalLocked). go-capnp
	// v3.1.0-alpha.2 cannot switch over a capability that holds this
	// hook without holding one of its clients, such as one pipelined on
	// freed results (its resolver does nothing then; upstream issue 653),
	// so what waits on an import's resolution on our side waits on this
	// too (waitSettled), and follows ie.resolution (settledTarget).
	settled chan struct{}
}

// settledSignalLocked returns, for a promise import about to resolve or
// be dropped unresolved (the connection ended), the channel to close
// once its resolvers have run, so that go-capnp switches over what it
// can first; nil otherwise. Its callers mark ie resolved or delete it
// at once, so each channel is handed out once.
func (ie *importEntry) settledSignalLocked() chan struct{} {
	if ie.resolved {
		return nil
	}
	return ie.hook.settled
}

// closeSignal closes ch unless it is nil.
func closeSignal(ch chan struct{}) {
	if ch != nil {
		close(ch)
	}
}

// A settler is a promise hook of captp's own that knows when it settled
// and what to, even when go-capnp cannot switch over a capability holding
// it (see importClient.settled): an import of the peer's promise, a
// capability pipelined on a native call, or a bootstrap promise.
type settler interface {
	// settledSignal returns a channel closed once the promise settled,
	// or nil if the hook is not a promise.
	settledSignal() <-chan struct{}
	isSettled() bool
	// settledTo returns what the settled promise settled to, a reference
	// the caller owns. The caller holds a client of the hook.
	settledTo() capnp.Client
}

func (h *importClient) settledSignal() <-chan struct{} {
	if h.settled == nil {
		return nil // not a promise
	}
	return h.settled
}

func (h *importClient) isSettled() bool { return h.settled != nil && closed(h.settled) }

// closed reports, without waiting, whether ch is closed.
func closed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// settledTo returns a broken capability if h's connection ended before
// the promise resolved. The caller's client keeps h's entry otherwise.
func (h *importClient) settledTo() capnp.Client {
	c := h.c
	c.mu.Lock()
	defer c.unlock()
	if ie := c.imports[h.id]; ie != nil && ie.hook == h && ie.resolved {
		return ie.resolution.AddRef()
	}
	return brokenClient(exc.New(exc.Disconnected, "captp", fmt.Sprintf("connection closed before promise import %d resolved", h.id)))
}

// stuckOn returns the hook of ours that snap is a promise of, if any.
func stuckOn(snap capnp.ClientSnapshot) (settler, bool) {
	if !snap.IsPromise() {
		return nil, false
	}
	h, ok := snap.Brand().Value.(settler)
	if !ok || h.settledSignal() == nil {
		return nil, false
	}
	return h, true
}

// maxSettledHops bounds how far settledTarget follows promise imports
// that resolved to other promise imports.
const maxSettledHops = 16

// settledTarget returns cl, or, if cl is stuck on a promise hook of ours
// that has settled (see settler), what that promise settled to, followed
// as far as it goes. The caller owns the result.
func settledTarget(cl capnp.Client) capnp.Client {
	cl = cl.AddRef()
	for range maxSettledHops {
		snap := cl.Snapshot()
		h, ok := stuckOn(snap)
		snap.Release()
		if !ok || !h.isSettled() {
			return cl
		}
		next := h.settledTo()
		cl.Release()
		cl = next
	}
	cl.Release()
	return brokenClient(errSettleCycle)
}

// Settle waits until cl, which may be a promise, has settled, and
// returns what it settled to: a new reference the caller releases, or cl
// itself (a new reference too) if it was no promise. It ends with ctx's
// error if ctx ends first.
//
// Unlike cl.Resolve, it also returns for a capability that go-capnp
// v3.1.0-alpha.2 leaves on one of the core's promises after the promise
// settled: one pipelined on call results that were released before the
// promise resolved (README, Known issues). Calls on such a capability
// already reach the resolution; Settle gives the caller the resolution
// itself, for comparisons (IsSame) and for code that waits on Resolve.
func Settle(ctx context.Context, cl capnp.Client) (capnp.Client, error) {
	cl = cl.AddRef()
	for range maxSettledHops {
		if err := waitSettled(ctx, cl); err != nil {
			cl.Release()
			return capnp.Client{}, err
		}
		// waitSettled returned: cl has resolved, or is stuck on a hook of
		// ours that has settled, which gives the next hop.
		snap := cl.Snapshot()
		h, stuck := stuckOn(snap)
		snap.Release()
		if !stuck {
			return cl, nil
		}
		next := h.settledTo()
		cl.Release()
		cl = next
	}
	cl.Release()
	return capnp.Client{}, errSettleCycle
}

var errSettleCycle = errors.New("captp: promises resolve to each other in a cycle")

// waitSettled waits until cl has resolved, or is stuck on a promise hook
// of ours that has settled (see settler).
func waitSettled(ctx context.Context, cl capnp.Client) error {
	snap := cl.Snapshot()
	defer snap.Release()
	for snap.IsPromise() {
		h, ok := stuckOn(snap)
		if !ok {
			if err := snap.Resolve1(ctx); err != nil {
				return err
			}
			continue
		}
		if h.isSettled() {
			return nil
		}
		signal := h.settledSignal()
		step, cancel := context.WithCancel(ctx)
		go func() {
			select {
			case <-signal:
				cancel()
			case <-step.Done():
			}
		}()
		err := snap.Resolve1(step)
		cancel()
		if err != nil && (ctx.Err() != nil || !h.isSettled()) {
			return err
		}
		// Resolved, or settled: the next round tells which.
	}
	return nil
}

func (h *importClient) Send(ctx context.Context, s capnp.Send) (*capnp.Answer, capnp.ReleaseFunc) {
	return h.c.sendCall(ctx, callTarget{importID: h.id}, s)
}

func (h *importClient) Recv(ctx context.Context, r capnp.Recv) capnp.PipelineCaller {
	return h.c.forwardCall(ctx, callTarget{importID: h.id}, r)
}

// limit makes cl's calls wait for the object's flow-control window
// (go-capnp keeps the limiter per client value, not per hook).
func (h *importClient) limit(cl capnp.Client) {
	if h.lim != nil {
		cl.SetFlowLimiter(h.lim)
	}
}

func (h *importClient) Brand() capnp.Brand { return capnp.Brand{Value: h} }

func (h *importClient) String() string { return fmt.Sprintf("captp import %d", h.id) }

// Shutdown runs when the last local reference is dropped: it gives every
// reference received for this import back to the peer in one Release.
func (h *importClient) Shutdown() { h.c.scheduleTask(h) }

// runTask is Shutdown's work, under c.mu.
func (h *importClient) runTask(fx *effects) {
	c := h.c
	ie := c.imports[h.id]
	if ie == nil || ie.hook != h {
		return // the connection is gone
	}
	if ie.clients--; ie.clients > 0 {
		return
	}
	delete(c.imports, h.id)
	ie.resolvers = nil // and no latches: each holds a client
	fx.releaseClient(ie.resolution)
	ie.resolution = capnp.Client{}
	if !c.closing {
		wake := c.wakeWriter
		c.sendReleaseLocked(h.id, ie.refs)
		c.noHasteLocked(wake)
	}
}

func (c *Conn) sendReleaseLocked(id, count uint32) {
	c.sendTemplateLocked(&releaseTemplate, id, count)
}

// releaseTemplate is the encoded Release frame, patched with the import
// id and the reference count.
var releaseTemplate = newFrameTemplate("Release", 2, func(m rpccp.Message, v []uint32) error {
	rel, err := m.NewRelease()
	if err != nil {
		return err
	}
	rel.SetId(v[0])
	rel.SetReferenceCount(v[1])
	return nil
})

// addImportLocked returns a client for the peer's export id, counting one
// more reference to it.
func (c *Conn) addImportLocked(id uint32, promise bool) (capnp.Client, error) {
	ie := c.imports[id]
	if ie == nil {
		if len(c.imports) >= c.lim.MaxImports {
			return capnp.Client{}, fmt.Errorf("import limit reached (%d capabilities)", c.lim.MaxImports)
		}
		both := &struct {
			e importEntry
			h importClient
		}{} // one allocation for both
		both.h = importClient{c: c, id: id, lim: c.flow.NewLimiter()}
		if promise {
			both.h.settled = make(chan struct{})
		}
		both.e = importEntry{id: id, hook: &both.h, promise: promise}
		ie = &both.e
		c.imports[id] = ie
	}
	ie.refs++
	if ie.resolved {
		// The peer named a promise it has already resolved for us (the
		// descriptor crossed our Release); that is its resolution now.
		return ie.resolution.AddRef(), nil
	}
	if ie.clients > 0 {
		if cl, ok := ie.weak.AddRef(); ok {
			ie.hook.limit(cl)
			return cl, nil
		}
	}
	ie.clients++
	var cl capnp.Client
	if ie.promise {
		var r capnp.Resolver[capnp.Client]
		cl, r = capnp.NewPromisedClient(ie.hook)
		ie.resolvers = append(ie.resolvers, r)
	} else {
		cl = capnp.NewClient(ie.hook)
	}
	ie.hook.limit(cl)
	ie.weak = cl.WeakRef()
	return cl, nil
}

// settleLocked queues settle, given the resolvers of ie's promise
// clients, then the release of the clients latches kept for them.
func (ie *importEntry) settleLocked(fx *effects, settle func([]capnp.Resolver[capnp.Client])) {
	resolvers, latches := ie.resolvers, ie.latches
	ie.resolvers, ie.latches = nil, nil
	fx.add(func() {
		settle(resolvers)
		for _, l := range latches {
			l.keep.Release()
		}
	})
}

// An export is a capability we exported to the peer.
type export struct {
	id     uint32
	client capnp.Client
	refs   uint32
	meta   *capnp.Metadata // identity of the exported hook, to reuse the id

	promise   bool
	stopWatch context.CancelFunc // stops waiting for the promise to settle
	resolved  bool               // Resolve sent
	loopback  *loopbackTarget    // the promise settled on a capability of the peer

	vine *vine // a three-party handoff's vine (thirdparty.go)

	// native is the exported object's hook when it is a native object
	// (native.go): calls go to it without capnp.Client.RecvCall.
	native *nativeServer
}

// loopbackTarget names, in the peer's terms, a capability of the peer that
// one of our promises or answers resolved to: what our descriptor said.
// Disembargo replies go there.
type loopbackTarget struct {
	importID   uint32
	answer     bool // a promised answer of the peer rather than an import
	questionID uint32
	transform  []capnp.PipelineOp
}

func (t *loopbackTarget) write(mt rpccp.MessageTarget) error {
	if !t.answer {
		mt.SetImportedCap(t.importID)
		return nil
	}
	pa, err := mt.NewPromisedAnswer()
	if err != nil {
		return err
	}
	return writePromisedAnswer(pa, t.questionID, t.transform)
}

// dropLocked forgets the export, releasing its client after the lock.
func (e *export) dropLocked(fx *effects) {
	if e.stopWatch != nil {
		e.stopWatch()
	}
	cl := e.client
	e.client = capnp.Client{}
	fx.releaseClient(cl)
}

// releaseExportLocked gives back count references to export id.
func (c *Conn) releaseExportLocked(fx *effects, id, count uint32) error {
	e := c.exports[id]
	if e == nil {
		return fmt.Errorf("release of unknown export %d", id)
	}
	if count > e.refs {
		return fmt.Errorf("release of %d references to export %d, which has %d", count, id, e.refs)
	}
	e.refs -= count
	c.vineUsedLocked(fx, e)
	if e.refs == 0 {
		delete(c.exports, id)
		if c.exportsByHook[e.meta] == id {
			delete(c.exportsByHook, e.meta)
		}
		c.exportIDs.put(id)
		e.dropLocked(fx)
	}
	return nil
}

// fillCapTableLocked writes a CapDescriptor for each capability in table
// into payload, exporting local ones. It returns the export ids that
// gained a reference, appended to exported. If natives is not nil, it is
// set to the native objects among the exports, by cap table index (nil
// if none), in nativesBuf when that has room. (The buffers let an
// answer keep both in arrays of its own.)
func (c *Conn) fillCapTableLocked(fx *effects, payload rpccp.Payload, table *capnp.CapTable, exported []uint32, natives *[]*nativeServer, nativesBuf []*nativeServer) ([]uint32, error) {
	n := table.Len()
	if n == 0 {
		return nil, nil
	}
	list, err := payload.NewCapTable(int32(n))
	if err != nil {
		return nil, fmt.Errorf("encode cap table: %w", err)
	}
	for i := 0; i < n; i++ {
		id, isExport, err := c.describeCapLocked(fx, list.At(i), table.At(i))
		if err != nil {
			for _, id := range exported {
				_ = c.releaseExportLocked(fx, id, 1)
			}
			if natives != nil {
				*natives = nil
			}
			return nil, err
		}
		if !isExport {
			continue
		}
		exported = append(exported, id)
		if e := c.exports[id]; natives != nil && e.native != nil {
			if *natives == nil {
				if n <= len(nativesBuf) {
					*natives = nativesBuf[:n:n]
				} else {
					*natives = make([]*nativeServer, n)
				}
			}
			(*natives)[i] = e.native
		}
	}
	return exported, nil
}

// describeCapLocked fills d for client: a reference back to the peer when
// the capability is the peer's, otherwise an export.
func (c *Conn) describeCapLocked(fx *effects, d rpccp.CapDescriptor, client capnp.Client) (uint32, bool, error) {
	// One reference for both questions (each of IsValid, Snapshot and
	// AddRef allocates one): a null, released or broken-to-null client
	// has an invalid snapshot.
	snap := client.Snapshot()
	defer snap.Release()
	if !snap.IsValid() {
		d.SetNone()
		return 0, false, nil
	}
	switch h := snap.Brand().Value.(type) {
	case *importClient:
		if h.c == c {
			d.SetReceiverHosted(h.id)
			return 0, false, nil
		}
		if id, ok, err := c.introduceLocked(fx, d, client, h); ok || err != nil {
			return id, ok, err
		}
	case capnp.PipelineClient:
		if q := c.questionsByAns[h.Answer()]; q != nil && q.c == c && !q.finished {
			pa, err := d.NewReceiverAnswer()
			if err != nil {
				return 0, false, err
			}
			return 0, false, writePromisedAnswer(pa, q.id, h.Transform())
		}
	case *bootstrapHook:
		if h.q.c == c && !h.q.finished {
			pa, err := d.NewReceiverAnswer()
			if err != nil {
				return 0, false, err
			}
			return 0, false, writePromisedAnswer(pa, h.q.id, nil)
		}
	case *nativePipeline:
		if h.q.c == c && !h.q.finished {
			pa, err := d.NewReceiverAnswer()
			if err != nil {
				return 0, false, err
			}
			return 0, false, writePromisedAnswer(pa, h.q.id, h.transform)
		}
	}
	meta := snap.Metadata()
	if id, ok := c.exportsByHook[meta]; ok {
		e := c.exports[id]
		e.refs++
		if e.promise && !e.resolved {
			d.SetSenderPromise(id)
		} else {
			d.SetSenderHosted(id)
		}
		return id, true, nil
	}
	if len(c.exports) >= c.lim.MaxExports {
		return 0, false, fmt.Errorf("export limit reached (%d capabilities)", c.lim.MaxExports)
	}
	e := &export{
		id:      c.exportIDs.get(),
		client:  client.AddRef(),
		refs:    1,
		meta:    meta,
		promise: snap.IsPromise(),
	}
	e.native, _ = snap.Brand().Value.(*nativeServer)
	c.exports[e.id] = e
	c.exportsByHook[meta] = e.id
	if e.promise {
		d.SetSenderPromise(e.id)
		c.watchPromiseLocked(fx, e)
	} else {
		d.SetSenderHosted(e.id)
	}
	return e.id, true, nil
}

// watchPromiseLocked sends a Resolve once the exported promise settles.
func (c *Conn) watchPromiseLocked(fx *effects, e *export) {
	ctx, stop := context.WithCancel(c.ctx)
	e.stopWatch = stop
	cl := e.client.AddRef()
	if c.manual {
		c.pending = append(c.pending, pendingWork{promise: e, client: cl, ctx: ctx})
		return
	}
	fx.add(func() {
		go func() {
			defer cl.Release()
			if err := waitSettled(ctx, cl); err != nil {
				return // export released or connection closed
			}
			c.resolveExport(e, cl)
		}()
	})
}

// resolveExport sends Resolve for a settled exported promise.
func (c *Conn) resolveExport(e *export, cl capnp.Client) {
	cl = settledTarget(cl) // before c.mu: it may lock an import's Conn
	defer cl.Release()
	var fx effects
	defer fx.run()
	c.mu.Lock()
	defer c.unlock()
	if c.closing || c.exports[e.id] != e || e.resolved {
		return
	}
	e.resolved = true
	msg, m, err := newMessage()
	if err != nil {
		return
	}
	defer msg.Release()
	res, err := m.NewResolve()
	if err != nil {
		return
	}
	res.SetPromiseId(e.id)
	snap := cl.Snapshot()
	brand := snap.Brand().Value
	snap.Release()
	if broken, ok := brand.(error); ok {
		ex, err := res.NewException()
		if err == nil {
			err = marshalException(ex, broken)
		}
		if err != nil {
			return
		}
	} else {
		d, err := res.NewCap()
		if err != nil {
			return
		}
		_, _, err = c.describeCapLocked(&fx, d, cl)
		if err != nil {
			ex, err2 := res.NewException()
			if err2 != nil {
				return
			}
			if marshalException(ex, err) != nil {
				return
			}
		}
		e.loopback = loopbackOf(d)
	}
	_ = c.sendLocked(msg)
}

// loopbackOf returns the peer-side target a descriptor we sent names, if
// it names a capability of the peer.
func loopbackOf(d rpccp.CapDescriptor) *loopbackTarget {
	switch d.Which() {
	case rpccp.CapDescriptor_Which_receiverHosted:
		return &loopbackTarget{importID: d.ReceiverHosted()}
	case rpccp.CapDescriptor_Which_receiverAnswer:
		pa, err := d.ReceiverAnswer()
		if err != nil {
			return nil
		}
		ops, err := pa.Transform()
		if err != nil {
			return nil
		}
		t := &loopbackTarget{answer: true, questionID: pa.QuestionId()}
		for i := 0; i < ops.Len(); i++ {
			if ops.At(i).Which() == rpccp.PromisedAnswer_Op_Which_getPointerField {
				t.transform = append(t.transform, capnp.PipelineOp{Field: ops.At(i).GetPointerField()})
			}
		}
		return t
	}
	return nil
}

// importCapLocked decodes a descriptor the peer sent. local reports that
// it names one of our own capabilities (so E-order may need an embargo).
// inResolve reports that d resolves one of our imported promises.
func (c *Conn) importCapLocked(fx *effects, d rpccp.CapDescriptor, inResolve bool) (cl capnp.Client, local bool, err error) {
	switch d.Which() {
	case rpccp.CapDescriptor_Which_none:
		return capnp.Client{}, false, nil
	case rpccp.CapDescriptor_Which_senderHosted:
		cl, err = c.addImportLocked(d.SenderHosted(), false)
		return cl, false, err
	case rpccp.CapDescriptor_Which_senderPromise:
		cl, err = c.addImportLocked(d.SenderPromise(), true)
		return cl, false, err
	case rpccp.CapDescriptor_Which_thirdPartyHosted:
		// Picked up from the third party with a Vat (Level 3), else used
		// through the vine: a capability the sender hosts that proxies
		// to the third party.
		tp, err := d.ThirdPartyHosted()
		if err != nil {
			return capnp.Client{}, false, fmt.Errorf("decode thirdPartyHosted: %w", err)
		}
		cl, err = c.handoffLocked(fx, tp, inResolve)
		return cl, false, err
	case rpccp.CapDescriptor_Which_receiverHosted:
		e := c.exports[d.ReceiverHosted()]
		if e == nil {
			return capnp.Client{}, false, fmt.Errorf("receiverHosted names unknown export %d", d.ReceiverHosted())
		}
		return e.client.AddRef(), true, nil
	case rpccp.CapDescriptor_Which_receiverAnswer:
		pa, err := d.ReceiverAnswer()
		if err != nil {
			return capnp.Client{}, false, fmt.Errorf("decode receiverAnswer: %w", err)
		}
		a, transform, err := c.promisedAnswerLocked(pa, nil)
		if err != nil {
			if _, ok := c.finishOptional[pa.QuestionId()]; ok {
				return brokenClient(errNoCapability), true, nil
			}
			return capnp.Client{}, false, fmt.Errorf("receiverAnswer: %w", err)
		}
		return c.answerClientLocked(a, transform), true, nil
	default:
		return capnp.Client{}, false, fmt.Errorf("unknown capability descriptor type %d", d.Which())
	}
}

// answerClientLocked returns a client for the capability at transform in
// answer a's results, pipelining if the call is still running.
func (c *Conn) answerClientLocked(a *answer, transform []capnp.PipelineOp) capnp.Client {
	switch {
	case a.returned && a.err != nil:
		return brokenClient(a.err)
	case a.returned && a.msg != nil:
		ptr, err := capnp.Transform(a.results, transform)
		if err != nil {
			return brokenClient(fmt.Errorf("captp: %w", err))
		}
		return ptr.Interface().Client().AddRef()
	default:
		// A promise: calls queue behind the running call, and it settles
		// on the result once the call returns.
		hook := &localPipeline{c: c, a: a, transform: transform}
		cl, r := capnp.NewPromisedClient(hook)
		a.pipelines = append(a.pipelines, pendingPipeline{transform: transform, resolver: r, hook: hook, self: cl.AddRef()})
		return cl
	}
}

// errNoCapability fails calls pipelined on results that held no
// capability, after those results were dropped (noFinishNeededLocked).
var errNoCapability = errors.New("captp: pipelined call on results without capabilities")

// promisedAnswerLocked resolves a PromisedAnswer naming one of our
// answers; the transform's ops are appended to transform.
func (c *Conn) promisedAnswerLocked(pa rpccp.PromisedAnswer, transform []capnp.PipelineOp) (*answer, []capnp.PipelineOp, error) {
	a := c.answers[pa.QuestionId()]
	if a == nil {
		return nil, nil, fmt.Errorf("unknown question %d", pa.QuestionId())
	}
	if a.provision != nil {
		return nil, nil, fmt.Errorf("question %d is a Provide, which has no results", pa.QuestionId())
	}
	ops, err := pa.Transform()
	if err != nil {
		return nil, nil, fmt.Errorf("decode transform: %w", err)
	}
	for i := 0; i < ops.Len(); i++ {
		op := ops.At(i)
		switch op.Which() {
		case rpccp.PromisedAnswer_Op_Which_noop:
		case rpccp.PromisedAnswer_Op_Which_getPointerField:
			transform = append(transform, capnp.PipelineOp{Field: op.GetPointerField()})
		default:
			return nil, nil, fmt.Errorf("unknown transform op %d", op.Which())
		}
	}
	return a, transform, nil
}

// localPipeline is a client for a capability in the results of a local
// call that has not returned yet.
type localPipeline struct {
	c         *Conn
	a         *answer
	transform []capnp.PipelineOp
}

func (p *localPipeline) Send(ctx context.Context, s capnp.Send) (*capnp.Answer, capnp.ReleaseFunc) {
	return callqueue.SendAsRecv(ctx, s, p.Recv)
}

func (p *localPipeline) Recv(ctx context.Context, r capnp.Recv) capnp.PipelineCaller {
	p.c.pipelineCall(p.a, ctx, p.transform, r)
	// Pipelining on a call queued here is not supported; it fails.
	return callqueue.Failed(errors.New("captp: pipelined call on a call queued behind a running call"))
}

func (p *localPipeline) Brand() capnp.Brand { return capnp.Brand{Value: p} }
func (p *localPipeline) Shutdown()          {}
func (p *localPipeline) String() string     { return "captp local pipeline" }

// An embargo holds calls to a capability that resolved back to this side
// until the peer echoes our Disembargo, so that calls sent earlier through
// the peer arrive first (E-order).
type embargo struct {
	id       uint32
	target   capnp.Client
	hook     *embargoHook
	resolver capnp.Resolver[capnp.Client]
	// self keeps the promise resolvable until the embargo ends: go-capnp
	// v3.1.0-alpha.2's resolver does nothing once every client sharing
	// the first reference is released, yet a capability pipelined on
	// results that held the embargoed client keeps its hook and would
	// stay on it for good (upstream issue 653, fixed after that release).
	self capnp.Client
}

// embargoHook is the client of an embargoed capability: calls queue, in
// order, until the embargo lifts, then go to the target; once the promise
// resolves, new calls bypass the hook. Calls already queued are delivered
// even if nobody holds the embargoed client any more: they were made, and
// must arrive.
type embargoHook struct{ queue callqueue.Queue }

func (h *embargoHook) Send(ctx context.Context, s capnp.Send) (*capnp.Answer, capnp.ReleaseFunc) {
	return h.queue.Send(ctx, s)
}

func (h *embargoHook) Recv(ctx context.Context, r capnp.Recv) capnp.PipelineCaller {
	return h.queue.Recv(ctx, r)
}

func (h *embargoHook) Brand() capnp.Brand { return capnp.Brand{Value: h} }
func (h *embargoHook) String() string     { return "captp embargo" }

// Shutdown runs once no call can reach the hook any more, so the target
// can go once the queued calls have been delivered.
func (h *embargoHook) Shutdown() { h.queue.Drop() }

// end lifts the embargo (err == nil) or breaks it, outside c.mu: queued
// calls go to the target in order, then the promise resolves so that new
// calls go there directly.
func (em *embargo) end(err error) {
	if err != nil {
		em.hook.queue.Reject(err)
		breakPromises(err, em.resolver)
	} else {
		em.hook.queue.Fulfill(em.target)
		em.resolver.Fulfill(em.target)
	}
	em.target.Release()
	em.self.Release()
}

// embargoLocked returns a client that queues calls for target until the
// Disembargo that the caller sends (to mt's target) comes back.
func (c *Conn) embargoLocked(target capnp.Client, writeTarget func(rpccp.MessageTarget) error) (capnp.Client, error) {
	if testSkipEmbargo {
		return target, nil
	}
	msg, m, err := newMessage()
	if err != nil {
		return capnp.Client{}, err
	}
	defer msg.Release()
	d, err := m.NewDisembargo()
	if err != nil {
		return capnp.Client{}, err
	}
	mt, err := d.NewTarget()
	if err != nil {
		return capnp.Client{}, err
	}
	if err := writeTarget(mt); err != nil {
		return capnp.Client{}, err
	}
	em := &embargo{id: c.embargoIDs.get(), target: target}
	d.Context().SetSenderLoopback(em.id)
	if err := c.sendLocked(msg); err != nil {
		c.embargoIDs.put(em.id)
		return capnp.Client{}, err
	}
	em.hook = new(embargoHook)
	client, resolver := capnp.NewPromisedClient(em.hook)
	em.resolver = resolver
	em.self = client.AddRef()
	c.embargoes[em.id] = em
	c.read.wakeLoop() // the Disembargo comes back
	return client, nil
}
