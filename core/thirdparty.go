package core

// Three-party handoff (rpc.capnp Level 3). The roles, as in rpc.capnp:
// Alice's vat (the introducer) passes Bob's vat (the recipient) a
// capability hosted by Carol's vat (the host).
//
//   - Alice exports a vine to Bob (a proxy for the capability, which Bob
//     uses only if he cannot reach Carol), sends Carol a Provide naming
//     the capability and Bob, and Bob a thirdPartyHosted descriptor naming
//     Carol and the vine. When Bob calls or releases the vine, Alice
//     finishes the Provide.
//   - Bob queues calls on the capability until he has connected to Carol,
//     then sends Accept and pipelines them on it. If the capability
//     resolved a promise or question Bob had already called through
//     Alice, his Accept carries an embargo id and he sends Alice a
//     Disembargo on the vine behind those calls; Alice forwards it to
//     Carol behind the calls she forwarded, and Carol delivers those
//     first, then returns the Accept and the calls Bob pipelined on it.
//     E-order holds. Once the Accept returns, Bob drops the vine.
//   - Carol keeps each provision until Alice finishes the Provide, and
//     gives it only to the peer the Network says the Provide named.
//
// Calls and lock order: each step runs under one connection's lock; a
// step that concerns another connection of the vat is scheduled on it
// (Conn.schedule) from the effects, so no goroutine holds two connection
// locks. Vat.mu is a leaf.

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"sync"
	"time"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/exc"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"

	"github.com/captp-go/captp/internal/callqueue"
)

// ---- Introducer (Alice) ----

// A vine is an export that stands for a capability handed to the peer by
// three-party handoff; it proxies to the import it was made from.
type vine struct {
	host     *Conn  // the connection to the capability's host (Carol)
	qid      uint32 // the Provide's question id on host, once sent
	sent     bool   // Provide sent (guarded by host.mu)
	finished bool   // Finish requested (guarded by the vine's own Conn)
}

// introduceLocked tries to describe client, an import of another
// connection of this vat, as thirdPartyHosted. It reports whether it did;
// otherwise the caller proxies it as a plain export.
func (c *Conn) introduceLocked(fx *effects, d rpccp.CapDescriptor, client capnp.Client, h *importClient) (uint32, bool, error) {
	host := h.c
	if c.vat == nil || host.vat != c.vat {
		return 0, false, nil
	}
	toContact, toAwait, ok, err := c.vat.net.Introduce(host, c)
	if err != nil || !ok {
		if err != nil {
			c.log.Debug("captp: three-party handoff not possible; proxying", "err", err)
		}
		return 0, false, nil
	}
	if len(c.exports) >= c.lim.MaxExports {
		return 0, false, fmt.Errorf("export limit reached (%d capabilities)", c.lim.MaxExports)
	}
	// The recipient tells Carol who it is with toAwait; keep a copy of our
	// own, since the Provide is sent later, on host's goroutine.
	await, err := copyPtr(toAwait)
	if err != nil {
		return 0, false, fmt.Errorf("three-party handoff: %w", err)
	}
	tp, err := d.NewThirdPartyHosted()
	if err == nil {
		err = tp.SetId(toContact)
	}
	if err != nil {
		await.Message().Release()
		return 0, false, fmt.Errorf("three-party handoff: %w", err)
	}
	// A vine of its own for every handoff (not shared through
	// exportsByHook): its first call or release finishes this Provide.
	v := &vine{host: host}
	e := &export{id: c.exportIDs.get(), client: client.AddRef(), refs: 1, vine: v}
	c.exports[e.id] = e
	tp.SetVineId(e.id)
	importID := h.id
	fx.add(func() {
		host.schedule(func(fx *effects) {
			defer await.Message().Release()
			host.sendProvideLocked(v, importID, await)
		})
	})
	return e.id, true, nil
}

// copyPtr copies p into a message of its own.
func copyPtr(p capnp.Ptr) (capnp.Ptr, error) {
	msg, seg, err := capnp.NewMessage(capnp.SingleSegment(nil))
	if err != nil {
		return capnp.Ptr{}, err
	}
	if err := msg.SetRoot(p); err != nil {
		msg.Release()
		return capnp.Ptr{}, err
	}
	_ = seg
	root, err := msg.Root()
	if err != nil {
		msg.Release()
		return capnp.Ptr{}, err
	}
	return root, nil
}

