package bytestream_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/bytestream"
	"github.com/captp-go/captp/core/flow"
)

// serve connects a captp client to a captp server offering bs and returns
// the client's ByteStream (the bootstrap capability, resolved, carrying
// its object's limiter) and the two connections.
func serve(t *testing.T, bs bytestream.ByteStream, lim core.Limits) (bytestream.ByteStream, *core.Conn, *core.Conn) {
	t.Helper()
	a, b := net.Pipe()
	server := core.NewConn(b, &core.Options{BootstrapClient: capnp.Client(bs), Limits: lim})
	client := core.NewConn(a, &core.Options{Limits: lim})
	t.Cleanup(func() {
		client.Close()
		server.Close()
	})
	boot := bytestream.ByteStream(client.Bootstrap(t.Context()))
	t.Cleanup(boot.Release)
	return boot, client, server
}

// randomBytes returns n reproducible pseudo-random bytes.
func randomBytes(n int) []byte {
	r := rand.New(rand.NewPCG(1, 2))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// syncBuffer is a bytes.Buffer safe to read while the server writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) Bytes() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return bytes.Clone(s.b.Bytes())
}

func TestRoundTrip(t *testing.T) {
	var sink syncBuffer
	ended := make(chan struct{})
	bs, _, _ := serve(t, bytestream.NewServer(&sink, func(context.Context) error {
		close(ended)
		return nil
	}), core.Limits{})

	data := randomBytes(3<<20 + 12345)
	w := bytestream.NewWriter(t.Context(), bs, &bytestream.WriterOptions{ChunkSize: 64 << 10})
	// Odd sizes: gathered small writes, whole chunks, and a remainder.
	for rest, i := data, 0; len(rest) > 0; i++ {
		n := min(len(rest), []int{1, 1000, 300 << 10, 64 << 10, 7}[i%5])
		if k, err := w.Write(rest[:n]); err != nil || k != n {
			t.Fatalf("Write(%d bytes) = %d, %v", n, k, err)
		}
		rest = rest[n:]
	}
	if err := w.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	select {
	case <-ended:
	default:
		t.Fatal("Close returned before the server's end ran")
	}
	if got := sink.Bytes(); !bytes.Equal(got, data) {
		t.Fatalf("received %d bytes, not the %d sent (or not in order)", len(got), len(data))
	}
	if lim := core.FlowLimiterOf(capnp.Client(bs)); lim == nil {
		t.Error("the imported ByteStream has no flow limiter")
	} else if st := lim.Stats(); st.Messages == 0 || st.InFlight != 0 {
		t.Errorf("limiter after the stream: %+v; want messages counted and none in flight", st)
	}
}

// failingWriter fails once it has accepted limit bytes.
type failingWriter struct {
	n, limit int
}

var errDiskFull = errors.New("disk full")

func (f *failingWriter) Write(p []byte) (int, error) {
	if f.n+len(p) > f.limit {
		return 0, errDiskFull
	}
	f.n += len(p)
	return len(p), nil
}

func TestWriteErrorFailsLaterCalls(t *testing.T) {
	fw := &failingWriter{limit: 1 << 20}
	endRan := false
	bs, _, _ := serve(t, bytestream.NewServer(fw, func(context.Context) error {
		endRan = true
		return nil
	}), core.Limits{})

	w := bytestream.NewWriter(t.Context(), bs, &bytestream.WriterOptions{ChunkSize: 64 << 10})
	chunk := make([]byte, 64<<10)
	var werr error
	for i := 0; i < 1000 && werr == nil; i++ {
		_, werr = w.Write(chunk)
	}
	if werr == nil || !strings.Contains(werr.Error(), errDiskFull.Error()) {
		t.Fatalf("Write after the server failed: %v; want the server's %q", werr, errDiskFull)
	}
	if _, err := w.Write(chunk); err == nil || !strings.Contains(err.Error(), errDiskFull.Error()) {
		t.Errorf("a later Write: %v; want the same error", err)
	}
	if err := w.Close(); err == nil || !strings.Contains(err.Error(), errDiskFull.Error()) {
		t.Errorf("Close: %v; want the write's error", err)
	}
	if endRan {
		t.Error("end ran on the server although a write had failed")
	}
	if fw.n != 1<<20 {
		t.Errorf("server accepted %d bytes; want exactly the %d before the failure", fw.n, 1<<20)
	}
}

// gate is a writer that blocks every write until opened.
type gate struct {
	open    chan struct{}
	mu      sync.Mutex
	entered int // writes that started
	n       int // bytes written
}

func (g *gate) Write(p []byte) (int, error) {
	g.mu.Lock()
	g.entered++
	g.mu.Unlock()
	<-g.open
	g.mu.Lock()
	g.n += len(p)
	g.mu.Unlock()
	return len(p), nil
}

func heapInUse() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse
}

