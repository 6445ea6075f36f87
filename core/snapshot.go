package core

import (
	"errors"
	"fmt"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/server"

	"github.com/captp-go/captp/core/flow"
)

// A Snapshot is a consistent copy of one connection's tables, taken at
// one instant under the connection's lock: the leak-hunting view of what
// each side still holds. Entries are sorted by id.
type Snapshot struct {
	Stats Stats `json:"stats"`

	// Closing is set once the connection has begun to shut down; then
	// the tables are (being) emptied. Err is why it ended, if it has.
	Closing bool   `json:"closing,omitempty"`
	Err     string `json:"err,omitempty"`

	// QueuedBytes are outbound bytes waiting to be written (bounded by
	// Limits.MaxQueuedBytes); InboundHeldBytes are the bytes of the
	// peer's calls whose arguments are still held (Limits.MaxInboundBytes).
	QueuedBytes      int   `json:"queuedBytes"`
	InboundHeldBytes int64 `json:"inboundHeldBytes"`
	// InProgress counts the peer's calls that have not returned yet.
	InProgress int `json:"inProgress"`
	// Flow is the flow control of our calls to the peer's objects,
	// all imports together.
	Flow flow.PoolStats `json:"flow"`

	Questions []QuestionInfo `json:"questions,omitempty"`
	Answers   []AnswerInfo   `json:"answers,omitempty"`
	Imports   []ImportInfo   `json:"imports,omitempty"`
	Exports   []ExportInfo   `json:"exports,omitempty"`
	Embargoes []EmbargoInfo  `json:"embargoes,omitempty"`

	// Level 3 (three-party handoff): Provides this side sent on the
	// connection and not yet finished, and pickups of capabilities
	// received through the connection that are still running.
	Provides []ProvideInfo `json:"provides,omitempty"`
	Handoffs int           `json:"handoffs,omitempty"`
}

// QuestionInfo describes a call (or Bootstrap) this side sent and whose
// entry is still in the question table.
type QuestionInfo struct {
	ID uint32 `json:"id"`
	// Returned: the peer's Return arrived. Finished: our Finish was
	// sent. Released: the caller dropped its answer. An entry stays until
	// it is both returned and finished.
	Returned  bool `json:"returned,omitempty"`
	Finished  bool `json:"finished,omitempty"`
	Released  bool `json:"released,omitempty"`
	Bootstrap bool `json:"bootstrap,omitempty"` // a Bootstrap (or Level 3 Accept), not a Call
	// Method names the call: the schema's names when the caller's
	// generated code gave them, else @interfaceID.methodID. Empty for a
	// Bootstrap.
	Method      string `json:"method,omitempty"`
	InterfaceID uint64 `json:"interfaceId,omitempty"`
	MethodID    uint16 `json:"methodId,omitempty"`
	// Pipelined counts calls sent on the promised answer before it
	// returned.
	Pipelined int `json:"pipelined,omitempty"`
}

// State is a one-word summary of the question's progress.
func (q QuestionInfo) State() string {
	switch {
	case q.Returned && q.Released:
		return "returned, released" // awaiting its Finish
	case q.Returned:
		return "returned"
	case q.Finished:
		return "finished" // cancelled: awaiting the Return
	case q.Released:
		return "released"
	}
	return "waiting"
}

// AnswerInfo describes a call (or Bootstrap) the peer sent us whose entry
// is still in the answer table.
type AnswerInfo struct {
	ID uint32 `json:"id"`
	// Returned: our Return was queued. Finished: the peer's Finish
	// arrived. An entry stays until both.
	Returned bool `json:"returned,omitempty"`
	Finished bool `json:"finished,omitempty"`
	// Queued counts calls pipelined on this answer that wait for it to
	// return.
	Queued int `json:"queued,omitempty"`
	// ResultExports counts export references the Return carried.
	ResultExports int `json:"resultExports,omitempty"`
	// ArgsBytes is the size of the call's message.
	ArgsBytes int64 `json:"argsBytes,omitempty"`
	// Level 3: the answer of a Provide holds a capability for a third
	// party; the answer of an Accept waits for its Provide or
	// Disembargo.
	Provide bool `json:"provide,omitempty"`
	Accept  bool `json:"accept,omitempty"`
}