// sendProvideLocked sends the Provide for v: the import importID, to the
// recipient that await names.
func (c *Conn) sendProvideLocked(v *vine, importID uint32, await capnp.Ptr) {
	if c.closing || c.imports[importID] == nil {
		return // the recipient's Accept will fail; it keeps the vine
	}
	msg, m, err := newMessage()
	if err != nil {
		return
	}
	defer msg.Release()
	p, err := m.NewProvide()
	if err != nil {
		return
	}
	qid := c.questionIDs.get()
	p.SetQuestionId(qid)
	mt, err := p.NewTarget()
	if err == nil {
		mt.SetImportedCap(importID)
		err = p.SetRecipient(await)
	}
	if err == nil {
		err = c.sendLocked(msg)
	}
	if err != nil {
		c.questionIDs.put(qid)
		return
	}
	c.provides[qid] = v
	v.qid, v.sent = qid, true
	c.read.wakeLoop()
}

// vineUsedLocked runs when the peer calls or releases vine export e: the
// recipient has settled on a path, so the Provide can end.
func (c *Conn) vineUsedLocked(fx *effects, e *export) {
	v := e.vine
	if v == nil || v.finished {
		return
	}
	v.finished = true
	fx.add(func() {
		v.host.schedule(func(fx *effects) { v.host.finishProvideLocked(v) })
	})
}

// finishProvideLocked sends Finish for v's Provide.
func (c *Conn) finishProvideLocked(v *vine) {
	if !v.sent || c.provides[v.qid] != v {
		return
	}
	delete(c.provides, v.qid)
	if !c.closing {
		c.sendFinishLocked(v.qid, false)
	}
	c.questionIDs.put(v.qid)
}

// forwardAcceptDisembargoLocked relays the recipient's Disembargo on vine
// export e to the host, behind every call forwarded through the vine.
func (c *Conn) forwardAcceptDisembargoLocked(fx *effects, e *export, embargo []byte) error {
	v := e.vine
	if v == nil {
		return fmt.Errorf("disembargo (accept) on export %d, which is not a vine", e.id)
	}
	id := append([]byte(nil), embargo...)
	fx.add(func() {
		v.host.schedule(func(fx *effects) {
			if c := v.host; v.sent && !c.closing && c.provides[v.qid] == v {
				c.sendAcceptDisembargoLocked(func(mt rpccp.MessageTarget) error {
					pa, err := mt.NewPromisedAnswer()
					if err != nil {
						return err
					}
					pa.SetQuestionId(v.qid)
					return nil
				}, id)
			}
		})
	})
	return nil
}

// sendAcceptDisembargoLocked sends a Disembargo with context.accept.
func (c *Conn) sendAcceptDisembargoLocked(target func(rpccp.MessageTarget) error, embargo []byte) {
	msg, m, err := newMessage()
	if err != nil {
		return
	}
	defer msg.Release()
	d, err := m.NewDisembargo()
	if err != nil {
		return
	}
	mt, err := d.NewTarget()
	if err == nil {
		err = target(mt)
	}
	if err == nil {
		err = d.Context().SetAccept(embargo)
	}
	if err == nil {
		_ = c.sendLocked(msg)
	}
}

// ---- Host (Carol) ----

