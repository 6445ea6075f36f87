package main

import (
	"testing"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"
)

// frame builds one framed RPC message.
func frame(t *testing.T, build func(m rpccp.Message) error) []byte {
	t.Helper()
	msg, seg := capnp.NewMultiSegmentMessage(nil)
	m, err := rpccp.NewRootMessage(seg)
	if err != nil {
		t.Fatal(err)
	}
	if err := build(m); err != nil {
		t.Fatal(err)
	}
	b, err := msg.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func callFrame(t *testing.T, q uint32, promised bool, target uint32) []byte {
	return frame(t, func(m rpccp.Message) error {
		c, err := m.NewCall()
		if err != nil {
			return err
		}
		c.SetQuestionId(q)
		tgt, err := c.NewTarget()
		if err != nil {
			return err
		}
		if promised {
			pa, err := tgt.NewPromisedAnswer()
			if err != nil {
				return err
			}
			pa.SetQuestionId(target)
		} else {
			tgt.SetImportedCap(target)
		}
		// A big parameter payload so the frame spans many small reads.
		p, err := c.NewParams()
		if err != nil {
			return err
		}
		d, err := capnp.NewData(c.Segment(), make([]byte, 3000))
		if err != nil {
			return err
		}
		return p.SetContent(d.ToPtr())
	})
}

func returnFrame(t *testing.T, q uint32, caps ...uint32) []byte {
	return frame(t, func(m rpccp.Message) error {
		r, err := m.NewReturn()
		if err != nil {
			return err
		}
		r.SetAnswerId(q)
		p, err := r.NewResults()
		if err != nil {
			return err
		}
		table, err := p.NewCapTable(int32(len(caps)))
		if err != nil {
			return err
		}
		for i, id := range caps {
			table.At(i).SetSenderHosted(id)
		}
		return nil
	})
}

func TestFrameSplitter(t *testing.T) {
	var stream []byte
	stream = append(stream, callFrame(t, 7, true, 3)...)
	stream = append(stream, returnFrame(t, 9, 4, 5)...)
	stream = append(stream, frame(t, func(m rpccp.Message) error {
		f, err := m.NewFinish()
		f.SetQuestionId(9)
		return err
	})...)

	for _, chunk := range []int{1, 3, 7, 64, len(stream)} {
		var s frameSplitter
		var got []wireEvent
		for b := stream; len(b) > 0; {
			n := min(chunk, len(b))
			s.feed(b[:n], func(f []byte) {
				ev, ok := decodeEvent(f)
				if !ok {
					t.Fatalf("chunk %d: frame did not decode", chunk)
				}
				got = append(got, ev)
			})
			b = b[n:]
		}
		if len(got) != 3 {
			t.Fatalf("chunk %d: decoded %d messages; want 3", chunk, len(got))
		}
		if c := got[0]; c.kind != rpccp.Message_Which_call || c.question != 7 || !c.targetPromised || c.target != 3 {
			t.Errorf("chunk %d: call decoded as %+v", chunk, c)
		}
		if r := got[1]; r.kind != rpccp.Message_Which_return || r.question != 9 || len(r.caps) != 2 || r.caps[0] != 4 || r.caps[1] != 5 {
			t.Errorf("chunk %d: return decoded as %+v", chunk, r)
		}
		if f := got[2]; f.kind != rpccp.Message_Which_finish || f.question != 9 {
			t.Errorf("chunk %d: finish decoded as %+v", chunk, f)
		}
		if len(s.buf) != 0 {
			t.Errorf("chunk %d: %d bytes left over", chunk, len(s.buf))
		}
	}
}

func TestFrameSplitterGivesUpOnGarbage(t *testing.T) {
	var s frameSplitter
	calls := 0
	s.feed([]byte{0xff, 0xff, 0xff, 0x7f, 1, 2, 3, 4}, func([]byte) { calls++ })
	s.feed(callFrame(t, 1, false, 0), func([]byte) { calls++ })
	if !s.broken || calls != 0 {
		t.Errorf("after a bad header: broken=%v, frames=%d; want broken and none", s.broken, calls)
	}
}

func TestAnalyse(t *testing.T) {
	call := func(q uint32, promised bool, target uint32) wireEvent {
		return wireEvent{dir: sent, kind: rpccp.Message_Which_call, question: q, targetPromised: promised, target: target}
	}
	ret := func(q uint32, caps ...uint32) wireEvent {
		return wireEvent{dir: received, kind: rpccp.Message_Which_return, question: q, caps: caps}
	}
	finish := func(q uint32) wireEvent { return wireEvent{dir: sent, kind: rpccp.Message_Which_finish, question: q} }
	tests := []struct {
		name                         string
		events                       []wireEvent
		calls, pipelined, roundTrips int
	}{
		{"one call", []wireEvent{call(1, false, 0), ret(1), finish(1)}, 1, 0, 1},
		{"pipelined chain", []wireEvent{
			call(1, false, 0), call(2, true, 1), call(3, true, 2),
			ret(1, 10), ret(2, 11), ret(3), finish(3), finish(2), finish(1),
		}, 3, 2, 1},
		{"awaited chain on imports", []wireEvent{
			call(1, false, 0), ret(1, 10), call(2, false, 10), ret(2, 11), call(3, false, 11), ret(3),
		}, 3, 0, 3},
		{"chain pipelined after the answers arrived", []wireEvent{
			call(1, false, 0), ret(1, 10), call(2, true, 1), ret(2, 11), call(3, true, 2), ret(3),
		}, 3, 2, 1},
		{"chain partly addressed to a returned capability", []wireEvent{
			call(1, false, 0), ret(1, 10), call(2, false, 10), call(3, true, 2), ret(2, 11), ret(3),
		}, 3, 1, 2},
		{"question id reused within a step", []wireEvent{
			call(1, false, 0), ret(1, 10), finish(1), call(1, false, 10), call(2, true, 1), ret(1), ret(2),
		}, 3, 1, 2},
		{"call on a capability from an earlier step", []wireEvent{call(4, false, 99), ret(4)}, 1, 0, 1},
		{"bootstrap then pipelined call", []wireEvent{
			{dir: sent, kind: rpccp.Message_Which_bootstrap, question: 0}, call(1, true, 0), ret(0, 1), ret(1),
		}, 2, 1, 1},
		{"call back from the server", []wireEvent{
			call(5, false, 0),
			{dir: received, kind: rpccp.Message_Which_call, question: 0},
			{dir: sent, kind: rpccp.Message_Which_return, question: 0},
			ret(5),
		}, 1, 0, 1},
	}
	for _, tt := range tests {
		r := analyse(tt.events, 0)
		if r.calls != tt.calls || r.pipelined != tt.pipelined || r.roundTrips != tt.roundTrips {
			t.Errorf("%s: calls=%d pipelined=%d roundTrips=%d; want %d, %d, %d",
				tt.name, r.calls, r.pipelined, r.roundTrips, tt.calls, tt.pipelined, tt.roundTrips)
		}
	}
}
