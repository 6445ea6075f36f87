//go:build linux

package unix

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/captp-go/captp/internal/testsock"
)

// socketPair returns both ends of a Unix stream socketpair, wrapped.
func socketPair(t *testing.T) (*socketConn, *socketConn) {
	t.Helper()
	a, b := testsock.Pair(t)
	sa, ok := newSocketConn(a).(*socketConn)
	if !ok {
		t.Fatalf("newSocketConn(%T) is not a socketConn", a)
	}
	sb := newSocketConn(b).(*socketConn)
	t.Cleanup(func() { sa.Close(); sb.Close() })
	return sa, sb
}

// Stream sockets get raw system calls; other connections keep the plain
// vectorConn.
func TestSocketConnChosen(t *testing.T) {
	a, b := testsock.Pair(t)
	defer a.Close()
	defer b.Close()
	if _, ok := newSocketConn(a).(*socketConn); !ok {
		t.Errorf("a Unix stream socket got %T", newSocketConn(a))
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	tc, err := net.Dial("tcp", lis.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	if _, ok := newSocketConn(tc).(*socketConn); !ok {
		t.Errorf("a TCP socket got %T", newSocketConn(tc))
	}
	p, q := net.Pipe()
	defer p.Close()
	defer q.Close()
	if _, ok := newSocketConn(p).(vectorConn); !ok {
		t.Errorf("net.Pipe got %T", newSocketConn(p))
	}
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_SEQPACKET|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fds[0]), "seqpacket")
	pc, err := net.FileConn(f)
	f.Close()
	syscall.Close(fds[1])
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	if _, ok := newSocketConn(pc).(vectorConn); !ok {
		t.Errorf("a SOCK_SEQPACKET socket got %T", newSocketConn(pc))
	}
}

// Every byte arrives in order when the writer keeps filling a small
// socket buffer (writes that stop at EAGAIN and resume once the reader
// drains it) and the reader reads in sizes on both sides of
// rawSyscallMax.
func TestSocketConnStream(t *testing.T) {
	a, b := socketPair(t)
	for _, c := range []net.Conn{a.Conn, b.Conn} {
		c.(*net.UnixConn).SetWriteBuffer(8 << 10)
		c.(*net.UnixConn).SetReadBuffer(8 << 10)
	}
	data := make([]byte, 8<<20)
	for i := range data {
		data[i] = byte(rand.IntN(256))
	}
	writeErr := make(chan error, 1)
	go func() {
		rest := data
		for len(rest) > 0 {
			n := min(len(rest), 1+rand.IntN(2*rawSyscallMax))
			m, err := a.Write(rest[:n])
			if err == nil && m != n {
				err = errors.New("short write without an error")
			}
			if err != nil {
				a.Close() // the reader stops at once
				writeErr <- err
				return
			}
			rest = rest[n:]
		}
		writeErr <- a.CloseWrite()
	}()
	var got bytes.Buffer
	buf := make([]byte, 2*rawSyscallMax)
	for {
		n, err := b.Read(buf[:1+rand.IntN(len(buf))])
		got.Write(buf[:n])
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("read after %d bytes: %v", got.Len(), err)
		}
	}
	b.Close() // a writer still writing (the reader stopped early) fails now
	if err := <-writeErr; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.Bytes(), data) {
		t.Fatalf("read %d bytes that differ from the %d written", got.Len(), len(data))
	}
}

