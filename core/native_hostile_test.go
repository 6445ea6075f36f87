package core_test

import (
	"context"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testnative"
)

// rawPeer speaks the RPC protocol by hand, to send what no honest
// implementation would.
type rawPeer struct {
	t   *testing.T
	c   net.Conn
	enc *capnp.Encoder
	dec *capnp.Decoder
}

func (p *rawPeer) send(build func(m rpccp.Message) error) {
	p.t.Helper()
	msg, seg, err := capnp.NewMessage(capnp.SingleSegment(nil))
	if err != nil {
		p.t.Fatal(err)
	}
	m, err := rpccp.NewRootMessage(seg)
	if err == nil {
		err = build(m)
	}
	if err == nil {
		err = p.enc.Encode(msg)
	}
	if err != nil {
		p.t.Fatalf("raw peer send: %v", err)
	}
}

func (p *rawPeer) recv() (rpccp.Message, error) {
	p.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	msg, err := p.dec.Decode()
	if err != nil {
		return rpccp.Message{}, err
	}
	return rpccp.ReadRootMessage(msg)
}

// call sends a Call to export id (or, with pa >= 0, to question pa's
// results at field 5) whose params content is built by params.
func (p *rawPeer) call(qid, export uint32, pa int, method uint16, params func(rpccp.Payload) error) {
	p.callField(qid, export, pa, 5, method, params)
}

// callField is call with the pipelined field chosen.
func (p *rawPeer) callField(qid, export uint32, pa int, field, method uint16, params func(rpccp.Payload) error) {
	p.send(func(m rpccp.Message) error {
		call, err := m.NewCall()
		if err != nil {
			return err
		}
		call.SetQuestionId(qid)
		call.SetInterfaceId(testcapnp.Test_TypeID)
		call.SetMethodId(method)
		mt, err := call.NewTarget()
		if err != nil {
			return err
		}
		if pa >= 0 {
			a, err := mt.NewPromisedAnswer()
			if err != nil {
				return err
			}
			a.SetQuestionId(uint32(pa))
			ops, err := a.NewTransform(1)
			if err != nil {
				return err
			}
			ops.At(0).SetGetPointerField(field)
		} else {
			mt.SetImportedCap(export)
		}
		payload, err := call.NewParams()
		if err != nil {
			return err
		}
		return params(payload)
	})
}

// TestNativeHostileInput: malformed arguments, unknown methods and bad
// pipelining reach a native object as exceptions, not crashes; a
// protocol violation still aborts the connection, and nothing leaks
// (TestMain checks goroutines).
func TestNativeHostileInput(t *testing.T) {
	a, b := net.Pipe()
	live := new(atomic.Int64)
	root, _ := testnative.New("root", live)
	server := core.NewConn(b, &core.Options{BootstrapClient: root})
	defer server.Close()
	p := &rawPeer{t: t, c: a, enc: capnp.NewEncoder(a), dec: capnp.NewDecoder(a)}
	defer a.Close()
	errs := make(chan error, 1)
	returns := make(chan rpccp.Message, 16)
	go func() {
		for {
			m, err := p.recv()
			if err != nil {
				errs <- err
				close(returns)
				return
			}
			returns <- m
		}
	}()

	p.send(func(m rpccp.Message) error {
		bs, err := m.NewBootstrap()
		bs.SetQuestionId(0)
		return err
	})
	m := <-returns
	ret, err := m.Return()
	if err != nil || m.Which() != rpccp.Message_Which_return {
		t.Fatalf("bootstrap: got %v, %v", m.Which(), err)
	}
	res, _ := ret.Results()
	caps, _ := res.CapTable()
	if caps.Len() != 1 || caps.At(0).Which() != rpccp.CapDescriptor_Which_senderHosted {
		t.Fatalf("bootstrap cap table: %d entries", caps.Len())
	}
	export := caps.At(0).SenderHosted()

	structAsData := func(pl rpccp.Payload) error {
		// echo's data field holds a struct, not Data.
		st, err := capnp.NewStruct(pl.Segment(), capnp.ObjectSize{PointerCount: 1})
		if err != nil {
			return err
		}
		inner, err := capnp.NewStruct(pl.Segment(), capnp.ObjectSize{DataSize: 8})
		if err != nil {
			return err
		}
		if err := st.SetPtr(0, inner.ToPtr()); err != nil {
			return err
		}
		return pl.SetContent(st.ToPtr())
	}
	noContent := func(rpccp.Payload) error { return nil }
	p.call(1, export, -1, 0, structAsData) // echo, data is a struct
	p.call(2, export, -1, 99, noContent)   // unknown method
	p.call(3, export, -1, 3, structAsData) // child, name is a struct
	p.call(4, 0, 3, 4, noContent)          // name() on field 5 of child's results
	p.call(5, export, -1, 12, noContent)   // seq with no params at all
	p.call(6, export, -1, 5, structAsData) // callBack: cb is not a capability
	// Calls pipelined on a child that returned (the native fast path,
	// answer.pipelinedNativeLocked): on the child itself, and on a
	// field of its results that holds nothing.
	named := func(pl rpccp.Payload) error {
		params, err := testcapnp.NewTest_child_Params(pl.Segment())
		if err == nil {
			err = params.SetName("kid")
		}
		if err == nil {
			err = pl.SetContent(params.ToPtr())
		}
		return err
	}
	p.call(7, export, -1, 3, named)
	p.callField(8, 0, 7, 0, 4, noContent) // name() on the child
	p.callField(9, 0, 7, 3, 4, noContent) // name() on an empty field
	seen := map[uint32]rpccp.Return_Which{}
	for len(seen) < 9 {
		m, ok := <-returns
		if !ok {
			t.Fatalf("connection ended after %d returns: %v", len(seen), <-errs)
		}
		if m.Which() != rpccp.Message_Which_return {
			continue
		}
		ret, _ := m.Return()
		seen[ret.AnswerId()] = ret.Which()
	}
	t.Logf("returns: %v", seen)
	for _, q := range []uint32{2, 4, 9} {
		if seen[q] != rpccp.Return_Which_exception {
			t.Errorf("question %d returned %v; want an exception", q, seen[q])
		}
	}
	for _, q := range []uint32{7, 8} {
		if seen[q] != rpccp.Return_Which_results {
			t.Errorf("question %d returned %v; want results", q, seen[q])
		}
	}
	for q := uint32(0); q <= 9; q++ {
		p.send(func(m rpccp.Message) error {
			f, err := m.NewFinish()
			f.SetQuestionId(q)
			f.SetReleaseResultCaps(true)
			return err
		})
	}
	// A Finish for a question never asked is a protocol violation.
	p.send(func(m rpccp.Message) error {
		f, err := m.NewFinish()
		f.SetQuestionId(77)
		return err
	})
	var abort string
	for m := range returns {
		if m.Which() == rpccp.Message_Which_abort {
			e, _ := m.Abort()
			abort, _ = e.Reason()
		}
	}
	if !strings.Contains(abort, "protocol violation") {
		t.Errorf("Abort reason %q; want a protocol violation", abort)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	select {
	case <-server.Done():
	case <-ctx.Done():
		t.Fatal("the server kept the connection open")
	}
	if err := server.Err(); err == nil || !strings.Contains(err.Error(), "protocol violation") {
		t.Errorf("server ended with %v", err)
	}
	// Everything the peer held is released: only our own reference to
	// the root and the objects child created are gone.
	deadline := time.Now().Add(5 * time.Second)
	for live.Load() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d native objects still live after the connection ended", live.Load())
		}
		time.Sleep(2 * time.Millisecond)
	}
}
