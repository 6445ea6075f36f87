//go:build unix

package bytestream_test

import (
	"context"
	"io"
	"net"
	"testing"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/bytestream"
	"github.com/captp-go/captp/core/flow"
	"github.com/captp-go/captp/internal/testsock"
)

// Go benchmarks of 256 KiB chunks one way over a Unix socket pair: the raw
// socket floor and a ByteStream, for A/B comparisons with benchstat
// (`make bench` reports the 1 GiB comparison).

const benchChunk = bytestream.DefaultChunkSize

func BenchmarkRawSocket256KiB(b *testing.B) {
	a, c := testsock.Pair(b)
	defer a.Close()
	defer c.Close()
	total := int64(b.N) * benchChunk
	done := make(chan error, 1)
	go func() {
		// Read into a chunk-sized buffer, as make bench's raw floor does.
		buf := make([]byte, benchChunk)
		var err error
		for n, k := int64(0), 0; n < total && err == nil; n += int64(k) {
			k, err = c.Read(buf)
		}
		done <- err
	}()
	buf := make([]byte, benchChunk)
	b.SetBytes(benchChunk)
	b.ResetTimer()
	for range b.N {
		if _, err := a.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	if err := <-done; err != nil {
		b.Fatal(err)
	}
}

func BenchmarkByteStream256KiB(b *testing.B) { benchByteStream(b, flow.Config{}) }

// With a fixed 8 MiB window, for comparison with the adaptive default.
func BenchmarkByteStream256KiBFixed8MiB(b *testing.B) {
	benchByteStream(b, flow.Config{Mode: flow.Fixed, Window: 8 << 20})
}

func benchByteStream(b *testing.B, fc flow.Config) {
	a, c := testsock.Pair(b)
	server := core.NewConn(vectorConn{c}, &core.Options{BootstrapClient: capnp.Client(bytestream.NewServer(io.Discard, nil))})
	client := core.NewConn(vectorConn{a}, &core.Options{Limits: core.Limits{Flow: fc}})
	defer func() {
		client.Close()
		server.Close()
		<-client.Done()
		<-server.Done()
	}()
	ctx := context.Background()
	bs := bytestream.ByteStream(client.Bootstrap(ctx))
	w := bytestream.NewWriter(ctx, bs, nil)
	bs.Release()
	buf := make([]byte, benchChunk)
	b.SetBytes(benchChunk)
	b.ResetTimer()
	for range b.N {
		if _, err := w.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		b.Fatal(err)
	}
}

// vectorConn gives a socket the core's optional BuffersWriter, as the
// adapters do.
type vectorConn struct{ net.Conn }

func (v vectorConn) WriteBuffers(bufs [][]byte) (int64, error) {
	nb := net.Buffers(bufs)
	return nb.WriteTo(v.Conn)
}
