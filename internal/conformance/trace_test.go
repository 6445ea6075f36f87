package conformance

import (
	"flag"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"

	"github.com/captp-go/captp/internal/testcapnp"
)

// With -wiretrace, every scenario records the messages crossing the socket,
// as the client end saw them, and prints them if the scenario fails.
//
//	go test ./internal/conformance -run 'TestConformance/gocapnp-client_ours-server/scenarios/embargoA' -wiretrace
var traceFlag = flag.Bool("wiretrace", false, "print a message trace of every failing conformance scenario")

// wireTrace records messages in both directions in the order the client
// end read or wrote them.
type wireTrace struct {
	start time.Time
	mu    sync.Mutex
	lines []string
	wg    sync.WaitGroup
}

// tracedConn copies what passes through c into two decoders.
type tracedConn struct {
	net.Conn
	in, out *io.PipeWriter
}

func (c *tracedConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if n > 0 {
		c.in.Write(b[:n])
	}
	return n, err
}

func (c *tracedConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	if n > 0 {
		c.out.Write(b[:n])
	}
	return n, err
}

func (c *tracedConn) Close() error {
	err := c.Conn.Close()
	c.in.Close()
	c.out.Close()
	return err
}

// trace wraps c (the client end) and arranges for the trace to be
// printed if t fails.
func trace(t *testing.T, c net.Conn) net.Conn {
	tr := &wireTrace{start: time.Now()}
	inR, inW := io.Pipe()
	outR, outW := io.Pipe()
	tr.wg.Add(2)
	go tr.decode("client <- server", inR)
	go tr.decode("client -> server", outR)
	t.Cleanup(func() {
		inW.Close()
		outW.Close()
		tr.wg.Wait()
		if t.Failed() {
			t.Logf("wire trace (client end):\n%s", strings.Join(tr.lines, "\n"))
		}
	})
	return &tracedConn{Conn: c, in: inW, out: outW}
}

func (tr *wireTrace) decode(dir string, r *io.PipeReader) {
	defer tr.wg.Done()
	defer r.Close()
	dec := capnp.NewDecoder(r)
	for {
		msg, err := dec.Decode()
		if err != nil {
			return
		}
		s := describe(msg)
		tr.mu.Lock()
		tr.lines = append(tr.lines, fmt.Sprintf("%8.3fms %s %s", float64(time.Since(tr.start).Microseconds())/1000, dir, s))
		tr.mu.Unlock()
	}
}

func describeTarget(t rpccp.MessageTarget, err error) string {
	if err != nil {
		return "target?"
	}
	switch t.Which() {
	case rpccp.MessageTarget_Which_importedCap:
		return fmt.Sprintf("import#%d", t.ImportedCap())
	case rpccp.MessageTarget_Which_promisedAnswer:
		pa, _ := t.PromisedAnswer()
		tr, _ := pa.Transform()
		var ops []string
		for i := 0; i < tr.Len(); i++ {
			op := tr.At(i)
			if op.Which() == rpccp.PromisedAnswer_Op_Which_getPointerField {
				ops = append(ops, fmt.Sprint(op.GetPointerField()))
			}
		}
		return fmt.Sprintf("answer#%d%v", pa.QuestionId(), ops)
	}
	return t.Which().String()
}

func describeCaps(p rpccp.Payload) string {
	ct, err := p.CapTable()
	if err != nil || ct.Len() == 0 {
		return ""
	}
	var cs []string
	for i := 0; i < ct.Len(); i++ {
		cs = append(cs, describeCap(ct.At(i)))
	}
	return " caps" + fmt.Sprint(cs)
}

func describeCap(d rpccp.CapDescriptor) string {
	switch d.Which() {
	case rpccp.CapDescriptor_Which_senderHosted:
		return fmt.Sprintf("senderHosted#%d", d.SenderHosted())
	case rpccp.CapDescriptor_Which_senderPromise:
		return fmt.Sprintf("senderPromise#%d", d.SenderPromise())
	case rpccp.CapDescriptor_Which_receiverHosted:
		return fmt.Sprintf("receiverHosted#%d", d.ReceiverHosted())
	case rpccp.CapDescriptor_Which_receiverAnswer:
		pa, _ := d.ReceiverAnswer()
		return fmt.Sprintf("receiverAnswer#%d", pa.QuestionId())
	}
	return d.Which().String()
}

// describe summarises one RPC message on a line.
func describe(msg *capnp.Message) string {
	m, err := rpccp.ReadRootMessage(msg)
	if err != nil {
		return "undecodable: " + err.Error()
	}
	switch m.Which() {
	case rpccp.Message_Which_bootstrap:
		b, _ := m.Bootstrap()
		return fmt.Sprintf("Bootstrap q%d", b.QuestionId())
	case rpccp.Message_Which_call:
		c, _ := m.Call()
		s := fmt.Sprintf("Call q%d -> %s method %d", c.QuestionId(), describeTarget(c.Target()), c.MethodId())
		p, _ := c.Params()
		if c.InterfaceId() == testcapnp.Test_TypeID && c.MethodId() == 12 {
			content, _ := p.Content()
			s += fmt.Sprintf(" seq(%d)", testcapnp.Test_seq_Params(content.Struct()).N())
		}
		return s + describeCaps(p)
	case rpccp.Message_Which_return:
		r, _ := m.Return()
		s := fmt.Sprintf("Return a%d %v", r.AnswerId(), r.Which())
		switch r.Which() {
		case rpccp.Return_Which_results:
			p, _ := r.Results()
			s += describeCaps(p)
		case rpccp.Return_Which_exception:
			e, _ := r.Exception()
			reason, _ := e.Reason()
			s += fmt.Sprintf(" %v %q", e.Type(), reason)
		}
		return s
	case rpccp.Message_Which_finish:
		f, _ := m.Finish()
		return fmt.Sprintf("Finish q%d releaseResultCaps=%v", f.QuestionId(), f.ReleaseResultCaps())
	case rpccp.Message_Which_resolve:
		r, _ := m.Resolve()
		s := fmt.Sprintf("Resolve promise#%d ", r.PromiseId())
		if r.Which() == rpccp.Resolve_Which_cap {
			c, _ := r.Cap()
			return s + describeCap(c)
		}
		return s + "exception"
	case rpccp.Message_Which_release:
		r, _ := m.Release()
		return fmt.Sprintf("Release #%d x%d", r.Id(), r.ReferenceCount())
	case rpccp.Message_Which_disembargo:
		d, _ := m.Disembargo()
		ctx := d.Context()
		var c string
		switch ctx.Which() {
		case rpccp.Disembargo_context_Which_senderLoopback:
			c = fmt.Sprintf("senderLoopback %d", ctx.SenderLoopback())
		case rpccp.Disembargo_context_Which_receiverLoopback:
			c = fmt.Sprintf("receiverLoopback %d", ctx.ReceiverLoopback())
		default:
			c = ctx.Which().String()
		}
		return fmt.Sprintf("Disembargo -> %s %s", describeTarget(d.Target()), c)
	case rpccp.Message_Which_abort:
		e, _ := m.Abort()
		reason, _ := e.Reason()
		return fmt.Sprintf("Abort %v %q", e.Type(), reason)
	}
	return m.Which().String()
}
