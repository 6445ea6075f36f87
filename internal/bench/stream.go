package bench

import (
	"context"
	"errors"
	"fmt"
	"net"
	"runtime"
	"runtime/metrics"
	"slices"
	"sync/atomic"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/bytestream"
)

// The streaming workload: Counts.StreamBytes sent one way over a Unix
// socket in one process, in chunks of Counts.StreamChunk bytes, and
// discarded by the receiver.
//
//   - raw: the floor; plain Writes of a chunk each, read into a
//     chunk-sized buffer and dropped.
//   - captp: a bytestream.Writer on a ByteStream capability whose server
//     writes to io.Discard, both ends adapters/unix.NewConn with default options
//     (adaptive flow control).
//
// Alongside MB/s it reports the process's peak heap growth during the run
// (both sides: they share the process) and, for captp, the peak bytes in
// flight the flow limiter allowed, which is what the receiver held.

// streamRun is what one streaming run measured.
type streamRun struct {
	elapsed  time.Duration
	heapPeak int64  // peak heap object bytes above the start
	alloc    uint64 // bytes allocated during the run
	inFlight int    // captp: peak bytes in flight
}

// heapSampler records the peak of the heap's live object bytes, read
// every millisecond (runtime/metrics reads do not stop the world).
type heapSampler struct {
	peak atomic.Int64
	stop chan struct{}
	done chan struct{}
}

const heapObjects = "/memory/classes/heap/objects:bytes"

func heapNow() int64 {
	s := []metrics.Sample{{Name: heapObjects}}
	metrics.Read(s)
	return int64(s[0].Value.Uint64())
}

func startHeapSampler() *heapSampler {
	h := &heapSampler{stop: make(chan struct{}), done: make(chan struct{})}
	h.peak.Store(heapNow())
	go func() {
		defer close(h.done)
		t := time.NewTicker(time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-h.stop:
				return
			case <-t.C:
				if v := heapNow(); v > h.peak.Load() {
					h.peak.Store(v)
				}
			}
		}
	}()
	return h
}

func (h *heapSampler) finish() int64 {
	close(h.stop)
	<-h.done
	return h.peak.Load()
}

// measureStream runs fn under the heap sampler and allocation counter.
func measureStream(fn func() (int, error)) (streamRun, error) {
	runtime.GC()
	base := heapNow()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	alloc0 := ms.TotalAlloc
	h := startHeapSampler()
	start := time.Now()
	inFlight, err := fn()
	r := streamRun{elapsed: time.Since(start), inFlight: inFlight}
	r.heapPeak = h.finish() - base
	runtime.ReadMemStats(&ms)
	r.alloc = ms.TotalAlloc - alloc0
	return r, err
}

// unixPair is a pairFunc for Unix sockets.
func unixPair(ctx context.Context) (client, server net.Conn, cleanup func(), err error) {
	return connPair(ctx, Unix)
}

// rawStream sends total bytes over a fresh Unix socket pair.
func rawStream(ctx context.Context, total int64, chunk int) (streamRun, error) {
	return rawStreamOver(ctx, unixPair, total, chunk)
}

// rawStreamOver sends total bytes over a fresh connection from pair.
func rawStreamOver(ctx context.Context, pair pairFunc, total int64, chunk int) (streamRun, error) {
	cli, srv, clean, err := pair(ctx)
	if err != nil {
		return streamRun{}, err
	}
	defer clean()
	defer cli.Close()
	defer srv.Close()
	return measureStream(func() (int, error) {
		got := make(chan error, 1)
		go func() {
			buf := make([]byte, chunk)
			var n int64
			for n < total {
				k, err := srv.Read(buf)
				n += int64(k)
				if err != nil {
					got <- fmt.Errorf("raw stream: read after %d bytes: %w", n, err)
					return
				}
			}
			got <- nil
		}()
		out := payload(chunk)
		for sent := int64(0); sent < total; sent += int64(chunk) {
			if _, err := cli.Write(out[:min(int64(chunk), total-sent)]); err != nil {
				return 0, err
			}
			if ctx.Err() != nil {
				return 0, ctx.Err()
			}
		}
		return 0, <-got
	})
}

