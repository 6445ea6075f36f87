package conformance

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"math/rand"
	"net"
	"syscall"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"
	"go.uber.org/goleak"

	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// Bad-input tests: the test plays a hostile peer writing raw frames to
// our server Conn, and checks that it answers with an Abort that says
// why, closes the stream, ends (Done, non-nil Err), releases everything
// and leaks no goroutine.

// hostileCase is one bad input.
type hostileCase struct {
	name string
	// send writes the bad input on the raw socket.
	send func(t *testing.T, w *rawPeer)
	// mayOmitAbort is set when the stream ends inside a frame, where
	// there may be nobody left to read an Abort.
	mayOmitAbort bool
	// wantAbort false: a control case that must not abort.
	control bool
}

var hostileCases = []hostileCase{
	{name: "control_bootstrapIsAnswered", control: true, send: func(t *testing.T, w *rawPeer) {
		w.msg(t, func(m rpccp.Message) error {
			b, err := m.NewBootstrap()
			b.SetQuestionId(0)
			return err
		})
	}},
	{name: "truncatedFrameThenEOF", mayOmitAbort: true, send: func(t *testing.T, w *rawPeer) {
		hdr := make([]byte, 8)
		binary.LittleEndian.PutUint32(hdr[0:], 0)  // one segment
		binary.LittleEndian.PutUint32(hdr[4:], 10) // of 10 words
		w.raw(t, hdr)
		w.raw(t, make([]byte, 3*8)) // only 3 of them
		w.closeWrite(t)
	}},
	{name: "tooManySegments", send: func(t *testing.T, w *rawPeer) {
		hdr := make([]byte, 8)
		binary.LittleEndian.PutUint32(hdr[0:], 10000-1) // 10000 segments
		binary.LittleEndian.PutUint32(hdr[4:], 1)
		w.raw(t, hdr)
		// No more: the count alone must be refused, without waiting for
		// the 40 KB segment table.
	}},
	{name: "oversizedMessage1GiB", send: func(t *testing.T, w *rawPeer) {
		hdr := make([]byte, 8)
		binary.LittleEndian.PutUint32(hdr[0:], 0)
		binary.LittleEndian.PutUint32(hdr[4:], (1<<30)/8) // 1 GiB segment
		w.raw(t, hdr)
		w.raw(t, make([]byte, 64)) // a start; the server must not wait for the rest
	}},
	{name: "oversizedMessageMultiSegment", send: func(t *testing.T, w *rawPeer) {
		// Four segments of 256 MiB each: each segment is small enough to
		// look plausible, the sum is not.
		hdr := make([]byte, 24)
		binary.LittleEndian.PutUint32(hdr[0:], 3)
		for i := 0; i < 4; i++ {
			binary.LittleEndian.PutUint32(hdr[4+4*i:], (256<<20)/8)
		}
		w.raw(t, hdr)
	}},
	{name: "randomBytes", send: func(t *testing.T, w *rawPeer) {
		b := make([]byte, 4096)
		rand.New(rand.NewSource(1)).Read(b)
		w.raw(t, b)
	}},
	{name: "validFrameRandomContent", send: func(t *testing.T, w *rawPeer) {
		// Correct framing, garbage where the Message struct should be.
		const words = 64
		b := make([]byte, 8+words*8)
		binary.LittleEndian.PutUint32(b[0:], 0)
		binary.LittleEndian.PutUint32(b[4:], words)
		r := rand.New(rand.NewSource(2))
		r.Read(b[8:])
		// Make the root pointer a struct pointer that points out of
		// bounds, so the garbage cannot accidentally be a valid message.
		// Struct pointer: offset 1<<24 words (far outside the 64-word
		// segment), one data word, one pointer.
		binary.LittleEndian.PutUint64(b[8:], uint64(uint32(1<<24)<<2)|1<<32|1<<48)
		w.raw(t, b)
	}},
	{name: "callUnknownImportID", send: func(t *testing.T, w *rawPeer) {
		w.msg(t, func(m rpccp.Message) error {
			c, err := m.NewCall()
			if err != nil {
				return err
			}
			c.SetQuestionId(0)
			c.SetInterfaceId(testcapnp.Test_TypeID)
			c.SetMethodId(4) // name()
			tgt, err := c.NewTarget()
			if err != nil {
				return err
			}
			tgt.SetImportedCap(42)
			p, err := c.NewParams()
			if err != nil {
				return err
			}
			st, err := capnp.NewStruct(p.Segment(), capnp.ObjectSize{})
			if err != nil {
				return err
			}
			return p.SetContent(st.ToPtr())
		})
	}},
	{name: "callUnknownPromisedAnswer", send: func(t *testing.T, w *rawPeer) {
		w.msg(t, func(m rpccp.Message) error {
			c, err := m.NewCall()
			if err != nil {
				return err
			}
			c.SetQuestionId(0)
			c.SetInterfaceId(testcapnp.Test_TypeID)
			c.SetMethodId(4)
			tgt, err := c.NewTarget()
			if err != nil {
				return err
			}
			pa, err := tgt.NewPromisedAnswer()
			if err != nil {
				return err
			}
			pa.SetQuestionId(77)
			_, err = c.NewParams()
			return err
		})
	}},
	{name: "reusedQuestionID", send: func(t *testing.T, w *rawPeer) {
		for i := 0; i < 2; i++ {
			w.msg(t, func(m rpccp.Message) error {
				b, err := m.NewBootstrap()
				b.SetQuestionId(5) // same id, no Finish in between
				return err
			})
		}
	}},
	{name: "returnForUnknownQuestion", send: func(t *testing.T, w *rawPeer) {
		w.msg(t, func(m rpccp.Message) error {
			r, err := m.NewReturn()
			if err != nil {
				return err
			}
			r.SetAnswerId(77)
			_, err = r.NewResults()
			return err
		})
	}},
	{name: "releaseUnknownExport", send: func(t *testing.T, w *rawPeer) {
		w.msg(t, func(m rpccp.Message) error {
			r, err := m.NewRelease()
			r.SetId(99)
			r.SetReferenceCount(1)
			return err
		})
	}},
	{name: "finishUnknownQuestion", send: func(t *testing.T, w *rawPeer) {
		w.msg(t, func(m rpccp.Message) error {
			f, err := m.NewFinish()
			f.SetQuestionId(55)
			return err
		})
	}},
	{name: "disembargoUnknownTarget", send: func(t *testing.T, w *rawPeer) {
		w.msg(t, func(m rpccp.Message) error {
			d, err := m.NewDisembargo()
			if err != nil {
				return err
			}
			tgt, err := d.NewTarget()
			if err != nil {
				return err
			}
			tgt.SetImportedCap(123)
			d.Context().SetSenderLoopback(1)
			return nil
		})
	}},
	{name: "disembargoUnknownEmbargoID", send: func(t *testing.T, w *rawPeer) {
		w.msg(t, func(m rpccp.Message) error {
			d, err := m.NewDisembargo()
			if err != nil {
				return err
			}
			tgt, err := d.NewTarget()
			if err != nil {
				return err
			}
			tgt.SetImportedCap(0)
			d.Context().SetReceiverLoopback(31337)
			return nil
		})
	}},
}