// State is a one-word summary of the answer's progress.
func (a AnswerInfo) State() string {
	switch {
	case a.Returned && a.Finished:
		return "done"
	case a.Returned:
		return "returned" // results kept until the peer's Finish
	case a.Finished:
		return "cancelled" // the peer finished before we returned
	}
	return "running"
}

// ImportInfo describes a capability the peer exported to us.
type ImportInfo struct {
	ID uint32 `json:"id"`
	// Refs counts the descriptors received (one Release gives them
	// back); Clients the live capnp.Client wrappers around it.
	Refs     uint32 `json:"refs"`
	Clients  int    `json:"clients"`
	Promise  bool   `json:"promise,omitempty"`
	Resolved bool   `json:"resolved,omitempty"`
	// Flow is the object's flow-control window, if flow control is on.
	Flow *flow.Stats `json:"flow,omitempty"`
}

// ExportInfo describes a capability we exported to the peer.
type ExportInfo struct {
	ID       uint32 `json:"id"`
	Refs     uint32 `json:"refs"`
	Promise  bool   `json:"promise,omitempty"`
	Resolved bool   `json:"resolved,omitempty"` // a Resolve was sent
	// Vine is set for the vine of a three-party handoff; Loopback for a
	// promise that resolved to a capability of the peer.
	Vine     bool `json:"vine,omitempty"`
	Loopback bool `json:"loopback,omitempty"`
	// What says what the capability is, as far as is cheap to tell: the
	// Go type of a local server, or which table of which connection it
	// proxies.
	What string `json:"what,omitempty"`
}

// EmbargoInfo describes an embargo this side holds: calls to a capability
// that resolved back here wait for the echo of our Disembargo.
type EmbargoInfo struct {
	ID uint32 `json:"id"`
}

// ProvideInfo describes a Level 3 Provide this side sent on the
// connection (as the introducer), by its question id.
type ProvideInfo struct {
	QuestionID uint32 `json:"questionId"`
	Sent       bool   `json:"sent,omitempty"`
}

