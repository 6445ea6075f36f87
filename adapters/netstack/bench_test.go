package netstack

import (
	"context"
	"fmt"
	"io"
	"testing"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/bytestream"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// benchPair returns a client connection to a vat serving boot on another
// stack of a network with the given MTU; cleanup closes everything.
func benchPair(b *testing.B, mtu uint32, boot capnp.Client) *core.Conn {
	network := NewNetwork(&NetworkOptions{MTU: mtu})
	b.Cleanup(func() { network.Close() })
	server, err := network.NewStack(Config{})
	if err != nil {
		b.Fatal(err)
	}
	client, err := network.NewStack(Config{})
	if err != nil {
		b.Fatal(err)
	}
	lis, err := server.Listen("*:4000")
	if err != nil {
		b.Fatal(err)
	}
	go Serve(context.Background(), lis, &core.Options{BootstrapClient: boot})
	conn, err := client.Dial(context.Background(), server.Addr().String()+":4000", nil)
	if err != nil {
		b.Fatal(err)
	}
	return conn
}

// BenchmarkByteStream measures bulk throughput through a ByteStream
// between two vats of a Network, by link MTU.
func BenchmarkByteStream(b *testing.B) {
	for _, mtu := range []uint32{1500, 9000, 65535} {
		b.Run(fmt.Sprintf("mtu=%d", mtu), func(b *testing.B) {
			conn := benchPair(b, mtu, capnp.Client(bytestream.NewServer(io.Discard, nil)))
			ctx := context.Background()
			bs := bytestream.ByteStream(conn.Bootstrap(ctx))
			w := bytestream.NewWriter(ctx, bs, nil)
			bs.Release()
			block := make([]byte, 1<<20)
			b.SetBytes(int64(len(block)))
			for b.Loop() {
				if _, err := w.Write(block); err != nil {
					b.Fatal(err)
				}
			}
			if err := w.Close(); err != nil {
				b.Fatal(err)
			}
		})
	}
}

// BenchmarkEcho measures sequential round trips of a small call between
// two vats of a Network.
func BenchmarkEcho(b *testing.B) {
	conn := benchPair(b, DefaultNetworkMTU, capnp.Client(testimpl.New("echo", nil).Client()))
	ctx := context.Background()
	c := testcapnp.Test(conn.Bootstrap(ctx))
	defer c.Release()
	data := []byte("ping")
	for b.Loop() {
		f, release := c.Echo(ctx, func(p testcapnp.Test_echo_Params) error { return p.SetData(data) })
		if _, err := f.Struct(); err != nil {
			b.Fatal(err)
		}
		release()
	}
}