func (c *Conn) handleProvide(fx *effects, m rpccp.Message) error {
	if c.vat == nil {
		return c.sendUnimplementedLocked(m)
	}
	p, err := m.Provide()
	if err != nil {
		return violation("decode provide: %w", err)
	}
	qid := p.QuestionId()
	if err := c.checkNewAnswerLocked("provide", qid); err != nil {
		return err
	}
	mt, err := p.Target()
	if err != nil {
		return violation("decode provide target: %w", err)
	}
	var target capnp.Client
	switch mt.Which() {
	case rpccp.MessageTarget_Which_importedCap:
		e := c.exports[mt.ImportedCap()]
		if e == nil {
			return violation("provide of unknown export %d", mt.ImportedCap())
		}
		target = e.client.AddRef()
	case rpccp.MessageTarget_Which_promisedAnswer:
		pa, err := mt.PromisedAnswer()
		if err != nil {
			return violation("decode provide target: %w", err)
		}
		a, transform, err := c.promisedAnswerLocked(pa, nil)
		if err != nil {
			return violation("provide target: %w", err)
		}
		target = c.answerClientLocked(a, transform)
	default:
		return violation("unknown provide target type %d", mt.Which())
	}
	recipient, err := p.Recipient()
	if err != nil {
		fx.releaseClient(target)
		return violation("decode provide recipient: %w", err)
	}
	key, err := c.vat.net.Expect(c, recipient)
	if err != nil {
		fx.releaseClient(target)
		return violation("provide recipient: %w", err)
	}
	pr := &provision{key: key, conn: c, qid: qid, target: target}
	v := c.vat
	v.mu.Lock()
	if v.provisions[key] != nil {
		v.mu.Unlock()
		fx.releaseClient(target)
		return violation("provide: a provision for this recipient and nonce already exists")
	}
	v.provisions[key] = pr
	early := v.early[key]
	delete(v.early, key)
	v.mu.Unlock()
	// An answer of its own, so the question id is taken until Finish; it
	// never returns.
	a := &answer{c: c, id: qid, provision: pr, returned: true, published: true}
	c.answers[qid] = a
	for _, w := range early {
		c.vat.matchAccept(fx, pr, w)
	}
	return nil
}

// matchAccept gives pr to the Accept w (on any connection of the vat), now
// or, if it is embargoed, when its Disembargo comes.
func (v *Vat) matchAccept(fx *effects, pr *provision, w *acceptWait) {
	v.mu.Lock()
	if w.embargo != "" && !pr.released[w.embargo] {
		if pr.waiting == nil {
			pr.waiting = make(map[string][]*acceptWait)
		}
		pr.waiting[w.embargo] = append(pr.waiting[w.embargo], w)
		v.mu.Unlock()
		return
	}
	v.mu.Unlock()
	w.complete(fx, pr.target, nil)
}

// complete answers the Accept with target (or err), on its connection.
func (w *acceptWait) complete(fx *effects, target capnp.Client, err error) {
	if target.IsValid() {
		target = target.AddRef()
	} else {
		// Null, or a promise that resolved to null. Passing target itself
		// would give the Accept's results the provision's own reference:
		// two owners of one reference, and once either released it a
		// call pipelined on the other panicked in AddRef (simulation
		// seed 500332).
		target = capnp.Client{}
	}
	fx.add(func() {
		w.conn.schedule(func(fx *effects) { w.conn.returnAcceptLocked(fx, w.a, target, err) })
	})
}

func (c *Conn) handleAccept(fx *effects, m rpccp.Message) error {
	if c.vat == nil {
		return c.sendUnimplementedLocked(m)
	}
	acc, err := m.Accept()
	if err != nil {
		return violation("decode accept: %w", err)
	}
	qid := acc.QuestionId()
	if err := c.checkNewAnswerLocked("accept", qid); err != nil {
		return err
	}
	completion, err := acc.Provision()
	if err != nil {
		return violation("decode accept provision: %w", err)
	}
	embargo, err := acc.Embargo()
	if err != nil {
		return violation("decode accept embargo: %w", err)
	}
	a := c.newAnswerLocked(qid)
	key, err := c.vat.net.Complete(c, completion)
	if err != nil {
		c.log.Debug("captp: accept refused", "err", err)
		c.returnAcceptLocked(fx, a, capnp.Client{}, ErrNoProvision)
		return nil
	}
	w := &acceptWait{conn: c, a: a, embargo: string(embargo)}
	a.accept = w
	v := c.vat
	v.mu.Lock()
	pr := v.provisions[key]
	if pr == nil {
		// The Provide may still be on its way from the introducer; a
		// completion that names nothing gets its error after the wait.
		v.early[key] = append(v.early[key], w)
		v.mu.Unlock()
		if !c.manual {
			time.AfterFunc(v.acceptTimeout, func() {
				c.schedule(func(fx *effects) {
					if v.takeEarly(w) && a.accept == w {
						a.accept = nil
						c.returnAcceptLocked(fx, a, capnp.Client{}, ErrNoProvision)
					}
				})
			})
		}
		return nil
	}
	v.mu.Unlock()
	v.matchAccept(fx, pr, w)
	return nil
}

