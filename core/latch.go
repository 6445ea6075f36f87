package core

import (
	"capnproto.org/go/capnp/v3"
)

// Latches keep a promise import resolvable for the capabilities pipelined
// on the call that returned it.
//
// When a Return settles a question, go-capnp resolves each capability
// pipelined on it (pf.Cap()) to the hook of the capability at its path in
// the results: for an unresolved promise import, the hook of the import's
// promise client. That hook is settled only through the import's
// resolver, and go-capnp's resolver does nothing once every client
// sharing the import client's first reference is released. The results
// hold such a client, but we free them once the caller has released the
// answer (at once in manual mode, after resultsGrace otherwise). If the
// Resolve comes later, the pipelined capability, which holds the hook but
// none of those clients, stays on the import for good: its identity never
// changes, Resolve on it never returns, and a Level 3 handoff is never
// seen. On js/wasm the Resolve routinely came that late.
//
// A latch is a client of the import kept until the import resolves (then
// released after its resolvers ran) or the connection ends. It is taken
// only where calls were pipelined on the path: that proves a pipelined
// capability took the hook, and go-capnp offers no way to see the ones
// made without calls (Future.Client on an existing path even leaves the
// promise locked), nor to learn when they are released. So a promise
// that never resolves keeps its import, once calls were pipelined on it,
// until the connection ends; one nobody pipelined on is released as soon
// as its clients are.
type latch struct {
	keep capnp.Client // a client of the import: its resolver works
}

// maxLatchWalk bounds the pointers latchPipelines reads in the results.
const maxLatchWalk = 64

// latchPipelines runs just before q's promise is fulfilled with content:
// it latches each unresolved promise import of c in the results at a path
// that calls were pipelined on.
func (c *Conn) latchPipelines(q *question, content capnp.Ptr) {
	// Nothing pipelined, nothing to latch: skip the Snapshot per
	// capability. q.pipelined no longer grows once q settled (new calls
	// go to its results, see redirectLocked), so it is read unlocked.
	if len(q.pipelined) == 0 {
		return
	}
	seg := content.Segment()
	if seg == nil || !c.hasUnresolvedImport(seg.Message().CapTable()) {
		return
	}
	budget := maxLatchWalk
	var walk func(p capnp.Ptr, path []capnp.PipelineOp)
	walk = func(p capnp.Ptr, path []capnp.PipelineOp) {
		s := p.Struct()
		for i := uint16(0); i < s.Size().PointerCount && budget > 0; i++ {
			budget--
			f, err := s.Ptr(i)
			if err != nil || !f.IsValid() {
				continue
			}
			at := append(path[:len(path):len(path)], capnp.PipelineOp{Field: i})
			if iface := f.Interface(); iface.IsValid() {
				c.latchPath(q, at, iface.Client())
			} else if f.Struct().IsValid() {
				walk(f, at)
			}
		}
	}
	if iface := content.Interface(); iface.IsValid() {
		c.latchPath(q, nil, iface.Client())
	} else if content.Struct().IsValid() {
		walk(content, nil)
	}
}

// hasUnresolvedImport reports whether table holds a client of one of c's
// unresolved promise imports: the only results latchPipelines walks.
func (c *Conn) hasUnresolvedImport(table *capnp.CapTable) bool {
	for i := 0; i < table.Len(); i++ {
		if c.unresolvedImport(table.At(i)) != nil {
			return true
		}
	}
	return false
}

// unresolvedImport returns the hook of cl if cl is (still) a client of one
// of c's unresolved promise imports.
func (c *Conn) unresolvedImport(cl capnp.Client) *importClient {
	snap := cl.Snapshot()
	defer snap.Release()
	h, ok := snap.Brand().Value.(*importClient)
	if !ok || h.c != c || !snap.IsPromise() || snap.IsResolved() {
		return nil
	}
	return h
}

// latchPath latches cl, the capability at path in q's results, if it is
// an unresolved promise import and calls were pipelined on path.
func (c *Conn) latchPath(q *question, path []capnp.PipelineOp, cl capnp.Client) {
	h := c.unresolvedImport(cl)
	if h == nil {
		return
	}
	c.mu.Lock()
	defer c.unlock()
	if !pipelinedOn(q, path) {
		return
	}
	ie := c.imports[h.id]
	if ie == nil || ie.hook != h || !ie.promise || ie.resolved || c.closing {
		return // resolved meanwhile: the pipelined capability follows
	}
	ie.latches = append(ie.latches, latch{keep: cl.AddRef()})
}

// pipelinedOn reports whether a call was pipelined on q's results at path.
func pipelinedOn(q *question, path []capnp.PipelineOp) bool {
	for _, t := range q.pipelined {
		if samePath(t, path) {
			return true
		}
	}
	return false
}