// rawPeer is the hostile side of the socket.
type rawPeer struct {
	c   net.Conn
	enc *capnp.Encoder
}

func (w *rawPeer) raw(t *testing.T, b []byte) {
	t.Helper()
	// The server may already have hung up; that is fine, what it sent
	// back is checked afterwards.
	if _, err := w.c.Write(b); err != nil {
		t.Logf("write: %v (server may have closed already)", err)
	}
}

func (w *rawPeer) msg(t *testing.T, build func(rpccp.Message) error) {
	t.Helper()
	msg, seg := capnp.NewSingleSegmentMessage(nil)
	m, err := rpccp.NewRootMessage(seg)
	if err != nil {
		t.Fatalf("build message: %v", err)
	}
	if err := build(m); err != nil {
		t.Fatalf("build message: %v", err)
	}
	if err := w.enc.Encode(msg); err != nil {
		t.Logf("write message: %v (server may have closed already)", err)
	}
}

func (w *rawPeer) closeWrite(t *testing.T) {
	t.Helper()
	if err := w.c.(*net.UnixConn).CloseWrite(); err != nil {
		t.Fatalf("CloseWrite: %v", err)
	}
}

// received is what our side sent back, up to the end of the stream.
type received struct {
	which  []rpccp.Message_Which
	abort  string // reason of the last Abort, if any
	aborts int
	end    error // io.EOF for a clean end
}

