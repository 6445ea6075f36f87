package main

import (
	"encoding/binary"
	"io"
	"net"
	"sync"
	"time"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"
)

// wiretap sits between a connection's socket and core.Conn and decodes
// the Cap'n Proto RPC messages passing through, so the demo can report
// what actually went over the wire instead of what it hopes went.
//
// It only observes: bytes pass through unchanged, and a frame it cannot
// decode just stops the decoding in that direction (the core, not the
// tap, enforces the protocol).
type wiretap struct {
	rw io.ReadWriteCloser

	mu     sync.Mutex
	events []wireEvent
	in     frameSplitter // peer → us
	out    frameSplitter // us → peer
}

// direction of a message relative to the tapped (client) side.
type direction int

const (
	sent direction = iota
	received
)

// wireEvent is one decoded RPC message.
type wireEvent struct {
	dir  direction
	kind rpccp.Message_Which
	at   time.Time

	question uint32 // bootstrap/call: its question id; return/finish: the answer id

	// For a call: what it is addressed to.
	targetPromised bool   // target is promisedAnswer (pipelined on a question)
	target         uint32 // importedCap id, or the promised answer's question id

	// For a return with results: export ids in its cap table (senderHosted
	// or senderPromise), which the receiving side imports.
	caps []uint32

	// For a call: the method it calls.
	iface  uint64
	method uint16
	// For a bootstrap: it names a service (a sturdy ref's restore).
	restore bool
}

func newWiretap(rw io.ReadWriteCloser) *wiretap {
	return &wiretap{rw: rw}
}

func (t *wiretap) Read(p []byte) (int, error) {
	n, err := t.rw.Read(p)
	if n > 0 {
		t.observe(received, p[:n])
	}
	return n, err
}

func (t *wiretap) Write(p []byte) (int, error) {
	// Recorded before the bytes go out: once Write is called the message
	// is on its way, which is what ordering against replies needs.
	t.observe(sent, p)
	return t.rw.Write(p)
}

func (t *wiretap) Close() error { return t.rw.Close() }

// NetConn returns the connection under the tap, if it is one, so that
// code looking for the TLS state under a transport's wrappers
// (adapters/secure) finds it through the tap.
func (t *wiretap) NetConn() net.Conn {
	c, _ := t.rw.(net.Conn)
	return c
}

func (t *wiretap) observe(dir direction, b []byte) {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := &t.out
	if dir == received {
		s = &t.in
	}
	now := time.Now()
	s.feed(b, func(frame []byte) {
		if ev, ok := decodeEvent(frame); ok {
			ev.dir, ev.at = dir, now
			t.events = append(t.events, ev)
		}
	})
}

// mark returns a position in the event log; since returns the events
// after it.
func (t *wiretap) mark() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.events)
}

func (t *wiretap) since(mark int) []wireEvent {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]wireEvent(nil), t.events[mark:]...)
}

// Decoding gives up on frames beyond these sizes (the core has its own,
// configurable limits; this is only the demo's observer).
const (
	tapMaxSegments = 512
	tapMaxFrame    = 64 << 20
)

// frameSplitter cuts a byte stream into Cap'n Proto stream frames: a
// little-endian uint32 segment count minus one, that many uint32 segment
// sizes in words, padding to a word boundary, then the segments.
type frameSplitter struct {
	buf    []byte
	broken bool
}

func (s *frameSplitter) feed(b []byte, frame func([]byte)) {
	if s.broken {
		return
	}
	s.buf = append(s.buf, b...)
	for {
		n, ok := s.frameLen()
		if !ok || len(s.buf) < n {
			break
		}
		frame(s.buf[:n:n])
		s.buf = append([]byte(nil), s.buf[n:]...)
	}
}

// frameLen returns the length of the frame at the start of buf, if its
// header is complete.
func (s *frameSplitter) frameLen() (int, bool) {
	if len(s.buf) < 4 {
		return 0, false
	}
	segs := int(binary.LittleEndian.Uint32(s.buf)) + 1
	if segs > tapMaxSegments || segs <= 0 {
		s.broken, s.buf = true, nil
		return 0, false
	}
	hdr := 4 + 4*segs
	hdr += hdr % 8 // pad to a word boundary
	if len(s.buf) < hdr {
		return 0, false
	}
	total := hdr
	for i := range segs {
		total += 8 * int(binary.LittleEndian.Uint32(s.buf[4+4*i:]))
		if total > tapMaxFrame {
			s.broken, s.buf = true, nil
			return 0, false
		}
	}
	return total, true
}