// returnAcceptLocked sends the Accept's Return: the provided capability,
// or err.
func (c *Conn) returnAcceptLocked(fx *effects, a *answer, target capnp.Client, err error) {
	if a.accept != nil {
		c.vat.forget(a.accept)
		a.accept = nil
	}
	if c.closing || c.answers[a.id] != a || a.returned {
		fx.releaseClient(target)
		return
	}
	if err == nil {
		_, err = a.AllocResults(capnp.ObjectSize{})
	}
	if err != nil {
		fx.releaseClient(target)
		a.outErr = exc.New(exc.Failed, "captp", err.Error())
		c.returnLocked(fx, a)
		return
	}
	payload, err := outResultsPayload(a)
	if err == nil {
		iface := capnp.NewInterface(payload.Segment(), a.out.CapTable().Add(target))
		a.outResults = iface.ToPtr()
		err = payload.SetContent(a.outResults)
	} else {
		fx.releaseClient(target)
	}
	c.prepareLocked(fx, a, err)
	if len(a.queued) > 0 && a.outErr == nil {
		// As answer.Return does: the calls pipelined on the Accept go
		// first, then the Return, so that none finds the answer finished.
		a.publishLocked()
		a.settlePipelinesLocked(fx)
		a.flushing = true
		fx.add(func() { c.flushQueued(a, false) })
		return
	}
	c.returnLocked(fx, a)
}

// forget removes an Accept that is no longer waiting (answered, finished
// by its sender, or its connection closed).
func (v *Vat) forget(w *acceptWait) {
	v.mu.Lock()
	defer v.mu.Unlock()
	for key, ws := range v.early {
		if i := indexOf(ws, w); i >= 0 {
			if ws = append(ws[:i], ws[i+1:]...); len(ws) == 0 {
				delete(v.early, key)
			} else {
				v.early[key] = ws
			}
			return
		}
	}
	for _, pr := range v.provisions {
		if ws := pr.waiting[w.embargo]; len(ws) > 0 {
			if i := indexOf(ws, w); i >= 0 {
				if ws = append(ws[:i], ws[i+1:]...); len(ws) == 0 {
					delete(pr.waiting, w.embargo)
				} else {
					pr.waiting[w.embargo] = ws
				}
				return
			}
		}
	}
}

// takeEarly removes w from the Accepts waiting for their Provide, and
// reports whether it was there.
func (v *Vat) takeEarly(w *acceptWait) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	for key, ws := range v.early {
		if i := indexOf(ws, w); i >= 0 {
			if ws = append(ws[:i], ws[i+1:]...); len(ws) == 0 {
				delete(v.early, key)
			} else {
				v.early[key] = ws
			}
			return true
		}
	}
	return false
}

func indexOf(ws []*acceptWait, w *acceptWait) int {
	for i, x := range ws {
		if x == w {
			return i
		}
	}
	return -1
}

// releaseProvisionDisembargoLocked handles the introducer's forwarded
// Disembargo (context.accept) for the Provide qid: the calls it forwarded
// through the vine have all been delivered, so the embargoed Accepts may
// return.
func (c *Conn) releaseProvisionDisembargoLocked(fx *effects, mt rpccp.MessageTarget, embargo []byte) error {
	pa, err := mt.PromisedAnswer()
	if err != nil {
		return err
	}
	a := c.answers[pa.QuestionId()]
	if a == nil || a.provision == nil {
		return fmt.Errorf("question %d is not a Provide", pa.QuestionId())
	}
	pr := a.provision
	v := c.vat
	v.mu.Lock()
	ws := pr.waiting[string(embargo)]
	delete(pr.waiting, string(embargo))
	if len(ws) == 0 && len(pr.released) < maxReleasedEmbargoes {
		// The Accept has not arrived yet: let it through when it does.
		if pr.released == nil {
			pr.released = make(map[string]bool)
		}
		pr.released[string(embargo)] = true
	}
	v.mu.Unlock()
	for _, w := range ws {
		w.complete(fx, pr.target, nil)
	}
	return nil
}

