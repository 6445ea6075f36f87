package bytestream_test

import (
	"context"
	"io"
	"runtime"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/bytestream"
	"github.com/captp-go/captp/core/flow"
)

// The Writer keeps its calls in flight without a goroutine each (go-capnp's
// SendStreamCall starts one per call to wait for its Return): with a
// stalled receiver and a full window of calls in flight, the process has
// only a few more goroutines than before the stream.
func TestWriterNoGoroutinePerCall(t *testing.T) {
	const (
		window = 1 << 20
		chunk  = 32 << 10 // 32 calls fill the window
	)
	lim := core.Limits{Flow: flow.Config{Mode: flow.Fixed, Window: window}}
	g := &gate{open: make(chan struct{})}
	bs, _, _ := serve(t, bytestream.NewServer(g, nil), lim)
	if err := bs.Resolve(t.Context()); err != nil {
		t.Fatal(err)
	}
	objLim := core.FlowLimiterOf(capnp.Client(bs))
	before := runtime.NumGoroutine()
	done := make(chan error, 1)
	go func() {
		w := bytestream.NewWriter(t.Context(), bs, &bytestream.WriterOptions{ChunkSize: chunk})
		buf := make([]byte, chunk)
		for range 2 * window / chunk {
			if _, err := w.Write(buf); err != nil {
				done <- err
				return
			}
		}
		done <- w.Close()
	}()
	for st := objLim.Stats(); st.Waits == 0 || st.InFlight+chunk <= window; st = objLim.Stats() {
		time.Sleep(time.Millisecond)
	}
	during := runtime.NumGoroutine()
	close(g.open)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// The sender, and go-capnp's server goroutine handling the stalled
	// write; not one per call in flight.
	if extra := during - before; extra > 4 {
		t.Errorf("%d goroutines more while %d calls were in flight; want a few, not one per call", extra, window/chunk)
	}
}

// Close releases every call, whether the stream succeeded or failed: no
// question is left on the connection and no answer on the server.
func TestCloseLeavesNoCalls(t *testing.T) {
	for _, tc := range []struct {
		name string
		w    io.Writer
		fail bool
	}{
		{"ok", io.Discard, false},
		{"failed", &failingWriter{limit: 256 << 10}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bs, client, server := serve(t, bytestream.NewServer(tc.w, nil), core.Limits{})
			if err := bs.Resolve(t.Context()); err != nil {
				t.Fatal(err)
			}
			w := bytestream.NewWriter(t.Context(), bs, &bytestream.WriterOptions{ChunkSize: 16 << 10})
			buf := make([]byte, 16<<10)
			for range 64 {
				if _, err := w.Write(buf); err != nil {
					break
				}
			}
			if err := w.Close(); (err != nil) != tc.fail {
				t.Fatalf("Close: %v; want an error: %v", err, tc.fail)
			}
			ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
			defer cancel()
			for client.Stats().Questions > 0 || server.Stats().Answers > 0 {
				if ctx.Err() != nil {
					t.Fatalf("after Close: client %v, server %v; want no questions and no answers", client.Stats(), server.Stats())
				}
				time.Sleep(time.Millisecond)
			}
		})
	}
}
