package unix

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testnative"
)

// rawFrame encodes a stream frame with the given segment sizes in words
// and zero bodies.
func rawFrame(words ...uint32) []byte {
	var b []byte
	b = binary.LittleEndian.AppendUint32(b, uint32(len(words)-1))
	for _, w := range words {
		b = binary.LittleEndian.AppendUint32(b, w)
	}
	if len(words)%2 == 0 {
		b = append(b, 0, 0, 0, 0)
	}
	for _, w := range words {
		b = append(b, make([]byte, 8*int(w))...)
	}
	return b
}

func TestFrameScanner(t *testing.T) {
	frames := [][]byte{
		rawFrame(1),
		rawFrame(0), // header only
		rawFrame(2, 3),
		rawFrame(0, 0), // header and padding only
		rawFrame(1, 0, 4),
		rawFrame(5, 1, 0, 2),
		bootstrapFrame(7),
	}
	var stream []byte
	var bounds []int // offsets where a frame ends
	for _, f := range frames {
		stream = append(stream, f...)
		bounds = append(bounds, len(stream))
	}
	isBound := func(off int) bool {
		for _, b := range bounds {
			if b == off {
				return true
			}
		}
		return off == 0
	}

	// One byte at a time: inFrame is false exactly at frame boundaries.
	var s frameScanner
	for i := range stream {
		if got, want := s.inFrame(), !isBound(i); got != want {
			t.Fatalf("before byte %d: inFrame = %v; want %v", i, got, want)
		}
		s.scan(stream[i : i+1])
	}
	if s.inFrame() {
		t.Fatal("inFrame after the last frame")
	}

	// Random splits agree with the byte-by-byte walk at every chunk end.
	r := rand.New(rand.NewPCG(1, 2))
	for range 200 {
		var s frameScanner
		for off := 0; off < len(stream); {
			n := min(1+r.IntN(40), len(stream)-off)
			s.scan(stream[off : off+n])
			off += n
			if got, want := s.inFrame(), !isBound(off) && off < len(stream); got != want {
				t.Fatalf("after %d bytes: inFrame = %v; want %v", off, got, want)
			}
		}
	}
}