// dropProvisionLocked ends the provision a Provide answer a holds (its
// Finish, or the connection closing); embargoed Accepts still waiting
// for it fail.
func (c *Conn) dropProvisionLocked(fx *effects, a *answer) {
	pr := a.provision
	a.provision = nil
	v := c.vat
	v.mu.Lock()
	if v.provisions[pr.key] == pr {
		delete(v.provisions, pr.key)
	}
	var waiting []*acceptWait
	for _, ws := range pr.waiting {
		waiting = append(waiting, ws...)
	}
	pr.waiting = nil
	v.mu.Unlock()
	for _, w := range waiting {
		w.complete(fx, capnp.Client{}, ErrNoProvision)
	}
	fx.releaseClient(pr.target)
	pr.target = capnp.Client{}
}

// handleAcceptDisembargoLocked routes a Disembargo with context.accept: on
// the introducer it names a vine (forward it to the host); on the host, a
// Provide (release the embargoed Accepts).
func (c *Conn) handleAcceptDisembargoLocked(fx *effects, d rpccp.Disembargo) error {
	if c.vat == nil {
		return errUnimplementedHere
	}
	embargo, err := d.Context().Accept()
	if err != nil {
		return violation("decode disembargo: %w", err)
	}
	mt, err := d.Target()
	if err != nil {
		return violation("decode disembargo target: %w", err)
	}
	switch mt.Which() {
	case rpccp.MessageTarget_Which_importedCap:
		e := c.exports[mt.ImportedCap()]
		if e == nil {
			return violation("disembargo (accept) on unknown export %d", mt.ImportedCap())
		}
		if err := c.forwardAcceptDisembargoLocked(fx, e, embargo); err != nil {
			return violation("%w", err)
		}
		return nil
	case rpccp.MessageTarget_Which_promisedAnswer:
		if err := c.releaseProvisionDisembargoLocked(fx, mt, embargo); err != nil {
			return violation("disembargo (accept): %w", err)
		}
		return nil
	}
	return violation("unknown disembargo target type %d", mt.Which())
}

// errUnimplementedHere asks the dispatcher to answer Unimplemented.
var errUnimplementedHere = errors.New("unimplemented without a Vat")

// ---- Recipient (Bob) ----

// maxHandoffs bounds the pickups a connection runs at once (each a
// goroutine and a dial); capabilities beyond it are used through their
// vines.
const maxHandoffs = 64

// handoff is a capability received as thirdPartyHosted, while Bob picks
// it up from Carol. Its client is a promise whose calls queue, in order,
// until the Accept is sent; then they go pipelined on the Accept, and the
// promise follows it to the accepted capability. Bob never calls the
// vine while he can reach Carol (a call to the vine would end the
// Provide); he falls back to it when he cannot.
type handoff struct {
	via     *Conn
	vineID  uint32
	contact capnp.Ptr // ThirdPartyToContact, in a message of its own
	// embargo is set when the capability resolved a promise that Bob may
	// have called: those calls reach Carol through Alice, so Carol must
	// hold the Accept until Alice forwards Bob's Disembargo behind them.
	embargo bool
	promise *callqueue.Promise

	mu       sync.Mutex
	vine     capnp.Client // until the handoff is done
	accepted capnp.Client // the Accept's promise, until it settles
	vineGone bool         // dropVine ran
	// self keeps the promise alive until it is settled: go-capnp drops
	// the resolution of a promise whose clients are all gone, even if
	// another promise (the import it resolved) still leads to it.
	self capnp.Client
	stop context.CancelFunc
	done bool
}

