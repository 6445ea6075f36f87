package bytestream_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"strings"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/bytestream"
)

// A vat offers a ByteStream that feeds an io.Pipe; the other vat copies a
// reader into it. The writer keeps several write calls in flight within
// the connection's flow-control window; Close returns once the receiver
// has handled every byte.
func ExampleNewWriter() {
	ctx := context.Background()
	clientSide, serverSide := net.Pipe() // any byte stream: a socket, a serial line

	// Receiving vat: the stream's bytes come out of pr.
	pr, pw := io.Pipe()
	sink := bytestream.NewServer(pw, func(context.Context) error { return pw.Close() })
	server := core.NewConn(serverSide, &core.Options{BootstrapClient: capnp.Client(sink)})
	defer server.Close()
	received := make(chan string)
	go func() {
		b, _ := io.ReadAll(pr)
		received <- string(b)
	}()

	// Sending vat.
	client := core.NewConn(clientSide, nil)
	defer client.Close()
	stream := bytestream.ByteStream(client.Bootstrap(ctx))
	w := bytestream.NewWriter(ctx, stream, nil)
	stream.Release() // the Writer holds its own reference
	if _, err := io.Copy(w, strings.NewReader("hello, streaming world")); err != nil {
		fmt.Println("copy:", err)
	}
	if err := w.Close(); err != nil {
		fmt.Println("close:", err)
	}
	fmt.Println(<-received)
	// Output: hello, streaming world
}