func readAll(t *testing.T, c net.Conn) received {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(waitTimeout))
	dec := capnp.NewDecoder(c)
	var r received
	for {
		msg, err := dec.Decode()
		if err != nil {
			r.end = err
			return r
		}
		m, err := rpccp.ReadRootMessage(msg)
		if err != nil {
			t.Errorf("our side sent an undecodable message: %v", err)
			continue
		}
		r.which = append(r.which, m.Which())
		if m.Which() == rpccp.Message_Which_abort {
			r.aborts++
			e, err := m.Abort()
			if err != nil {
				t.Errorf("our side sent an Abort without a readable exception: %v", err)
			}
			r.abort, _ = e.Reason()
		}
	}
}

type errer interface{ Err() error }

func TestHostile(t *testing.T) {
	before := goleak.IgnoreCurrent()
	t.Run("cases", func(t *testing.T) {
		for _, hc := range hostileCases {
			t.Run(hc.name, func(t *testing.T) {
				t.Parallel()
				runHostile(t, hc)
			})
		}
	})
	if err := goleak.Find(before); err != nil {
		t.Errorf("goroutines leaked by bad-input tests after every connection ended:\n%v", err)
	}
}

func runHostile(t *testing.T, hc hostileCase) { runHostileKind(t, hc, ours) }

func runHostileKind(t *testing.T, hc hostileCase, k kind) {
	live := new(testimpl.Live)
	raw, sc := socketPair(t)
	defer raw.Close()
	srv := newEndpoint(t, k, sc, capnp.Client(testimpl.NewGuarded("root", live).Client()))
	defer srv.Close()
	w := &rawPeer{c: raw, enc: capnp.NewEncoder(raw)}

	hc.send(t, w)

	if hc.control {
		// Read the answer to the bootstrap, then hang up cleanly.
		raw.SetReadDeadline(time.Now().Add(waitTimeout))
		msg, err := capnp.NewDecoder(raw).Decode()
		if err != nil {
			t.Fatalf("control: no reply to Bootstrap: %v", err)
		}
		m, err := rpccp.ReadRootMessage(msg)
		if err != nil || m.Which() != rpccp.Message_Which_return {
			t.Fatalf("control: reply to Bootstrap is %v (%v), want return", m.Which(), err)
		}
		w.closeWrite(t)
	}

	got := readAll(t, raw)
	if !hc.control {
		switch {
		case got.aborts == 0 && !hc.mayOmitAbort:
			t.Errorf("no Abort from our side; it sent %v then %v", got.which, got.end)
		case got.aborts > 0 && got.abort == "":
			t.Errorf("Abort with an empty reason; messages %v", got.which)
		case got.aborts > 0 && got.which[len(got.which)-1] != rpccp.Message_Which_abort:
			t.Errorf("messages after the Abort: %v", got.which)
		}
		if got.aborts > 0 {
			t.Logf("abort reason: %q", got.abort)
		}
	}
	// EOF, or ECONNRESET when the server closed with part of our junk
	// still unread in its receive buffer (the kernel then resets).
	if !errors.Is(got.end, io.EOF) && !errors.Is(got.end, syscall.ECONNRESET) {
		t.Errorf("stream from our side did not end (EOF or reset) within %v: %v (messages %v)", waitTimeout, got.end, got.which)
	}

	select {
	case <-srv.Done():
	case <-time.After(waitTimeout):
		t.Fatalf("server Conn not Done %v after the bad input", waitTimeout)
	}
	if e, ok := srv.(errer); ok && !hc.control && e.Err() == nil {
		t.Error("server Conn ended with Err() == nil after a protocol violation")
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if err := live.WaitZero(ctx); err != nil {
		t.Errorf("server still has %d live objects after the connection ended", live.Count())
	}
}
