package core

import (
	"bytes"
	"io"
	"testing"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"
)

// partialTryWriter records what is written to it; TryWrite takes at
// most take bytes.
type partialTryWriter struct {
	bytes.Buffer
	take int
}

func (p *partialTryWriter) Read([]byte) (int, error) { return 0, io.EOF }
func (p *partialTryWriter) Close() error             { return nil }

func (p *partialTryWriter) TryWrite(b []byte) (int, error) {
	n := min(p.take, len(b))
	p.Buffer.Write(b[:n])
	return n, nil
}

// What a TryWrite leaves goes out before the frames queued meanwhile,
// a large one written from its own message included (its place in the
// queue moves by the bytes put back ahead of it).
func TestTryWriteRestGoesFirst(t *testing.T) {
	for _, take := range []int{0, 5, 30, 1 << 20} {
		tw := &partialTryWriter{take: take}
		c := newConn(tw, nil)
		t.Cleanup(c.cancel)

		finish := func(id uint32) {
			msg, m, err := newMessage()
			if err != nil {
				t.Fatal(err)
			}
			f, err := m.NewFinish()
			if err != nil {
				t.Fatal(err)
			}
			f.SetQuestionId(id)
			if err := c.sendLocked(msg); err != nil {
				t.Fatal(err)
			}
			msg.Release()
		}
		big := make([]byte, largeFrameBytes+1000)
		for i := range big {
			big[i] = byte(i * 7)
		}

		c.mu.Lock()
		finish(1)
		finish(2)
		o := c.takeOutputLocked()
		o.try = true
		// Queued while the first two are being written: a small frame,
		// then a large one that the queue holds by reference.
		finish(3)
		msg, m, err := newMessage()
		if err != nil {
			t.Fatal(err)
		}
		call, _ := m.NewCall()
		call.SetQuestionId(4)
		params, _ := call.NewParams()
		d, _ := capnp.NewData(params.Segment(), big)
		if err := params.SetContent(d.ToPtr()); err != nil {
			t.Fatal(err)
		}
		if byRef, err := c.sendByRefLocked(msg, nil); err != nil || !byRef {
			t.Fatalf("the large Call was not queued by reference: %v, %v", byRef, err)
		}
		c.mu.Unlock()

		c.tryWrite(o)
		c.mu.Lock()
		rest := c.takeOutputLocked()
		c.mu.Unlock()
		if !c.write(rest) {
			t.Fatalf("take %d: write failed", take)
		}

		dec := capnp.NewDecoder(&tw.Buffer)
		for i, want := range []uint32{1, 2, 3, 4} {
			msg, err := dec.Decode()
			if err != nil {
				t.Fatalf("take %d: frame %d: %v", take, i+1, err)
			}
			m, err := rpccp.ReadRootMessage(msg)
			if err != nil {
				t.Fatalf("take %d: frame %d: %v", take, i+1, err)
			}
			switch m.Which() {
			case rpccp.Message_Which_finish:
				f, _ := m.Finish()
				if f.QuestionId() != want {
					t.Fatalf("take %d: frame %d is the Finish of %d, want %d", take, i+1, f.QuestionId(), want)
				}
			case rpccp.Message_Which_call:
				call, _ := m.Call()
				params, _ := call.Params()
				content, _ := params.Content()
				if call.QuestionId() != want || !bytes.Equal(content.Data(), big) {
					t.Fatalf("take %d: frame %d is Call %d with %d bytes of data, want Call %d with its %d bytes", take, i+1, call.QuestionId(), len(content.Data()), want, len(big))
				}
			default:
				t.Fatalf("take %d: frame %d is a %v", take, i+1, m.Which())
			}
		}
		if tw.Len() != 0 {
			t.Fatalf("take %d: %d bytes after the last frame", take, tw.Len())
		}
	}
}