func decodeEvent(frame []byte) (wireEvent, bool) {
	msg, err := capnp.Unmarshal(frame)
	if err != nil {
		return wireEvent{}, false
	}
	m, err := rpccp.ReadRootMessage(msg)
	if err != nil {
		return wireEvent{}, false
	}
	ev := wireEvent{kind: m.Which()}
	switch ev.kind {
	case rpccp.Message_Which_bootstrap:
		if b, err := m.Bootstrap(); err == nil {
			ev.question = b.QuestionId()
			ev.restore = b.HasDeprecatedObjectId()
		}
	case rpccp.Message_Which_call:
		c, err := m.Call()
		if err != nil {
			break
		}
		ev.question = c.QuestionId()
		ev.iface, ev.method = c.InterfaceId(), c.MethodId()
		tgt, err := c.Target()
		if err != nil {
			break
		}
		switch tgt.Which() {
		case rpccp.MessageTarget_Which_importedCap:
			ev.target = tgt.ImportedCap()
		case rpccp.MessageTarget_Which_promisedAnswer:
			if pa, err := tgt.PromisedAnswer(); err == nil {
				ev.targetPromised, ev.target = true, pa.QuestionId()
			}
		}
	case rpccp.Message_Which_return:
		r, err := m.Return()
		if err != nil {
			break
		}
		ev.question = r.AnswerId()
		if r.Which() != rpccp.Return_Which_results {
			break
		}
		p, err := r.Results()
		if err != nil {
			break
		}
		table, err := p.CapTable()
		if err != nil {
			break
		}
		for i := range table.Len() {
			d := table.At(i)
			switch d.Which() {
			case rpccp.CapDescriptor_Which_senderHosted:
				ev.caps = append(ev.caps, d.SenderHosted())
			case rpccp.CapDescriptor_Which_senderPromise:
				ev.caps = append(ev.caps, d.SenderPromise())
			}
		}
	case rpccp.Message_Which_finish:
		if f, err := m.Finish(); err == nil {
			ev.question = f.QuestionId()
		}
	}
	return ev, true
}

// stepReport summarises the client side of one demo step.
type stepReport struct {
	calls      int // bootstraps and calls the client sent
	pipelined  int // of which addressed to the promised answer of another question of the step
	roundTrips int // longest chain of calls that each needed the answer to the one before
	callsIn    int // calls the server made to objects of the client
	elapsed    time.Duration
}

// analyse computes a stepReport from the events of one step.
//
// Round trips are counted from what the messages say, not from timing: a
// call addressed to a capability that arrived in the Return of an earlier
// question of the step needed that answer first, so it takes one more
// round trip than that question; a call addressed to a question's promised
// answer (promise pipelining) travels without the answer and adds none.
// Whether the core pipelines a call or, because the answer has already
// arrived, addresses the returned capability directly is the core's
// choice; the report shows which it made. Capabilities that arrive in
// Resolve messages or call parameters are not tracked (the demo does not
// depend on them).
func analyse(events []wireEvent, elapsed time.Duration) stepReport {
	r := stepReport{elapsed: elapsed}
	depth := map[uint32]int{}      // our question id → round trips until its answer
	importFrom := map[uint32]int{} // import id → depth of the Return that brought it
	for _, ev := range events {
		switch {
		case ev.dir == sent && (ev.kind == rpccp.Message_Which_call || ev.kind == rpccp.Message_Which_bootstrap):
			r.calls++
			d := 1
			if ev.kind == rpccp.Message_Which_call {
				if ev.targetPromised {
					if pd, ok := depth[ev.target]; ok {
						d = pd
						r.pipelined++
					}
				} else if id, ok := importFrom[ev.target]; ok {
					d = id + 1
				}
			}
			depth[ev.question] = d // question ids are reused after Finish
			r.roundTrips = max(r.roundTrips, d)
		case ev.dir == received && ev.kind == rpccp.Message_Which_return:
			if d, ok := depth[ev.question]; ok {
				for _, id := range ev.caps {
					importFrom[id] = d
				}
			}
		case ev.dir == received && ev.kind == rpccp.Message_Which_call:
			r.callsIn++
		}
	}
	return r
}

// messageCounts tallies events by direction and kind.
func messageCounts(events []wireEvent) map[direction]map[rpccp.Message_Which]int {
	counts := map[direction]map[rpccp.Message_Which]int{sent: {}, received: {}}
	for _, ev := range events {
		counts[ev.dir][ev.kind]++
	}
	return counts
}
