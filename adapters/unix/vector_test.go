package unix

import (
	"bytes"
	"crypto/tls"
	"io"
	"math/rand/v2"
	"net"
	"runtime"
	"testing"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
	"github.com/captp-go/captp/internal/testsock"
)

// A socket can write without waiting (core.TryWriter) on Linux, with or
// without timeouts (they concern reads only), which lets the core's read
// loop send Returns while it still has calls to serve; through TLS or over
// net.Pipe it cannot.
func TestWrappedConnTryWriter(t *testing.T) {
	a, b := testsock.Pair(t)
	defer a.Close()
	defer b.Close()
	p, q := net.Pipe()
	defer p.Close()
	defer q.Close()
	for _, tc := range []struct {
		name string
		c    net.Conn
		cf   config
		want bool
	}{
		{"Unix socket", a, config{}, runtime.GOOS == "linux"}, // socketConn is Linux's
		{"Unix socket with a frame timeout", a, config{frameTimeout: 1}, runtime.GOOS == "linux"},
		{"Unix socket with an idle timeout", a, config{idleTimeout: 1}, runtime.GOOS == "linux"},
		{"TLS over a Unix socket", tls.Client(a, &tls.Config{InsecureSkipVerify: true}), config{}, false},
		{"net.Pipe", p, config{}, false},
	} {
		c := tc.cf.wrap(tc.c)
		tw, got := c.(core.TryWriter)
		if got != tc.want {
			t.Errorf("%s: wrap(%+v) = %T: core.TryWriter %v, want %v", tc.name, tc.cf, c, got, tc.want)
		}
		if !got || tc.c != a {
			continue
		}
		// What TryWrite takes reaches the peer.
		msg := []byte(tc.name)
		if n, err := tw.TryWrite(msg); n != len(msg) || err != nil {
			t.Fatalf("%s: TryWrite = %d, %v; want %d, nil", tc.name, n, err, len(msg))
		}
		got2 := make([]byte, len(msg))
		if _, err := io.ReadFull(b, got2); err != nil || !bytes.Equal(got2, msg) {
			t.Fatalf("%s: peer read %q, %v; want %q", tc.name, got2, err, msg)
		}
	}
}

// The adapter's sockets offer the core writev and half-close, with or
// without timeouts.
func TestWrappedConnInterfaces(t *testing.T) {
	a, b := testsock.Pair(t)
	defer a.Close()
	defer b.Close()
	for _, cf := range []config{{}, {frameTimeout: 1}} {
		c := cf.wrap(a)
		if _, ok := c.(core.BuffersWriter); !ok {
			t.Errorf("wrap(%+v) = %T: no core.BuffersWriter", cf, c)
		}
		if _, ok := c.(interface{ CloseWrite() error }); !ok {
			t.Errorf("wrap(%+v) = %T: no CloseWrite", cf, c)
		}
	}
}

// Large messages go out as vectors of the output buffer and the message's
// own segments: echo payloads around the large-frame threshold and well
// above it, several in flight, and check every byte.
func TestNewConnLargeMessages(t *testing.T) {
	verifyNoLeaks(t)
	ctx := testCtx(t)
	a, b := testsock.Pair(t)
	server := NewConn(b, &core.Options{BootstrapClient: capnp.Client(testimpl.New("server", nil).Client())})
	client := NewConn(a, nil)
	defer func() {
		closeConn(t, client)
		<-server.Done() // the client's close ends it
	}()
	boot := testcapnp.Test(client.Bootstrap(ctx))
	defer boot.Release()

	sizes := []int{16, 64<<10 - 100, 64 << 10, 256<<10 + 3, 1 << 20, 3<<20 + 5}
	type call struct {
		want []byte
		f    testcapnp.Test_echo_Results_Future
		rel  capnp.ReleaseFunc
	}
	var calls []call
	for _, n := range sizes {
		data := make([]byte, n)
		for i := range data {
			data[i] = byte(rand.IntN(256))
		}
		f, rel := boot.Echo(ctx, func(p testcapnp.Test_echo_Params) error { return p.SetData(data) })
		calls = append(calls, call{data, f, rel})
	}
	for _, c := range calls {
		res, err := c.f.Struct()
		if err != nil {
			t.Fatalf("echo %d bytes: %v", len(c.want), err)
		}
		got, _ := res.Data()
		if !bytes.Equal(got, c.want) {
			t.Fatalf("echo of %d bytes returned %d bytes that differ", len(c.want), len(got))
		}
		c.rel()
	}
}
