package core

import (
	"fmt"
	"strings"
	"sync/atomic"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"
)

// testSkipEmbargo injects an ordering bug, for the simulation's test of
// itself only: capabilities that resolve back to their caller are used at
// once instead of behind an embargo.
var testSkipEmbargo bool

// check verifies the invariants that tie the connection's tables
// together. It is cheap enough to run after every simulated step.
func (c *Conn) check() error {
	c.mu.Lock()
	defer c.unlock()
	for id, q := range c.questions {
		if q.id != id || q.c != c {
			return fmt.Errorf("question %d filed under %d", q.id, id)
		}
		if q.native == nil && c.questionsByAns[q.p.Answer()] != q {
			return fmt.Errorf("question %d missing from the answer index", id)
		}
		if q.returned && q.finished {
			return fmt.Errorf("question %d returned and finished but still in the table", id)
		}
	}
	for ans, q := range c.questionsByAns {
		if q.p.Answer() != ans {
			return fmt.Errorf("answer index entry for question %d is stale", q.id)
		}
	}
	for id, a := range c.answers {
		if a.id != id {
			return fmt.Errorf("answer %d filed under %d", a.id, id)
		}
		if a.returned && a.finished {
			return fmt.Errorf("answer %d returned and finished but still in the table", id)
		}
	}
	for id, ie := range c.imports {
		if ie.id != id || ie.refs == 0 || ie.hook == nil || (ie.clients == 0 && !ie.resolved) {
			return fmt.Errorf("import %d: id %d, %d refs", id, ie.id, ie.refs)
		}
		if len(ie.latches) > 0 && (ie.resolved || !ie.promise) {
			return fmt.Errorf("import %d: %d latches on a settled or non-promise import", id, len(ie.latches))
		}
	}
	for id, e := range c.exports {
		if e.id != id || e.refs == 0 {
			return fmt.Errorf("export %d: id %d, %d refs", id, e.id, e.refs)
		}
	}
	for meta, id := range c.exportsByHook {
		if e := c.exports[id]; e == nil || e.meta != meta {
			return fmt.Errorf("export index names export %d, which is gone", id)
		}
	}
	for id, em := range c.embargoes {
		if em.id != id {
			return fmt.Errorf("embargo %d filed under %d", em.id, id)
		}
	}
	for _, ids := range []struct {
		name  string
		alloc *idAllocator
		inUse func(uint32) bool
	}{
		{"question", &c.questionIDs, func(id uint32) bool { return c.questions[id] != nil }},
		{"export", &c.exportIDs, func(id uint32) bool { return c.exports[id] != nil }},
		{"embargo", &c.embargoIDs, func(id uint32) bool { return c.embargoes[id] != nil }},
	} {
		seen := make(map[uint32]bool, len(ids.alloc.free))
		for _, id := range ids.alloc.free {
			if seen[id] || ids.inUse(id) || id >= ids.alloc.next {
				return fmt.Errorf("%s id %d is free and in use (or freed twice)", ids.name, id)
			}
			seen[id] = true
		}
	}
	return nil
}

// messageSummary names an RPC message and its ids, for traces and logs.
func messageSummary(msg *capnp.Message) string {
	m, err := rpccp.ReadRootMessage(msg)
	if err != nil {
		return "undecodable message"
	}
	switch m.Which() {
	case rpccp.Message_Which_call:
		call, _ := m.Call()
		t, _ := call.Target()
		return fmt.Sprintf("call q%d method %d to %s", call.QuestionId(), call.MethodId(), targetSummary(t))
	case rpccp.Message_Which_return:
		r, _ := m.Return()
		return fmt.Sprintf("return a%d (%v)", r.AnswerId(), r.Which())
	case rpccp.Message_Which_finish:
		f, _ := m.Finish()
		return fmt.Sprintf("finish q%d", f.QuestionId())
	case rpccp.Message_Which_bootstrap:
		b, _ := m.Bootstrap()
		return fmt.Sprintf("bootstrap q%d", b.QuestionId())
	case rpccp.Message_Which_resolve:
		r, _ := m.Resolve()
		return fmt.Sprintf("resolve promise %d (%v)", r.PromiseId(), r.Which())
	case rpccp.Message_Which_release:
		r, _ := m.Release()
		return fmt.Sprintf("release export %d ×%d", r.Id(), r.ReferenceCount())
	case rpccp.Message_Which_disembargo:
		d, _ := m.Disembargo()
		t, _ := d.Target()
		return fmt.Sprintf("disembargo %v to %s", d.Context().Which(), targetSummary(t))
	}
	return m.Which().String()
}

func targetSummary(t rpccp.MessageTarget) string {
	if t.Which() == rpccp.MessageTarget_Which_importedCap {
		return fmt.Sprintf("export %d", t.ImportedCap())
	}
	pa, _ := t.PromisedAnswer()
	ops, _ := pa.Transform()
	return fmt.Sprintf("answer q%d%s", pa.QuestionId(), fmt.Sprint(ops.Len()))
}

// dump describes every table entry, for leak hunting.
func (c *Conn) dump() string {
	c.mu.Lock()
	defer c.unlock()
	var b strings.Builder
	for _, id := range sortedKeys(c.questions) {
		q := c.questions[id]
		fmt.Fprintf(&b, "question %d: returned=%v finished=%v released=%v bootstrap=%v\n", id, q.returned, q.finished, q.released, q.bootstrap)
	}
	for _, id := range sortedKeys(c.answers) {
		a := c.answers[id]
		fmt.Fprintf(&b, "answer %d: returned=%v finished=%v\n", id, a.returned, a.finished)
	}
	for _, id := range sortedKeys(c.imports) {
		ie := c.imports[id]
		fmt.Fprintf(&b, "import %d: refs=%d clients=%d promise=%v resolved=%v\n", id, ie.refs, ie.clients, ie.promise, ie.resolved)
	}
	for _, id := range sortedKeys(c.exports) {
		e := c.exports[id]
		fmt.Fprintf(&b, "export %d: refs=%d promise=%v resolved=%v client=%v\n", id, e.refs, e.promise, e.resolved, e.client)
	}
	for _, id := range sortedKeys(c.embargoes) {
		fmt.Fprintf(&b, "embargo %d\n", id)
	}
	return b.String()
}

// testBeforeSettle, set only by tests, runs at the start of a question's
// settle effect, to reproduce what may happen in that window.
// Atomic: a test sets it while other connections settle questions.
var testBeforeSettle atomic.Pointer[func(q *question)]
