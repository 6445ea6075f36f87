package core

import (
	"bytes"
	"io"
	"sync"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"

	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// gatedWriter holds large writes until the gate opens.
type gatedWriter struct {
	io.ReadCloser
	w       io.Writer
	gate    chan struct{}
	blocked chan struct{} // closed when a large write is waiting
	once    sync.Once
}

func (g *gatedWriter) Write(p []byte) (int, error) {
	if len(p) >= largeFrameBytes {
		g.once.Do(func() { close(g.blocked) })
		<-g.gate
	}
	return g.w.Write(p)
}

// A large Return is written straight from its message. If the caller's
// Finish retires the answer while that write is still under way, the
// message must not be freed (and its memory reused) until the write is
// done: the peer must receive the results intact.
func TestLargeReturnSurvivesFinishDuringWrite(t *testing.T) {
	toServer, fromPeer := io.Pipe()
	fromServer, toPeer := io.Pipe()
	g := &gatedWriter{ReadCloser: toServer, w: toPeer, gate: make(chan struct{}), blocked: make(chan struct{})}
	server := NewConn(g, &Options{BootstrapClient: capnp.Client(testimpl.New("root", nil).Client())})
	defer func() {
		server.Close()
		<-server.Done()
	}()

	var received bytes.Buffer
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		io.Copy(&received, fromServer)
	}()

	payload := make([]byte, 1<<20)
	for i := range payload {
		payload[i] = byte(i*7 + 1)
	}
	send := func(build func(m rpccp.Message) error) {
		t.Helper()
		msg, m, err := newMessage()
		if err != nil {
			t.Fatal(err)
		}
		if err := build(m); err != nil {
			t.Fatal(err)
		}
		frame, err := appendFrame(nil, msg)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := fromPeer.Write(frame); err != nil {
			t.Fatal(err)
		}
	}
	send(func(m rpccp.Message) error {
		b, err := m.NewBootstrap()
		b.SetQuestionId(0)
		return err
	})
	send(func(m rpccp.Message) error {
		call, err := m.NewCall()
		if err != nil {
			return err
		}
		call.SetQuestionId(1)
		call.SetInterfaceId(testcapnp.Test_TypeID)
		call.SetMethodId(0) // echo
		mt, err := call.NewTarget()
		if err != nil {
			return err
		}
		pa, err := mt.NewPromisedAnswer()
		if err != nil {
			return err
		}
		pa.SetQuestionId(0)
		params, err := call.NewParams()
		if err != nil {
			return err
		}
		args, err := testcapnp.NewTest_echo_Params(params.Segment())
		if err != nil {
			return err
		}
		if err := args.SetData(payload); err != nil {
			return err
		}
		return params.SetContent(args.ToPtr())
	})
	select {
	case <-g.blocked:
	case <-time.After(5 * time.Second):
		t.Fatal("the large Return was never written")
	}
	// The Return is being written; the caller finishes the question.
	send(func(m rpccp.Message) error {
		f, err := m.NewFinish()
		f.SetQuestionId(1)
		return err
	})
	// Let the Finish be handled (the answer retired) before the write
	// goes on, and churn message memory meanwhile.
	time.Sleep(50 * time.Millisecond)
	for range 16 {
		msg, _, _ := newMessage()
		seg, _ := msg.Segment(0)
		_, _ = capnp.NewData(seg, make([]byte, 1<<20))
		recycleMessage(msg)
	}
	close(g.gate)
	server.Close()
	<-server.Done()
	toPeer.Close()
	<-readDone

	fr := newFrameReader(bytes.NewReader(received.Bytes()), Limits{})
	found := false
	for {
		msg, err := fr.readMessage()
		if err != nil {
			break
		}
		m, err := rpccp.ReadRootMessage(msg)
		if err != nil || m.Which() != rpccp.Message_Which_return {
			continue
		}
		ret, _ := m.Return()
		if ret.AnswerId() != 1 || ret.Which() != rpccp.Return_Which_results {
			continue
		}
		p, _ := ret.Results()
		content, _ := p.Content()
		d, _ := testcapnp.Test_echo_Results(content.Struct()).Data()
		found = true
		if !bytes.Equal(d, payload) {
			t.Fatalf("the Return's payload was corrupted while being written (%d bytes, want %d)", len(d), len(payload))
		}
	}
	if !found {
		t.Fatal("no results Return for question 1 was written")
	}
}
