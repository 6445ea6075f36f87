package core

import (
	"encoding/binary"
	"testing"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"
)

// The Finish and Release frames copied from templates decode as the
// messages they stand for, with the patched fields.
func TestFrameTemplates(t *testing.T) {
	decode := func(t *testing.T, tpl *frameTemplate, v ...uint32) rpccp.Message {
		t.Helper()
		if tpl.err != nil {
			t.Fatal(tpl.err)
		}
		c := &Conn{}
		c.sendTemplateLocked(tpl, v...)
		frame := c.out
		if n := binary.LittleEndian.Uint32(frame); n != 0 {
			t.Fatalf("template has %d+1 segments; want 1", n)
		}
		msg, err := capnp.Unmarshal(frame)
		if err == nil {
			var m rpccp.Message
			if m, err = rpccp.ReadRootMessage(msg); err == nil {
				return m
			}
		}
		t.Fatalf("decode: %v", err)
		return rpccp.Message{}
	}
	for i, release := range []bool{false, true} {
		m := decode(t, &finishTemplates[i], 0xdeadbeef)
		f, err := m.Finish()
		if m.Which() != rpccp.Message_Which_finish || err != nil {
			t.Fatalf("Finish template decodes as %v (%v)", m.Which(), err)
		}
		if f.QuestionId() != 0xdeadbeef || f.ReleaseResultCaps() != release {
			t.Errorf("Finish: question %#x, releaseResultCaps %v; want 0xdeadbeef, %v", f.QuestionId(), f.ReleaseResultCaps(), release)
		}
	}
	m := decode(t, &releaseTemplate, 7, 0x01020304)
	r, err := m.Release()
	if m.Which() != rpccp.Message_Which_release || err != nil {
		t.Fatalf("Release template decodes as %v (%v)", m.Which(), err)
	}
	if r.Id() != 7 || r.ReferenceCount() != 0x01020304 {
		t.Errorf("Release: id %d, count %#x; want 7, 0x1020304", r.Id(), r.ReferenceCount())
	}
}
