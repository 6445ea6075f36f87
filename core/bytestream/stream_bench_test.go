//go:build unix

package bytestream_test

import (
	"context"
	"io"
	"net"
	"os"
	"syscall"
	"testing"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/bytestream"
)

// Go benchmarks of 256 KiB chunks one way over a Unix socket pair: the raw
// socket floor and a ByteStream, for A/B comparisons with benchstat
// (`make bench` reports the 1 GiB comparison).

const benchChunk = bytestream.DefaultChunkSize

func socketPair(b *testing.B) (net.Conn, net.Conn) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		b.Fatal(err)
	}
	var conns [2]net.Conn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		conns[i], err = net.FileConn(f)
		f.Close()
		if err != nil {
			b.Fatal(err)
		}
	}
	return conns[0], conns[1]
}

func BenchmarkRawSocket256KiB(b *testing.B) {
	a, c := socketPair(b)
	defer a.Close()
	defer c.Close()
	total := int64(b.N) * benchChunk
	done := make(chan error, 1)
	go func() {
		_, err := io.CopyN(io.Discard, c, total)
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

func BenchmarkByteStream256KiB(b *testing.B) {
	a, c := socketPair(b)
	server := core.NewConn(c, &core.Options{BootstrapClient: capnp.Client(bytestream.NewServer(io.Discard, nil))})
	client := core.NewConn(a, nil)
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