// Errors are the net package's: io.EOF at the end of the stream,
// os.ErrDeadlineExceeded past a deadline (also for a Read already
// waiting, which is how the core interrupts a caller's read),
// net.ErrClosed after Close, and a *net.OpError carrying the errno for a
// write to a closed peer.
func TestSocketConnErrors(t *testing.T) {
	a, b := socketPair(t)

	if err := b.SetReadDeadline(time.Now().Add(-time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Read(make([]byte, 16)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read past a deadline: %v, want os.ErrDeadlineExceeded", err)
	}
	b.SetReadDeadline(time.Time{})
	readErr := make(chan error, 1)
	go func() {
		_, err := b.Read(make([]byte, 16))
		readErr <- err
	}()
	time.Sleep(10 * time.Millisecond)
	b.SetReadDeadline(time.Now())
	if err := <-readErr; !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("waiting read interrupted by a deadline: %v, want os.ErrDeadlineExceeded", err)
	}
	b.SetReadDeadline(time.Time{})

	if _, err := a.Write([]byte("last")); err != nil {
		t.Fatal(err)
	}
	a.CloseWrite()
	buf := make([]byte, 16)
	if n, err := b.Read(buf); err != nil || string(buf[:n]) != "last" {
		t.Fatalf("read %q, %v; want \"last\"", buf[:n], err)
	}
	if n, err := b.Read(buf); n != 0 || err != io.EOF {
		t.Fatalf("read at the end: %d, %v; want 0, io.EOF", n, err)
	}

	b.Close()
	if _, err := b.Read(buf); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("read after Close: %v, want net.ErrClosed", err)
	}
	if _, err := b.Write(buf); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("write after Close: %v, want net.ErrClosed", err)
	}
	var werr error
	for range 100 { // the first write may land before the kernel sees the close
		if _, werr = a.Write(buf); werr != nil {
			break
		}
	}
	var op *net.OpError
	var errno syscall.Errno
	if !errors.As(werr, &op) || op.Op != "write" || !errors.As(werr, &errno) {
		t.Fatalf("write to a closed peer: %#v, want a *net.OpError with the errno", werr)
	}
	if errno != syscall.EPIPE && errno != syscall.ECONNRESET {
		t.Fatalf("write to a closed peer: errno %v, want EPIPE or ECONNRESET", errno)
	}
}

// A Read or Write of a ready socket allocates nothing (the function that
// RawConn calls back is bound once).
// TryWrite takes what fits in the socket's buffer and returns at once,
// with 0 once it is full; the bytes arrive in order and whole, and
// TryWrite allocates nothing.
func TestSocketConnTryWrite(t *testing.T) {
	a, b := socketPair(t)
	a.Conn.(*net.UnixConn).SetWriteBuffer(8 << 10)
	b.Conn.(*net.UnixConn).SetReadBuffer(8 << 10)
	var sent []byte
	chunk := make([]byte, 3000)
	full := false
	for i := 0; i < 1000 && !full; i++ {
		for j := range chunk {
			chunk[j] = byte(len(sent) + j)
		}
		done := make(chan struct{})
		var n int
		var err error
		go func() { n, err = a.TryWrite(chunk); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("TryWrite waited on a full socket")
		}
		if err != nil {
			t.Fatal(err)
		}
		sent = append(sent, chunk[:n]...)
		full = n < len(chunk)
	}
	if !full {
		t.Fatalf("TryWrite took %d bytes into a socket with an 8 KiB buffer and never came up short", len(sent))
	}
	if n, err := a.TryWrite(chunk); err != nil || n != 0 {
		t.Fatalf("TryWrite on a full socket = %d, %v; want 0, nil", n, err)
	}
	got := make([]byte, len(sent))
	if _, err := io.ReadFull(b, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, sent) {
		t.Fatal("the bytes read differ from those TryWrite reported written")
	}
	if allocs := testing.AllocsPerRun(100, func() {
		if n, err := a.TryWrite(chunk[:64]); n != 64 || err != nil {
			t.Fatalf("TryWrite of 64 bytes into a drained socket = %d, %v", n, err)
		}
		if _, err := io.ReadFull(b, got[:64]); err != nil {
			t.Fatal(err)
		}
	}); allocs != 0 {
		t.Fatalf("%v allocations per TryWrite and read, want 0", allocs)
	}
	b.Close()
	if _, err := a.TryWrite(chunk); err == nil {
		// The first write after the peer closes may still succeed.
		if _, err = a.TryWrite(chunk); err == nil {
			t.Fatal("TryWrite to a closed peer reported no error")
		}
	}
}

func TestSocketConnAllocations(t *testing.T) {
	a, b := socketPair(t)
	msg, buf := make([]byte, 64), make([]byte, 64)
	allocs := testing.AllocsPerRun(200, func() {
		if _, err := a.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(b, buf); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per write and read, want 0", allocs)
	}
}