// rpcFrame builds one RPC message with fill, framed for the stream.
func rpcFrame(t testing.TB, fill func(m rpccp.Message) error) []byte {
	msg, seg, err := capnp.NewMessage(capnp.SingleSegment(nil))
	if err != nil {
		t.Fatal(err)
	}
	defer msg.Release()
	m, err := rpccp.NewRootMessage(seg)
	if err == nil {
		err = fill(m)
	}
	if err != nil {
		t.Fatal(err)
	}
	b, err := msg.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func bootstrapFrame(qid uint32) []byte {
	return rpcFrame(&testing.T{}, func(m rpccp.Message) error {
		b, err := m.NewBootstrap()
		if err == nil {
			b.SetQuestionId(qid)
		}
		return err
	})
}

// readUntilClosed reads from c until EOF or an error, with a deadline, and
// reports how long it took.
func readUntilClosed(t *testing.T, c net.Conn, limit time.Duration) (time.Duration, error) {
	t.Helper()
	start := time.Now()
	c.SetReadDeadline(start.Add(limit))
	_, err := io.Copy(io.Discard, c)
	return time.Since(start), err
}

// TestFrameTimeoutClosesStalledFrame: half a frame, then silence, costs the
// peer its connection after the frame timeout; a complete frame followed
// by silence does not.
func TestFrameTimeoutClosesStalledFrame(t *testing.T) {
	verifyNoLeaks(t)
	const timeout = 200 * time.Millisecond
	addr := "unix:" + filepath.Join(t.TempDir(), "vat.sock")
	s := startServer(t, addr, WithFrameTimeout(timeout))
	network, address, _ := ParseAddr(s.addr)

	// Half a frame.
	half, err := net.Dial(network, address)
	if err != nil {
		t.Fatal(err)
	}
	defer half.Close()
	f := bootstrapFrame(0)
	if _, err := half.Write(f[:len(f)/2]); err != nil {
		t.Fatal(err)
	}

	// A complete frame, then silence (an idle, healthy peer).
	idle, err := net.Dial(network, address)
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	if _, err := idle.Write(bootstrapFrame(0)); err != nil {
		t.Fatal(err)
	}

	took, err := readUntilClosed(t, half, 10*time.Second)
	if err != nil {
		t.Fatalf("stalled peer: connection not closed: %v after %v", err, took)
	}
	if took < timeout/2 {
		t.Errorf("stalled peer disconnected after %v; the timeout is %v", took, timeout)
	}
	t.Logf("peer stalled mid-frame was disconnected after %v (timeout %v)", took, timeout)

	// The idle peer got its Return and is still connected after several
	// timeouts.
	idle.SetReadDeadline(time.Now().Add(4 * timeout))
	dec := capnp.NewDecoder(idle)
	msg, err := dec.Decode()
	if err != nil {
		t.Fatalf("idle peer: reading the bootstrap Return: %v", err)
	}
	if m, err := rpccp.ReadRootMessage(msg); err != nil || m.Which() != rpccp.Message_Which_return {
		t.Fatalf("idle peer: got %v, %v; want a Return", m.Which(), err)
	}
	if _, err := dec.Decode(); !isDeadline(err) {
		t.Fatalf("idle peer: after the Return, read %v; want our own deadline to pass (connection kept open)", err)
	}
}

func isDeadline(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestFrameTimeoutSlowFrame: a frame that keeps arriving, slowly, is not
// cut off, even when it takes several timeouts in total.
func TestFrameTimeoutSlowFrame(t *testing.T) {
	verifyNoLeaks(t)
	const timeout = 500 * time.Millisecond
	addr := "unix:" + filepath.Join(t.TempDir(), "vat.sock")
	s := startServer(t, addr, WithFrameTimeout(timeout))
	network, address, _ := ParseAddr(s.addr)
	c, err := net.Dial(network, address)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	f := bootstrapFrame(0)
	start := time.Now()
	for i := range f {
		if _, err := c.Write(f[i : i+1]); err != nil {
			t.Fatalf("byte %d: %v", i, err)
		}
		if i%4 == 0 {
			time.Sleep(timeout / 5)
		}
	}
	if took := time.Since(start); took < 2*timeout {
		t.Fatalf("sending the frame took only %v; the test needs more than 2x the timeout", took)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	msg, err := capnp.NewDecoder(c).Decode()
	if err != nil {
		t.Fatalf("reading the Return of a slowly sent Bootstrap: %v", err)
	}
	if m, err := rpccp.ReadRootMessage(msg); err != nil || m.Which() != rpccp.Message_Which_return {
		t.Fatalf("got %v, %v; want a Return", m.Which(), err)
	}
}

// TestIdleTimeout: with WithIdleTimeout a Dial'd connection whose peer says
// nothing ends with a *StallError, and a busy one does not.
func TestIdleTimeout(t *testing.T) {
	verifyNoLeaks(t)
	const timeout = 500 * time.Millisecond
	ctx := testCtx(t)
	s := startServer(t, "unix:"+filepath.Join(t.TempDir(), "vat.sock"))

	conn, err := Dial(ctx, s.addr, &core.Options{Logger: testLogger(t)}, WithIdleTimeout(timeout))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	boot := testcapnp.Test(conn.Bootstrap(ctx))
	defer boot.Release()
	// Busy for several timeouts: calls keep bytes coming.
	deadline := time.Now().Add(5 * timeout / 2)
	for time.Now().Before(deadline) {
		if _, err := echo(ctx, boot, []byte("busy")); err != nil {
			t.Fatalf("echo while busy: %v", err)
		}
		time.Sleep(timeout / 5)
	}
	start := time.Now()
	select {
	case <-conn.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("idle connection still open 10s after the idle timeout")
	}
	took := time.Since(start)
	var se *StallError
	if !errors.As(conn.Err(), &se) || se.InFrame || se.Limit != timeout {
		t.Fatalf("idle connection ended with %v; want a *StallError between frames with Limit %v", conn.Err(), timeout)
	}
	t.Logf("idle connection ended after %v: %v", took, conn.Err())
	if _, err := echo(ctx, boot, []byte("x")); err == nil {
		t.Error("echo on a connection closed for idleness succeeded")
	}
}

// TestTimeoutsOff: without options the socket is used as is.
func TestTimeoutsOff(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if got := newConfig(nil).wrap(a); got != (vectorConn{a}) {
		t.Errorf("wrap without options returned %T; want the conn with writev only", got)
	}
	if got := newConfig([]Option{WithFrameTimeout(time.Second)}).wrap(a); got == a {
		t.Error("wrap with a frame timeout returned the conn itself")
	}
}

// A caller reading its own Return (see core's read role) over a
// connection with stall timeouts: cancelling the call interrupts the read
// at once, although Read arms a long idle deadline of its own, and the
// connection goes on working.
func TestIdleTimeoutCancelInterruptsCaller(t *testing.T) {
	a, b := net.Pipe()
	root, _ := testnative.New("root", nil) // echo answers, block holds until cancelled
	srv := core.NewConn(b, &core.Options{BootstrapClient: root})
	cli := NewConn(a, nil, WithIdleTimeout(time.Minute))
	defer func() { cli.Close(); srv.Close(); <-cli.Done(); <-srv.Done() }()
	boot := cli.Bootstrap(context.Background())
	defer boot.Release()
	test := testnative.Test{Client: boot}
	for range 3 {
		if err := test.EchoOrBlock(context.Background(), false); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := test.EchoOrBlock(ctx, true); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("held call: %v, want context.DeadlineExceeded", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("the cancelled call returned after %v", d)
	}
	for range 3 {
		if err := test.EchoOrBlock(context.Background(), false); err != nil {
			t.Fatalf("call after the interrupted read: %v", err)
		}
	}
}

// An interrupt deadline set before Read arms its own stall deadline is
// kept: Read returns at once instead of waiting for the idle timeout.
func TestDeadlineConnKeepsInterrupt(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	c := &deadlineConn{Conn: a, raw: a, idle: time.Minute}
	if err := c.SetReadDeadline(time.Unix(1, 0)); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := c.Read(make([]byte, 8))
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("interrupted Read: %v, want os.ErrDeadlineExceeded", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Read replaced the interrupt deadline with its idle deadline")
	}
	// Cleared, Read waits for data again.
	if err := c.SetReadDeadline(time.Time{}); err != nil {
		t.Fatal(err)
	}
	go b.Write([]byte("12345678"))
	if n, err := c.Read(make([]byte, 8)); n != 8 || err != nil {
		t.Fatalf("Read after clearing: %d, %v", n, err)
	}
}
