package main

import (
	"io"
	"net"
	"testing"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"

	"github.com/captp-go/captp/internal/testcapnp"
)

func seqCallFrame(t *testing.T, q uint32) []byte {
	return frame(t, func(m rpccp.Message) error {
		c, err := m.NewCall()
		if err != nil {
			return err
		}
		c.SetQuestionId(q)
		c.SetInterfaceId(testcapnp.Test_TypeID)
		c.SetMethodId(12) // seq
		tgt, err := c.NewTarget()
		if err != nil {
			return err
		}
		tgt.SetImportedCap(0)
		_, err = c.NewParams()
		return err
	})
}

func restoreFrame(t *testing.T) []byte {
	return frame(t, func(m rpccp.Message) error {
		b, err := m.NewBootstrap()
		if err != nil {
			return err
		}
		id, err := capnp.NewText(b.Segment(), "service-id")
		if err != nil {
			return err
		}
		return b.SetDeprecatedObjectId(id.ToPtr())
	})
}

// The tap decodes a call's method and whether a bootstrap names a
// service; traceOf turns them into who called whom.
func TestTraceOf(t *testing.T) {
	var evs []wireEvent
	for _, f := range []struct {
		dir direction
		b   []byte
	}{{sent, restoreFrame(t)}, {sent, seqCallFrame(t, 1)}, {sent, seqCallFrame(t, 2)}, {received, seqCallFrame(t, 7)}} {
		ev, ok := decodeEvent(f.b)
		if !ok {
			t.Fatal("decodeEvent failed")
		}
		ev.dir = f.dir
		evs = append(evs, ev)
	}
	if !evs[0].restore || evs[1].iface != testcapnp.Test_TypeID || evs[1].method != 12 {
		t.Fatalf("decoded %+v", evs[:2])
	}
	tr := traceOf([]linkEvents{{link: &demoLink{from: "bob", to: "carol"}, events: evs}})
	for _, c := range []struct {
		caller, callee, op string
		want               int
	}{
		{"bob", "carol", "restore", 1},
		{"bob", "carol", "seq", 2},
		{"bob", "carol", "", 3},
		{"carol", "bob", "seq", 1},
		{"carol", "bob", "echo", 0},
	} {
		if got := tr.callsBetween(c.caller, c.callee, c.op); got != c.want {
			t.Errorf("callsBetween(%s, %s, %q) = %d; want %d", c.caller, c.callee, c.op, got, c.want)
		}
	}
	if tr.calls != 4 || tr.messages != 4 {
		t.Errorf("calls %d, messages %d; want 4 and 4", tr.calls, tr.messages)
	}
	if methodName(testcapnp.Test_TypeID, 3) != "child" || methodName(1, 2) != "@0x1.2" {
		t.Errorf("methodName: %q, %q", methodName(testcapnp.Test_TypeID, 3), methodName(1, 2))
	}
}

// The tap lets adapters/secure find the TLS connection under it.
func TestWiretapNetConn(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if got := newWiretap(a).NetConn(); got != a {
		t.Errorf("NetConn() = %v; want the tapped net.Conn", got)
	}
	type rwc struct{ io.ReadWriteCloser }
	if got := newWiretap(rwc{a}).NetConn(); got != nil {
		t.Errorf("NetConn() of a tap on a non-net.Conn = %v; want nil", got)
	}
}
