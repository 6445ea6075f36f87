package bytestream_test

import (
	"bytes"
	"context"
	"net"
	"testing"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/rpc"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/bytestream"
)

// Streaming calls between captp and go-capnp's rpc package, both ways:
// the `-> stream` method is an ordinary call on the wire, acknowledged by
// an empty Return.

func TestInteropCaptpClientGoCapnpServer(t *testing.T) {
	var sink syncBuffer
	a, b := net.Pipe()
	server := rpc.NewConn(rpc.NewStreamTransport(b), &rpc.Options{
		BootstrapClient: capnp.Client(bytestream.NewServer(&sink, nil)),
	})
	defer server.Close()
	client := core.NewConn(a, nil)
	defer client.Close()

	bs := bytestream.ByteStream(client.Bootstrap(t.Context()))
	defer bs.Release()
	data := randomBytes(4<<20 + 3)
	w := bytestream.NewWriter(t.Context(), bs, &bytestream.WriterOptions{ChunkSize: 64 << 10})
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(sink.Bytes(), data) {
		t.Fatalf("go-capnp server received %d bytes; want the %d sent", len(sink.Bytes()), len(data))
	}
	if st := core.FlowLimiterOf(capnp.Client(bs)).Stats(); st.Messages < 64 {
		t.Errorf("captp's limiter saw %d messages; want every write", st.Messages)
	}
}

func TestInteropGoCapnpClientCaptpServer(t *testing.T) {
	var sink syncBuffer
	a, b := net.Pipe()
	server := core.NewConn(b, &core.Options{
		BootstrapClient: capnp.Client(bytestream.NewServer(&sink, nil)),
	})
	defer server.Close()
	client := rpc.NewConn(rpc.NewStreamTransport(a), nil)
	defer client.Close()

	bs := bytestream.ByteStream(client.Bootstrap(t.Context()))
	defer bs.Release()
	data := randomBytes(4<<20 + 3)

	// The generated stream method directly, as plain capnpc-go code
	// would use it (the Writer gives go-capnp's client a limiter).
	ctx := context.Background()
	for i := 0; i < 4; i++ {
		part := data[i<<10 : (i+1)<<10]
		if err := bs.Write(ctx, func(p bytestream.ByteStream_write_Params) error { return p.SetBytes(part) }); err != nil {
			t.Fatal(err)
		}
	}
	if err := bs.WaitStreaming(); err != nil {
		t.Fatal(err)
	}
	w := bytestream.NewWriter(ctx, bs, &bytestream.WriterOptions{ChunkSize: 64 << 10})
	if _, err := w.Write(data[4<<10:]); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(sink.Bytes(), data) {
		t.Fatalf("captp server received %d bytes; want the %d sent", len(sink.Bytes()), len(data))
	}
}

// A failed write on a captp server reaches a go-capnp client's later
// stream calls.
func TestInteropErrorToGoCapnpClient(t *testing.T) {
	fw := &failingWriter{limit: 256 << 10}
	a, b := net.Pipe()
	server := core.NewConn(b, &core.Options{BootstrapClient: capnp.Client(bytestream.NewServer(fw, nil))})
	defer server.Close()
	client := rpc.NewConn(rpc.NewStreamTransport(a), nil)
	defer client.Close()
	bs := bytestream.ByteStream(client.Bootstrap(t.Context()))
	defer bs.Release()

	w := bytestream.NewWriter(t.Context(), bs, &bytestream.WriterOptions{ChunkSize: 64 << 10})
	_, werr := w.Write(make([]byte, 8<<20))
	cerr := w.Close()
	for _, err := range []error{werr, cerr} {
		if err == nil || !bytes.Contains([]byte(err.Error()), []byte(errDiskFull.Error())) {
			t.Errorf("got %v; want the server's %q", err, errDiskFull)
		}
	}
}