// handoffLocked starts picking up a thirdPartyHosted capability.
// inResolve reports that it resolves one of our imported promises.
func (c *Conn) handoffLocked(fx *effects, tp rpccp.ThirdPartyCapDescriptor, inResolve bool) (capnp.Client, error) {
	vine, err := c.addImportLocked(tp.VineId(), false)
	if err != nil {
		return capnp.Client{}, err
	}
	if c.vat == nil {
		return vine, nil // Level 1/2: the vine is the capability
	}
	id, err := tp.Id()
	if err == nil {
		id, err = copyPtr(id)
	}
	if err != nil {
		fx.releaseClient(vine)
		return capnp.Client{}, fmt.Errorf("decode thirdPartyHosted: %w", err)
	}
	if c.handoffs.Load() >= maxHandoffs {
		// Each pickup dials and holds a goroutine while it does; a peer
		// sending descriptors faster than hosts answer gets the vines.
		id.Message().Release()
		return vine, nil
	}
	c.handoffs.Add(1)
	ctx, stop := context.WithCancel(c.ctx)
	cl, promise := callqueue.NewPromise()
	h := &handoff{via: c, vineID: tp.VineId(), contact: id, embargo: inResolve, promise: promise, vine: vine, self: cl.AddRef(), stop: stop}
	if c.manual {
		// The simulation's Network connects without blocking, and its
		// single goroutine must see every step.
		fx.add(func() { h.run(ctx) })
	} else {
		fx.add(func() { go h.run(ctx) })
	}
	return cl, nil
}

// run connects to the host, accepts the capability and settles the
// promise.
func (h *handoff) run(ctx context.Context) {
	defer h.via.handoffs.Add(-1)
	defer h.contact.Message().Release()
	defer h.stop()
	host, completion, err := h.via.vat.net.Connect(ctx, h.via, h.contact)
	if err != nil {
		h.via.log.Debug("captp: three-party handoff: cannot reach the host; using the vine", "err", err)
		h.settle(capnp.Client{})
		return
	}
	var embargo []byte
	if h.embargo {
		embargo = make([]byte, 16)
		_, _ = rand.Read(embargo)
	}
	// The vine goes once the Accept has returned (its Release lets Alice
	// finish the Provide).
	// Not ctx: that ends with run, and the Accept must outlive it (it
	// ends with the connection to the host).
	accepted := host.requestCap(context.Background(), "accept", h.dropVine, func(m rpccp.Message, qid uint32) error {
		acc, err := m.NewAccept()
		if err != nil {
			return err
		}
		acc.SetQuestionId(qid)
		if err := acc.SetProvision(completion); err != nil {
			return err
		}
		if embargo != nil {
			return acc.SetEmbargo(embargo)
		}
		return nil
	})
	// A reference kept until the Accept settles: with no client left, the
	// question would be finished early and calls routed to it would fail.
	h.mu.Lock()
	if !h.vineGone {
		h.accepted = accepted.AddRef()
	}
	h.mu.Unlock()
	defer accepted.Release()
	if embargo != nil {
		// Behind every call Bob made on the promise this capability
		// resolved; Alice forwards it to Carol behind those calls.
		h.via.schedule(func(fx *effects) {
			if !h.via.closing {
				h.via.sendAcceptDisembargoLocked(func(mt rpccp.MessageTarget) error {
					mt.SetImportedCap(h.vineID)
					return nil
				}, embargo)
			}
		})
	}
	h.settle(accepted)
}

// dropVine releases the vine and the Accept's promise once the Accept is
// settled: the promise has the capability now.
func (h *handoff) dropVine() {
	h.mu.Lock()
	vine, accepted := h.vine, h.accepted
	h.vine, h.accepted, h.vineGone = capnp.Client{}, capnp.Client{}, true
	h.mu.Unlock()
	vine.Release()
	accepted.Release()
}

// settle sends the queued calls, and all later ones, to cl, or to the vine
// if cl is null.
func (h *handoff) settle(cl capnp.Client) {
	h.mu.Lock()
	if h.done {
		h.mu.Unlock()
		return
	}
	h.done = true
	self := h.self
	h.self = capnp.Client{}
	var vine capnp.Client
	if !cl.IsValid() {
		vine, h.vine = h.vine, capnp.Client{}
		cl = vine
	}
	h.mu.Unlock()
	h.promise.Fulfill(cl)
	vine.Release() // the promise holds its own reference now
	self.Release()
}