// TestStalledReceiver: the receiver stops consuming; the sender blocks
// once its window is full, and what the two sides hold stays within the
// window instead of growing with what the sender tries to send.
func TestStalledReceiver(t *testing.T) {
	const (
		window = 1 << 20
		chunk  = 64 << 10
		total  = 64 << 20 // what the sender tries to send: far beyond any bound
	)
	lim := core.Limits{Flow: flow.Config{Mode: flow.Fixed, Window: window, ConnWindow: 2 * window}}
	g := &gate{open: make(chan struct{})}
	bs, client, server := serve(t, bytestream.NewServer(g, nil), lim)
	if err := bs.Resolve(t.Context()); err != nil {
		t.Fatal(err)
	}
	objLim := core.FlowLimiterOf(capnp.Client(bs))
	if objLim == nil {
		t.Fatal("no flow limiter on the imported capability")
	}

	base := heapInUse()
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	var written int64
	var mu sync.Mutex
	done := make(chan error, 1)
	go func() {
		w := bytestream.NewWriter(ctx, bs, &bytestream.WriterOptions{ChunkSize: chunk})
		buf := make([]byte, chunk)
		for i := 0; i < total/chunk; i++ {
			if _, err := w.Write(buf); err != nil {
				done <- err
				return
			}
			mu.Lock()
			written += chunk
			mu.Unlock()
		}
		done <- w.Close()
	}()

	// Wait until the sender is blocked on its window: a message waited,
	// and the window is full.
	for {
		st := objLim.Stats()
		if st.Waits > 0 && st.InFlight+chunk > window {
			break
		}
		select {
		case err := <-done:
			t.Fatalf("the sender finished (%v) although the receiver never consumed", err)
		case <-time.After(time.Millisecond):
		}
	}
	// Blocked means no progress: give the sender time to overrun, then
	// check it did not.
	time.Sleep(100 * time.Millisecond)
	mu.Lock()
	sent := written
	mu.Unlock()
	st := objLim.Stats()
	// In flight: the window, plus the one message go-capnp sends before
	// asking the limiter.
	if st.InFlight > window+2*chunk {
		t.Errorf("%d bytes in flight; bound %d (window + one message)", st.InFlight, window+2*chunk)
	}
	if sent > window+2*chunk {
		t.Errorf("Write accepted %d bytes from a stalled stream; bound %d", sent, window+2*chunk)
	}
	if fs := client.FlowStats(); fs.InFlight > 2*window {
		t.Errorf("connection in flight %d > ConnWindow %d", fs.InFlight, 2*window)
	}
	if a := server.Stats().Answers; a > window/chunk+3 {
		t.Errorf("receiver holds %d calls; the window allows %d", a, window/chunk+2)
	}
	// Both sides together (one process) hold the window's calls and a few
	// message buffers; without flow control this grows to the 64 MiB sent.
	grew := int64(heapInUse()) - int64(base)
	if bound := int64(8 * window); grew > bound {
		t.Errorf("heap grew by %d bytes while stalled; bound %d", grew, bound)
	}
	t.Logf("stalled: %d bytes accepted, %d in flight, heap +%d, receiver answers %d", sent, st.InFlight, grew, server.Stats().Answers)

	close(g.open) // the receiver resumes: everything gets through
	if err := <-done; err != nil {
		t.Fatalf("after the receiver resumed: %v", err)
	}
	if g.n != total {
		t.Errorf("receiver got %d bytes; want %d", g.n, total)
	}
	if st := objLim.Stats(); st.PeakInFlight > window+2*chunk {
		t.Errorf("peak in flight %d; bound %d", st.PeakInFlight, window+2*chunk)
	}
}

// A Writer on a capability that is not a captp import (here a local
// server) still bounds what is in flight, with a limiter of its own.
func TestLocalCapabilityIsBounded(t *testing.T) {
	g := &gate{open: make(chan struct{})}
	bs := bytestream.NewServer(g, nil)
	defer bs.Release()
	const chunk = 64 << 10
	w := bytestream.NewWriter(t.Context(), bs, &bytestream.WriterOptions{ChunkSize: chunk,
		Flow: flow.Config{Mode: flow.Fixed, Window: 4 * chunk}})
	done := make(chan int, 1)
	go func() {
		buf := make([]byte, chunk)
		n := 0
		for range 100 {
			if _, err := w.Write(buf); err != nil {
				break
			}
			n++
		}
		done <- n
	}()
	for {
		g.mu.Lock()
		entered := g.entered
		g.mu.Unlock()
		if entered > 0 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond)
	select {
	case n := <-done:
		t.Fatalf("the writer sent %d chunks to a stalled local server; want it blocked", n)
	default:
	}
	close(g.open)
	if n := <-done; n != 100 {
		t.Fatalf("wrote %d chunks; want 100", n)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestCloseTwiceAndWriteAfterClose(t *testing.T) {
	bs, _, _ := serve(t, bytestream.NewServer(io.Discard, nil), core.Limits{})
	w := bytestream.NewWriter(t.Context(), bs, nil)
	if _, err := w.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := w.Write([]byte("x")); err == nil {
		t.Error("Write after Close succeeded")
	}
}