// Snapshot copies the connection's tables. It takes the connection's lock
// for the time of a copy only, and is safe to call at any time, from any
// goroutine, also after the connection has ended (the tables are empty
// then). The copy describes the entries; it holds none of them.
func (c *Conn) Snapshot() Snapshot {
	var (
		s      Snapshot
		lims   []*flow.Limiter        // per import, described after the unlock
		whats  []capnp.ClientSnapshot // per export, ditto
		errMsg error
	)
	c.mu.Lock()
	s.Stats = Stats{
		Questions: len(c.questions),
		Answers:   len(c.answers),
		Imports:   len(c.imports),
		Exports:   len(c.exports),
		Embargoes: len(c.embargoes),
	}
	s.Closing = c.closing
	errMsg = c.err
	s.QueuedBytes = c.queuedLocked()
	s.InProgress = c.inProgress
	s.Questions = make([]QuestionInfo, 0, len(c.questions))
	for _, id := range sortedKeys(c.questions) {
		q := c.questions[id]
		qi := QuestionInfo{
			ID: id, Returned: q.returned, Finished: q.finished, Released: q.released,
			Bootstrap: q.bootstrap, Pipelined: len(q.pipelined),
		}
		if !q.bootstrap {
			qi.InterfaceID, qi.MethodID = q.method.InterfaceID, q.method.MethodID
			qi.Method = methodName(q.method)
		}
		s.Questions = append(s.Questions, qi)
	}
	s.Answers = make([]AnswerInfo, 0, len(c.answers))
	for _, id := range sortedKeys(c.answers) {
		a := c.answers[id]
		s.Answers = append(s.Answers, AnswerInfo{
			ID: id, Returned: a.returned, Finished: a.finished, Queued: len(a.queued),
			ResultExports: len(a.resultExports), ArgsBytes: a.argsBytes,
			Provide: a.provision != nil, Accept: a.accept != nil,
		})
	}
	s.Imports = make([]ImportInfo, 0, len(c.imports))
	lims = make([]*flow.Limiter, 0, len(c.imports))
	for _, id := range sortedKeys(c.imports) {
		ie := c.imports[id]
		s.Imports = append(s.Imports, ImportInfo{ID: id, Refs: ie.refs, Clients: ie.clients, Promise: ie.promise, Resolved: ie.resolved})
		var lim *flow.Limiter
		if ie.hook != nil {
			lim = ie.hook.lim
		}
		lims = append(lims, lim)
	}
	s.Exports = make([]ExportInfo, 0, len(c.exports))
	whats = make([]capnp.ClientSnapshot, 0, len(c.exports))
	for _, id := range sortedKeys(c.exports) {
		e := c.exports[id]
		s.Exports = append(s.Exports, ExportInfo{
			ID: id, Refs: e.refs, Promise: e.promise, Resolved: e.resolved,
			Vine: e.vine != nil, Loopback: e.loopback != nil,
		})
		// A snapshot of the client (which, unlike AddRef, never panics);
		// describing it, which may ask hooks, waits until the unlock.
		whats = append(whats, e.client.Snapshot())
	}
	s.Embargoes = make([]EmbargoInfo, 0, len(c.embargoes))
	for _, id := range sortedKeys(c.embargoes) {
		s.Embargoes = append(s.Embargoes, EmbargoInfo{ID: id})
	}
	for _, qid := range sortedKeys(c.provides) {
		v := c.provides[qid]
		// (v.finished is guarded by the vine's own connection: not read.)
		s.Provides = append(s.Provides, ProvideInfo{QuestionID: qid, Sent: v.sent})
	}
	c.unlock()

	if errMsg != nil && !errors.Is(errMsg, errClosedLocally) {
		s.Err = errMsg.Error()
	}
	s.InboundHeldBytes = c.inboundHeld.Load()
	s.Handoffs = int(c.handoffs.Load())
	s.Flow = c.flow.Stats()
	for i, lim := range lims {
		if lim != nil {
			st := lim.Stats()
			s.Imports[i].Flow = &st
		}
	}
	for i, snap := range whats {
		s.Exports[i].What = c.describe(snap)
		snap.Release()
	}
	return s
}

// methodName renders m for a Snapshot.
func methodName(m capnp.Method) string {
	if m.InterfaceName != "" && m.MethodName != "" {
		return m.InterfaceName + "." + m.MethodName
	}
	return fmt.Sprintf("@%#x.%d", m.InterfaceID, m.MethodID)
}

// describe says what an exported capability is, cheaply: the Go type of
// a local server, or the table entry of a connection it stands for. Runs
// without c.mu held.
func (c *Conn) describe(snap capnp.ClientSnapshot) string {
	if !snap.IsValid() {
		return "null"
	}
	brand := snap.Brand()
	if impl, ok := server.IsServer(brand); ok {
		return fmt.Sprintf("local server %T", impl)
	}
	switch h := brand.Value.(type) {
	case *importClient:
		if h.c == c {
			return fmt.Sprintf("import %d of this connection", h.id)
		}
		return fmt.Sprintf("proxy to import %d of another connection", h.id)
	case *bootstrapHook:
		if h.q.c == c {
			return "bootstrap promise of this connection"
		}
		return "proxy to a bootstrap promise of another connection"
	case *localPipeline:
		return fmt.Sprintf("promise for a capability in the results of answer %d", h.a.id)
	case *embargoHook:
		return "embargoed capability"
	case nil:
		return "promise"
	}
	return fmt.Sprintf("%T", brand.Value)
}

// VatSnapshot describes the Level 3 state a Vat shares among its
// connections.
type VatSnapshot struct {
	// Provisions are capabilities this vat was asked (by Provides) to
	// hand to third parties and still keeps.
	Provisions int `json:"provisions"`
	// EarlyAccepts are Accepts that arrived before their Provide.
	EarlyAccepts int `json:"earlyAccepts"`
}

// Snapshot returns the vat's Level 3 figures.
func (v *Vat) Snapshot() VatSnapshot {
	p, e := v.stats()
	return VatSnapshot{Provisions: p, EarlyAccepts: e}
}