// countWriter counts bytes and drops them.
type countWriter struct{ n atomic.Int64 }

func (c *countWriter) Write(p []byte) (int, error) { c.n.Add(int64(len(p))); return len(p), nil }

// captpStream sends total bytes through a ByteStream over a fresh Unix
// socket pair.
func captpStream(ctx context.Context, total int64, chunk int) (streamRun, error) {
	return captpStreamOver(ctx, unixPair, total, chunk)
}

// captpStreamOver sends total bytes through a ByteStream over a fresh
// connection from pair.
func captpStreamOver(ctx context.Context, pair pairFunc, total int64, chunk int) (streamRun, error) {
	return captpStreamWith(ctx, pair, total, chunk, core.Limits{})
}

func captpStreamWith(ctx context.Context, pair pairFunc, total int64, chunk int, lim core.Limits) (streamRun, error) {
	cli, srv, clean, err := pair(ctx)
	if err != nil {
		return streamRun{}, err
	}
	defer clean()
	var sink countWriter
	server := newCaptpConn(srv, &core.Options{BootstrapClient: capnp.Client(bytestream.NewServer(&sink, nil)), Limits: lim})
	defer server.Close()
	client := newCaptpConn(cli, &core.Options{Limits: lim})
	defer client.Close()
	bs := bytestream.ByteStream(client.Bootstrap(ctx))
	defer bs.Release()
	if err := bs.Resolve(ctx); err != nil {
		return streamRun{}, fmt.Errorf("bootstrapping the ByteStream: %w", err)
	}
	r, err := measureStream(func() (int, error) {
		w := bytestream.NewWriter(ctx, bs, &bytestream.WriterOptions{ChunkSize: chunk})
		out := payload(chunk)
		for sent := int64(0); sent < total; sent += int64(chunk) {
			if _, err := w.Write(out[:min(int64(chunk), total-sent)]); err != nil {
				w.Close()
				return 0, err
			}
		}
		if err := w.Close(); err != nil {
			return 0, err
		}
		lim := core.FlowLimiterOf(capnp.Client(bs))
		if lim == nil {
			return 0, errors.New("the ByteStream has no flow limiter")
		}
		return lim.Stats().PeakInFlight, nil
	})
	if err == nil && sink.n.Load() != total {
		err = fmt.Errorf("receiver got %d bytes; want %d", sink.n.Load(), total)
	}
	return r, err
}

// runStreams runs the streaming workload Counts.Reps times for raw and
// captp, alternating, and records it under the Unix transport.
func runStreams(ctx context.Context, cfg *Config, rep *Report, impls []Impl) {
	c := cfg.Counts
	run := map[Impl]func(context.Context, int64, int) (streamRun, error){Raw: rawStream, Captp: captpStream}
	failed := map[Impl]bool{}
	for r := 0; r < c.Reps; r++ {
		for _, im := range []Impl{Raw, Captp} {
			if failed[im] || !slices.Contains(impls, im) {
				continue
			}
			cfg.progress("stream/%s: %d bytes, run %d of %d", im, c.StreamBytes, r+1, c.Reps)
			res, err := run[im](ctx, c.StreamBytes, c.StreamChunk)
			if err != nil {
				failed[im] = true
				rep.skip(im, "stream", fmt.Sprintf("run %d failed: %v", r+1, err))
				continue
			}
			rep.add(Unix, im, mStreamRate, float64(c.StreamBytes)/res.elapsed.Seconds()/1e6)
			rep.add(Unix, im, mStreamHeap, float64(res.heapPeak)/1e6)
			rep.add(Unix, im, mStreamAlloc, float64(res.alloc)/float64(c.StreamBytes))
			if im == Captp {
				rep.add(Unix, im, mStreamInFlight, float64(res.inFlight)/1e6)
			}
			if ctx.Err() != nil {
				return
			}
		}
	}
}
