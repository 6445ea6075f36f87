package netcap_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/adapters/netcap"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/flow"
)

// countingBackend is the kernel's network, counting what it is asked.
type countingBackend struct {
	netcap.KernelBackend
	dials, listens, lookups atomic.Int64
	lookup                  func(host string) ([]netip.Addr, error) // nil: the kernel's resolver
	// hang, if set, makes Dial wait for its context and send the
	// context's error on hang.
	hang chan error
}

func (b *countingBackend) Dial(ctx context.Context, network string, addr netip.AddrPort) (net.Conn, error) {
	b.dials.Add(1)
	if b.hang != nil {
		<-ctx.Done()
		b.hang <- ctx.Err()
		return nil, ctx.Err()
	}
	return b.KernelBackend.Dial(ctx, network, addr)
}

func (b *countingBackend) Listen(ctx context.Context, network string, addr netip.AddrPort) (net.Listener, error) {
	b.listens.Add(1)
	return b.KernelBackend.Listen(ctx, network, addr)
}

func (b *countingBackend) LookupHost(ctx context.Context, network, host string) ([]netip.Addr, error) {
	b.lookups.Add(1)
	if b.lookup != nil {
		return b.lookup(host)
	}
	return b.KernelBackend.LookupHost(ctx, network, host)
}

// env is a host offering a Network to a guest over a captp connection.
type env struct {
	srv     *netcap.Server
	backend *countingBackend
	net     netcap.Network // the guest's import
	guest   *core.Conn
	host    *core.Conn
}

// newEnv connects a guest to a host whose Network follows the rules.
func newEnv(t *testing.T, p *netcap.Policy, hostLimits core.Limits) *env {
	t.Helper()
	return newEnvOptions(t, p, hostLimits, nil)
}

// newEnvOptions is newEnv with the Server's options.
func newEnvOptions(t *testing.T, p *netcap.Policy, hostLimits core.Limits, opts *netcap.Options) *env {
	t.Helper()
	e := &env{backend: &countingBackend{}}
	var network netcap.Network
	e.srv, network = netcap.NewServer(p, e.backend, opts)
	a, b := net.Pipe()
	e.host = core.NewConn(b, &core.Options{BootstrapClient: capnp.Client(network), Limits: hostLimits})
	e.guest = core.NewConn(a, nil)
	e.net = netcap.Network(e.guest.Bootstrap(t.Context()))
	t.Cleanup(func() {
		e.net.Release()
		e.guest.Close()
		e.host.Close()
		e.srv.Close()
	})
	return e
}

func policy(t *testing.T, connect, listen []string) *netcap.Policy {
	t.Helper()
	p := &netcap.Policy{}
	for _, r := range connect {
		if err := p.Connect.Set(r); err != nil {
			t.Fatal(err)
		}
	}
	for _, r := range listen {
		if err := p.Listen.Set(r); err != nil {
			t.Fatal(err)
		}
	}
	return p
}

// remote is a TCP server outside the guest's reach unless allowed.
type remote struct {
	lis      net.Listener
	accepted atomic.Int64
	conns    chan net.Conn
	wg       sync.WaitGroup
}

// newRemote listens on loopback; handle (nil: keep the connection for
// the test, on r.conns) serves each connection.
func newRemote(t *testing.T, handle func(net.Conn)) *remote {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &remote{lis: lis, conns: make(chan net.Conn, 16)}
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			r.accepted.Add(1)
			if handle == nil {
				r.conns <- c
				continue
			}
			r.wg.Add(1)
			go func() {
				defer r.wg.Done()
				defer c.Close()
				handle(c)
			}()
		}
	}()
	t.Cleanup(func() {
		lis.Close()
		r.wg.Wait()
		close(r.conns)
		for c := range r.conns {
			c.Close()
		}
	})
	return r
}

func (r *remote) port() int { return r.lis.Addr().(*net.TCPAddr).Port }
func (r *remote) addr() string {
	return r.lis.Addr().String()
}

// echo copies what it reads back, then half-closes.
func echo(c net.Conn) {
	io.Copy(c, c)
	c.(*net.TCPConn).CloseWrite()
}

func randomBytes(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 2))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// waitFor polls cond (test helper only) until it holds or 5s pass.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestConnectEcho(t *testing.T) {
	r := newRemote(t, echo)
	e := newEnv(t, policy(t, []string{"tcp:127.0.0.1:" + strconv.Itoa(r.port())}, nil), core.Limits{})
	c, err := netcap.Dial(t.Context(), e.net, "tcp", r.addr())
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	defer c.Close()
	if got := c.RemoteAddr().String(); got != r.addr() {
		t.Errorf("RemoteAddr = %s, want %s", got, r.addr())
	}
	data := randomBytes(3<<20+17, 1)
	werr := make(chan error, 1)
	go func() {
		for rest := data; len(rest) > 0; {
			n := min(len(rest), 100<<10+3)
			if _, err := c.Write(rest[:n]); err != nil {
				werr <- err
				return
			}
			rest = rest[n:]
		}
		werr <- c.(interface{ CloseWrite() error }).CloseWrite()
	}()
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("ReadAll: %v", err)
	}
	if err := <-werr; err != nil {
		t.Fatalf("write: %v", err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("echoed %d bytes, want the %d sent", len(got), len(data))
	}
	// Both directions ended: the host closes the socket by itself.
	waitFor(t, "the host to close the finished stream", func() bool { return e.srv.Stats().Streams == 0 })
	if err := c.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
}

func TestDenied(t *testing.T) {
	allowed := newRemote(t, echo)
	other := newRemote(t, echo)
	e := newEnv(t, policy(t, []string{"tcp:127.0.0.1:" + strconv.Itoa(allowed.port()), "tcp:10.0.0.0/8:" + strconv.Itoa(other.port())}, nil), core.Limits{})
	e.backend.lookup = func(host string) ([]netip.Addr, error) {
		if host == "rebind.test" {
			return []netip.Addr{netip.MustParseAddr("127.0.0.1")}, nil
		}
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	for _, tc := range []struct {
		addr    string
		lookups int64 // name resolutions the request may cause
	}{
		{"127.0.0.1:" + strconv.Itoa(other.port()), 0},            // port not allowed
		{"127.0.0.2:" + strconv.Itoa(allowed.port()), 0},          // address not allowed
		{"[::1]:" + strconv.Itoa(allowed.port()), 0},              // family
		{"rebind.test:" + strconv.Itoa(other.port()), 1},          // the name resolves outside 10/8
		{"unknown.test:" + strconv.Itoa(allowed.port()+1), 0},     // no rule allows the port: not even resolved
		{"[::ffff:127.0.0.2]:" + strconv.Itoa(allowed.port()), 0}, // v4-mapped is not a way around
	} {
		before := e.backend.lookups.Load()
		_, err := netcap.Dial(t.Context(), e.net, "tcp", tc.addr)
		if !errors.Is(err, netcap.ErrDenied) {
			t.Errorf("Dial(%s) = %v, want ErrDenied", tc.addr, err)
		}
		var ne *netcap.Error
		if !errors.As(err, &ne) || ne.Kind != netcap.KindDenied {
			t.Errorf("Dial(%s): no *netcap.Error of kind denied in %v", tc.addr, err)
		}
		if n := e.backend.lookups.Load() - before; n != tc.lookups {
			t.Errorf("Dial(%s): %d name lookups, want %d", tc.addr, n, tc.lookups)
		}
	}
	if n := e.backend.dials.Load(); n != 0 {
		t.Errorf("denied requests dialed %d times", n)
	}
	if n := allowed.accepted.Load() + other.accepted.Load(); n != 0 {
		t.Errorf("denied requests reached a server %d times", n)
	}
	if st := e.srv.Stats(); st.Denied != 6 || st.Streams != 0 {
		t.Errorf("stats %+v, want 6 denied and no stream", st)
	}

	// Listening is denied by default.
	if _, err := netcap.Listen(t.Context(), e.net, "tcp", "127.0.0.1:0"); !errors.Is(err, netcap.ErrDenied) {
		t.Errorf("Listen without a listen rule = %v, want ErrDenied", err)
	}
	if n := e.backend.listens.Load(); n != 0 {
		t.Errorf("denied listens reached the backend %d times", n)
	}

	// An unknown name whose port is allowed is resolved, and unreachable.
	if _, err := netcap.Dial(t.Context(), e.net, "tcp", "unknown.test:"+strconv.Itoa(allowed.port())); !errors.Is(err, netcap.ErrUnreachable) {
		t.Errorf("Dial(unknown name) = %v, want ErrUnreachable", err)
	}
	// A name rule lets the name through to whatever it resolves to.
	e2 := newEnv(t, policy(t, []string{"tcp:rebind.test:" + strconv.Itoa(allowed.port())}, nil), core.Limits{})
	e2.backend.lookup = e.backend.lookup
	c, err := netcap.Dial(t.Context(), e2.net, "tcp", "REBIND.test:"+strconv.Itoa(allowed.port()))
	if err != nil {
		t.Fatalf("Dial through a name rule: %v", err)
	}
	c.Close()
}

func TestZeroPolicyDeniesEverything(t *testing.T) {
	r := newRemote(t, echo)
	e := newEnv(t, nil, core.Limits{})
	if _, err := netcap.Dial(t.Context(), e.net, "tcp", r.addr()); !errors.Is(err, netcap.ErrDenied) {
		t.Errorf("Dial = %v, want ErrDenied", err)
	}
	if _, err := netcap.Listen(t.Context(), e.net, "tcp", "127.0.0.1:0"); !errors.Is(err, netcap.ErrDenied) {
		t.Errorf("Listen = %v, want ErrDenied", err)
	}
	if r.accepted.Load() != 0 || e.backend.dials.Load() != 0 {
		t.Error("a denied request opened a socket")
	}
}

func TestRefused(t *testing.T) {
	// A port that was free a moment ago: nothing listens.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	e := newEnv(t, policy(t, []string{"tcp:127.0.0.1:*"}, nil), core.Limits{})
	if _, err := netcap.Dial(t.Context(), e.net, "tcp", addr); !errors.Is(err, netcap.ErrRefused) {
		t.Errorf("Dial(%s) = %v, want ErrRefused", addr, err)
	}
	if st := e.srv.Stats(); st.Streams != 0 {
		t.Errorf("a failed dial holds a stream: %+v", st)
	}
}

func TestInvalidAddresses(t *testing.T) {
	e := newEnv(t, policy(t, []string{"tcp:*:*"}, []string{"tcp:*:*"}), core.Limits{})
	huge := string(make([]byte, 1<<20))
	for _, tc := range []struct{ network, addr string }{
		{"tcp", ""},
		{"tcp", "127.0.0.1"},
		{"tcp", "127.0.0.1:99999"},
		{"tcp", "127.0.0.1:http"},
		{"tcp", "127.0.0.1:0"},
		{"tcp", "[fe80::1%lo]:80"},
		{"tcp4", "[::1]:80"},
		{"udp", "127.0.0.1:53"},
		{"unix", "/etc/passwd"},
		{"tcp", "bad\x00name:80"},
		{"tcp", huge},
		{huge, "127.0.0.1:80"},
	} {
		_, err := netcap.Dial(t.Context(), e.net, tc.network, tc.addr)
		if !errors.Is(err, netcap.ErrInvalidAddress) {
			t.Errorf("Dial(%.20q, %.20q) = %.200v, want ErrInvalidAddress", tc.network, tc.addr, err)
		}
	}
	for _, addr := range []string{"localhost:80", "1.2.3.4", huge} {
		if _, err := netcap.Listen(t.Context(), e.net, "tcp", addr); !errors.Is(err, netcap.ErrInvalidAddress) {
			t.Errorf("Listen(%.20q) = %.200v, want ErrInvalidAddress", addr, err)
		}
	}
	if n := e.backend.dials.Load() + e.backend.listens.Load(); n != 0 {
		t.Errorf("invalid requests reached the backend %d times", n)
	}
}

func TestListenAccept(t *testing.T) {
	e := newEnv(t, policy(t, nil, []string{"tcp:127.0.0.1:*"}), core.Limits{})
	if _, err := netcap.Listen(t.Context(), e.net, "tcp", ":0"); !errors.Is(err, netcap.ErrDenied) {
		t.Errorf("Listen on every address = %v, want ErrDenied", err)
	}
	l, err := netcap.Listen(t.Context(), e.net, "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	defer l.Close()
	if ap := l.Addr().(*net.TCPAddr).AddrPort(); ap.Port() == 0 || ap.Addr() != netip.MustParseAddr("127.0.0.1") {
		t.Fatalf("listener address %v", l.Addr())
	}
	// From outside: a client connects and talks.
	client := make(chan error, 1)
	go func() {
		c, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			client <- err
			return
		}
		defer c.Close()
		if _, err := c.Write([]byte("ping")); err != nil {
			client <- err
			return
		}
		c.(*net.TCPConn).CloseWrite()
		b, err := io.ReadAll(c)
		if err == nil && string(b) != "pong" {
			err = fmt.Errorf("client read %q", b)
		}
		client <- err
	}()
	c, err := l.Accept()
	if err != nil {
		t.Fatalf("Accept: %v", err)
	}
	b, err := io.ReadAll(c)
	if err != nil || string(b) != "ping" {
		t.Fatalf("guest read %q, %v", b, err)
	}
	if _, err := c.Write([]byte("pong")); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-client; err != nil {
		t.Fatalf("client: %v", err)
	}
}

func TestAcceptBlocksUntilCanceled(t *testing.T) {
	e := newEnv(t, policy(t, nil, []string{"tcp:127.0.0.1:*"}), core.Limits{})
	l, err := netcap.Listen(t.Context(), e.net, "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	acceptCtx := l.(interface {
		AcceptContext(context.Context) (net.Conn, error)
	})
	ctx, cancel := context.WithTimeout(t.Context(), 150*time.Millisecond)
	defer cancel()
	start := time.Now()
	c, err := acceptCtx.AcceptContext(ctx)
	if err == nil {
		c.Close()
		t.Fatal("Accept returned a connection nobody made")
	}
	if time.Since(start) < 150*time.Millisecond {
		t.Errorf("Accept returned after %v, before its context ended", time.Since(start))
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Accept = %v, want a deadline error", err)
	}

	// Close wakes a blocked Accept.
	done := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err == nil {
			c.Close()
		}
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("Accept returned early: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	l.Close()
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("Accept after Close = %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not wake Accept")
	}
	waitFor(t, "the host to close the listener", func() bool { return e.srv.Stats().Listeners == 0 })
}

// A guest that does not read holds back the remote sender: the host
// reads no more than its buffer and the flow-control window allow.
func TestStalledReaderBlocksRemoteWriter(t *testing.T) {
	const total = 64 << 20
	var written atomic.Int64
	writerDone := make(chan error, 1)
	r := newRemote(t, func(c net.Conn) {
		chunk := make([]byte, 64<<10)
		for n := 0; n < total; n += len(chunk) {
			k, err := c.Write(chunk)
			written.Add(int64(k))
			if err != nil {
				writerDone <- err
				return
			}
		}
		writerDone <- nil
	})
	window := 256 << 10
	e := newEnv(t, policy(t, []string{"tcp:127.0.0.1:" + strconv.Itoa(r.port())}, nil),
		core.Limits{Flow: flow.Config{Mode: flow.Fixed, Window: window}})
	c, err := netcap.Dial(t.Context(), e.net, "tcp", r.addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Wait until the writer stalls: no progress for 300ms.
	last := int64(-1)
	for {
		time.Sleep(300 * time.Millisecond)
		n := written.Load()
		if n == last {
			break
		}
		last = n
		if n >= total {
			t.Fatalf("the remote wrote all %d bytes to a guest that reads nothing", total)
		}
	}
	// Kernel socket buffers on both ends of loopback (a few MB) plus the
	// host's read buffer and window; far below what was offered.
	if last > 32<<20 {
		t.Errorf("the remote wrote %d bytes before stalling; want a bounded amount", last)
	}
	select {
	case err := <-writerDone:
		t.Fatalf("remote writer finished while the guest read nothing: %v", err)
	default:
	}
	t.Logf("remote writer stalled after %d bytes (window %d)", last, window)
	// Reading resumes the flow, and everything arrives.
	n, err := io.CopyN(io.Discard, c, total)
	if err != nil || n != total {
		t.Fatalf("read %d bytes, %v", n, err)
	}
	if err := <-writerDone; err != nil {
		t.Fatalf("remote writer: %v", err)
	}
}

func TestPeerCloseIsEOFAndResetIsError(t *testing.T) {
	r := newRemote(t, func(c net.Conn) {
		c.Write([]byte("bye"))
	})
	rst := newRemote(t, func(c net.Conn) {
		b := make([]byte, 1)
		c.Read(b) // wait for the guest, then reset
		c.(*net.TCPConn).SetLinger(0)
	})
	e := newEnv(t, policy(t, []string{"tcp:127.0.0.1:*"}, nil), core.Limits{})
	c, err := netcap.Dial(t.Context(), e.net, "tcp", r.addr())
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(c)
	if err != nil || string(b) != "bye" {
		t.Errorf("read %q, %v; want bye and EOF", b, err)
	}
	if n, err := c.Read(make([]byte, 10)); n != 0 || err != io.EOF {
		t.Errorf("Read after EOF = %d, %v", n, err)
	}
	c.Close()

	c, err = netcap.Dial(t.Context(), e.net, "tcp", rst.addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("x"))
	_, err = io.ReadAll(c)
	if !errors.Is(err, netcap.ErrReset) {
		t.Errorf("read from a reset connection: %v, want ErrReset", err)
	}
}

func TestDeadlines(t *testing.T) {
	r := newRemote(t, nil) // accepts and holds: never sends
	e := newEnv(t, policy(t, []string{"tcp:127.0.0.1:*"}, nil), core.Limits{})
	c, err := netcap.Dial(t.Context(), e.net, "tcp", r.addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	start := time.Now()
	_, err = c.Read(make([]byte, 10))
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Read past its deadline = %v, want os.ErrDeadlineExceeded", err)
	}
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Errorf("the read timeout is not a net.Error timeout: %v", err)
	}
	if d := time.Since(start); d < 50*time.Millisecond {
		t.Errorf("Read returned after %v", d)
	}
	// A blocked Read ends when Close is called.
	c.SetReadDeadline(time.Time{})
	readErr := make(chan error, 1)
	go func() {
		_, err := c.Read(make([]byte, 10))
		readErr <- err
	}()
	time.Sleep(50 * time.Millisecond)
	c.Close()
	if err := <-readErr; !errors.Is(err, net.ErrClosed) {
		t.Errorf("Read during Close = %v, want net.ErrClosed", err)
	}
	if _, err := c.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Write after Close = %v, want net.ErrClosed", err)
	}
	if err := c.Close(); err == nil {
		t.Error("second Close succeeded")
	}
}

// Closing the guest's connection (or dropping the Network) closes every
// socket the host opened for it.
func TestConnectionLossClosesHostSockets(t *testing.T) {
	r := newRemote(t, nil)
	e := newEnv(t, policy(t, []string{"tcp:127.0.0.1:*"}, []string{"tcp:127.0.0.1:0"}), core.Limits{})
	var conns []net.Conn
	for range 3 {
		c, err := netcap.Dial(t.Context(), e.net, "tcp", r.addr())
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	l, err := netcap.Listen(t.Context(), e.net, "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lisAddr := l.Addr().String()
	if st := e.srv.Stats(); st.Streams != 3 || st.Listeners != 1 {
		t.Fatalf("stats %+v, want 3 streams and 1 listener", st)
	}
	accepted := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err == nil {
			c.Close()
		}
		accepted <- err
	}()
	time.Sleep(50 * time.Millisecond) // the accept call is waiting on the host
	e.guest.Close()
	select {
	case err := <-accepted:
		if !errors.Is(err, netcap.ErrClosed) {
			t.Errorf("pending Accept when the connection closed = %v, want ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a pending Accept outlived its connection")
	}
	// Every remote end sees the host close its socket.
	for range 3 {
		rc := <-r.conns
		rc.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := rc.Read(make([]byte, 1)); err != io.EOF {
			t.Errorf("remote end after the guest left: %v, want EOF", err)
		}
		rc.Close()
	}
	waitFor(t, "the host to drop everything", func() bool {
		st := e.srv.Stats()
		return st.Streams == 0 && st.Listeners == 0
	})
	if c, err := net.Dial("tcp", lisAddr); err == nil {
		c.Close()
		t.Error("the guest's listener still accepts after its connection closed")
	}
	for _, c := range conns {
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Error("Read on a stream of a closed connection succeeded")
		}
		c.Close()
	}
	l.Close()
	// Calls after the connection closed get errors.
	if _, err := netcap.Dial(t.Context(), e.net, "tcp", r.addr()); !errors.Is(err, netcap.ErrClosed) {
		t.Errorf("Dial on a closed connection = %v, want ErrClosed", err)
	}
}

func TestReleasingNetworkClosesSockets(t *testing.T) {
	r := newRemote(t, nil)
	srv, n := netcap.NewServer(policy(t, []string{"tcp:127.0.0.1:*"}, nil), &netcap.KernelBackend{}, nil)
	defer srv.Close()
	c, err := netcap.Dial(t.Context(), n, "tcp", r.addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rc := <-r.conns
	defer rc.Close()
	n.Release()
	rc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := rc.Read(make([]byte, 1)); err != io.EOF {
		t.Errorf("remote end after the Network was released: %v, want EOF", err)
	}
	if st := srv.Stats(); st.Streams != 0 {
		t.Errorf("stats %+v after release", st)
	}
}

func TestLimits(t *testing.T) {
	r := newRemote(t, nil)
	p := policy(t, []string{"tcp:127.0.0.1:*"}, []string{"tcp:127.0.0.1:0"})
	p.MaxStreams, p.MaxListeners = 2, 1
	e := newEnv(t, p, core.Limits{})
	var conns []net.Conn
	for range 2 {
		c, err := netcap.Dial(t.Context(), e.net, "tcp", r.addr())
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	if _, err := netcap.Dial(t.Context(), e.net, "tcp", r.addr()); !errors.Is(err, netcap.ErrLimit) {
		t.Errorf("third Dial = %v, want ErrLimit", err)
	}
	// A denied request is still answered denied when the slots are full.
	if _, err := netcap.Dial(t.Context(), e.net, "tcp", "127.0.0.2:80"); !errors.Is(err, netcap.ErrDenied) {
		t.Errorf("denied Dial with every slot in use = %v, want ErrDenied", err)
	}
	l, err := netcap.Listen(t.Context(), e.net, "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := netcap.Listen(t.Context(), e.net, "tcp", "127.0.0.1:0"); !errors.Is(err, netcap.ErrLimit) {
		t.Errorf("second Listen = %v, want ErrLimit", err)
	}
	// Closing frees the slots.
	conns[0].Close()
	l.Close()
	waitFor(t, "slots to free", func() bool { st := e.srv.Stats(); return st.Streams == 1 && st.Listeners == 0 })
	c, err := netcap.Dial(t.Context(), e.net, "tcp", r.addr())
	if err != nil {
		t.Fatalf("Dial after a slot freed: %v", err)
	}
	c.Close()
	conns[1].Close()
	l, err = netcap.Listen(t.Context(), e.net, "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("Listen after a slot freed: %v", err)
	}
	l.Close()
}

// A single huge Write is split into calls within the window; it arrives
// whole.
func TestHugeWrite(t *testing.T) {
	got := make(chan []byte, 1)
	r := newRemote(t, func(c net.Conn) {
		b, _ := io.ReadAll(c)
		got <- b
	})
	e := newEnv(t, policy(t, []string{"tcp:127.0.0.1:*"}, nil), core.Limits{})
	c, err := netcap.Dial(t.Context(), e.net, "tcp", r.addr())
	if err != nil {
		t.Fatal(err)
	}
	data := randomBytes(16<<20, 3)
	if n, err := c.Write(data); err != nil || n != len(data) {
		t.Fatalf("Write = %d, %v", n, err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if b := <-got; !bytes.Equal(b, data) {
		t.Fatalf("remote got %d bytes, want the %d written", len(b), len(data))
	}
}

// Hand-made calls with missing or odd fields are answered with failures.
func TestMalformedCalls(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	e := newEnv(t, policy(t, []string{"tcp:127.0.0.1:*"}, []string{"tcp:127.0.0.1:*"}), core.Limits{})
	// connect without a down stream.
	f, release := e.net.Connect(t.Context(), func(p netcap.Network_connect_Params) error {
		p.SetNetwork("tcp")
		return p.SetAddress(l.Addr().String())
	})
	res, err := f.Struct()
	if err != nil {
		t.Fatalf("connect without down: %v", err)
	}
	r, _ := res.Result()
	if r.Which() != netcap.ConnectResult_Which_failure {
		t.Errorf("connect without down: %v, want a failure", r.Which())
	}
	release()
	// listen with no fields at all.
	lf, release := e.net.Listen(t.Context(), nil)
	lres, err := lf.Struct()
	if err != nil {
		t.Fatalf("empty listen: %v", err)
	}
	lr, _ := lres.Result()
	if f, _ := lr.Failure(); lr.Which() != netcap.ListenResult_Which_failure || f.Kind() != netcap.KindInvalidAddress {
		t.Errorf("empty listen: %v, want an invalidAddress failure", lr.Which())
	}
	release()
	// Calls on a closed listener.
	ls, err := netcap.Listen(t.Context(), e.net, "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ls.Close()
	if _, err := ls.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Accept after Close = %v", err)
	}
	if err := e.host.Err(); err != nil {
		t.Errorf("the host connection failed: %v", err)
	}
	// Calls after the host closed the Network are answered closed.
	e.srv.Close()
	if _, err := netcap.Dial(t.Context(), e.net, "tcp", l.Addr().String()); !errors.Is(err, netcap.ErrClosed) {
		t.Errorf("Dial after Close = %v, want ErrClosed", err)
	}
	if _, err := netcap.Listen(t.Context(), e.net, "tcp", "127.0.0.1:0"); !errors.Is(err, netcap.ErrClosed) {
		t.Errorf("Listen after Close = %v, want ErrClosed", err)
	}
}

// Canceling a Dial's context cancels the host's dial, and the host's own
// dial timeout is a typed timeout.
func TestDialCancelAndTimeout(t *testing.T) {
	e := newEnv(t, policy(t, []string{"tcp:192.0.2.0/24:80"}, nil), core.Limits{})
	e.backend.hang = make(chan error, 1)
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	_, err := netcap.Dial(ctx, e.net, "tcp", "192.0.2.1:80")
	if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, netcap.ErrTimeout) {
		t.Errorf("Dial past its context's deadline = %v", err)
	}
	select {
	case err := <-e.backend.hang:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("the host's dial ended with %v, want canceled", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("canceling the guest's Dial did not cancel the host's dial")
	}
	waitFor(t, "the slot to free", func() bool { return e.srv.Stats().Streams == 0 })

	backend := &countingBackend{hang: make(chan error, 1)}
	srv, n := netcap.NewServer(policy(t, []string{"tcp:192.0.2.0/24:80"}, nil), backend, &netcap.Options{DialTimeout: 50 * time.Millisecond})
	defer srv.Close()
	defer n.Release()
	if _, err := netcap.Dial(t.Context(), n, "tcp", "192.0.2.1:80"); !errors.Is(err, netcap.ErrTimeout) {
		t.Errorf("Dial past the host's dial timeout = %v, want ErrTimeout", err)
	}
}

// A remote that does not read holds back the guest's writes, and a write
// deadline ends the wait with a timeout.
func TestWriteDeadline(t *testing.T) {
	r := newRemote(t, nil) // never reads
	e := newEnv(t, policy(t, []string{"tcp:127.0.0.1:*"}, nil), core.Limits{})
	c, err := netcap.Dial(t.Context(), e.net, "tcp", r.addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetWriteDeadline(time.Now().Add(300 * time.Millisecond))
	chunk := make([]byte, 1<<20)
	total := 0
	for total < 1<<30 {
		n, err := c.Write(chunk)
		total += n
		if err != nil {
			if !errors.Is(err, os.ErrDeadlineExceeded) || !errors.Is(err, netcap.ErrTimeout) {
				t.Fatalf("Write = %v, want a timeout", err)
			}
			break
		}
	}
	if total >= 1<<30 {
		t.Fatal("1 GiB written to a remote that reads nothing")
	}
	t.Logf("wrote %d bytes before the deadline", total)
	// The stream is broken for writes after a timeout (as with TLS).
	if _, err := c.Write([]byte("x")); err == nil {
		t.Error("Write after a write timeout succeeded")
	}
}

// Close hands over what was written before it, even when the guest left
// the remote's bytes unread.
// Close after writing is graceful on the host even when the remote's
// bytes are unread: a reset would make the remote's kernel drop the
// guest's bytes the remote has not read yet.
func TestCloseDeliversWrittenBytes(t *testing.T) {
	got := make(chan []byte, 1)
	r := newRemote(t, func(c net.Conn) {
		go c.Write(make([]byte, 1<<20))    // the guest never reads this
		time.Sleep(300 * time.Millisecond) // the guest's bytes are still in flight at Close
		b, err := io.ReadAll(c)
		if err != nil {
			t.Errorf("remote read after %d bytes: %v, want a clean end of stream", len(b), err)
		}
		got <- b
	})
	e := newEnv(t, policy(t, []string{"tcp:127.0.0.1:*"}, nil), core.Limits{})
	c, err := netcap.Dial(t.Context(), e.net, "tcp", r.addr())
	if err != nil {
		t.Fatal(err)
	}
	data := randomBytes(16<<20, 5)
	go func() {
		if _, err := c.Write(data); err != nil {
			t.Error(err)
		}
		c.Close()
	}()
	select {
	case b := <-got:
		if !bytes.Equal(b, data) {
			t.Fatalf("remote got %d bytes, want the %d written before Close", len(b), len(data))
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the remote never saw the end of the stream")
	}
}

// lingerRemote dials a remote that keeps its end open, writes "bye" from
// the guest and closes, and checks that the remote gets "bye" and a clean
// end of stream. It returns the remote's connection and when Close began.
func lingerRemote(t *testing.T, n netcap.Network) (net.Conn, time.Time) {
	t.Helper()
	r := newRemote(t, nil)
	c, err := netcap.Dial(t.Context(), n, "tcp", r.addr())
	if err != nil {
		t.Fatal(err)
	}
	rc := <-r.conns
	t.Cleanup(func() { rc.Close() })
	if _, err := c.Write([]byte("bye")); err != nil {
		t.Fatal(err)
	}
	closed := time.Now()
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	rc.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(rc)
	if err != nil || string(b) != "bye" {
		t.Fatalf("remote read %q, %v; want \"bye\" and a clean end of stream", b, err)
	}
	return rc, closed
}

// writeUntilFails writes to the remote's end until the host's socket is
// gone (the host's kernel answers with a reset) and returns when it
// failed, or fails the test after limit.
func writeUntilFails(t *testing.T, rc net.Conn, limit time.Duration) time.Time {
	t.Helper()
	deadline := time.Now().Add(limit)
	rc.SetWriteDeadline(deadline)
	for {
		if _, err := rc.Write(make([]byte, 1024)); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("the host still read the remote's bytes after %v", limit)
			}
			return time.Now()
		}
		if time.Now().After(deadline) {
			t.Fatalf("the host still read the remote's bytes after %v", limit)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A graceful close waits for the remote's end of stream only as long as
// Options.Linger: a remote that never closes does not hold the host's
// socket.
func TestCloseLingerIsBounded(t *testing.T) {
	const linger = time.Second
	e := newEnvOptions(t, policy(t, []string{"tcp:127.0.0.1:*"}, nil), core.Limits{}, &netcap.Options{Linger: linger})
	rc, closed := lingerRemote(t, e.net)
	// The host lingers: it still reads (and discards) the remote's bytes.
	if d := time.Since(closed); d < linger/2 {
		if st := e.srv.Stats(); st.Streams != 1 {
			t.Errorf("%v after Close: stats %+v, want the stream lingering", d, st)
		}
	}
	failed := writeUntilFails(t, rc, linger+5*time.Second)
	if d := failed.Sub(closed); d < linger*9/10 {
		t.Errorf("the host closed the socket %v after Close, before the linger (%v) ended", d, linger)
	}
	waitFor(t, "the host to free the stream", func() bool { return e.srv.Stats().Streams == 0 })
}

// Releasing the Network ends a linger at once: a closing Network's
// sockets close abortively.
func TestNetworkReleaseEndsLinger(t *testing.T) {
	srv, n := netcap.NewServer(policy(t, []string{"tcp:127.0.0.1:*"}, nil), &netcap.KernelBackend{}, &netcap.Options{Linger: time.Hour})
	defer srv.Close()
	rc, _ := lingerRemote(t, n)
	if st := srv.Stats(); st.Streams != 1 {
		t.Errorf("stats %+v after Close, want the stream lingering", st)
	}
	released := time.Now()
	n.Release()
	if d := writeUntilFails(t, rc, 5*time.Second).Sub(released); d > 4*time.Second {
		t.Errorf("the socket closed %v after the Network was released", d)
	}
	if st := srv.Stats(); st.Streams != 0 {
		t.Errorf("stats %+v after release", st)
	}
}

// Options.Linger < 0 closes at once, without waiting for a remote that
// never closes.
func TestNegativeLingerClosesAtOnce(t *testing.T) {
	e := newEnvOptions(t, policy(t, []string{"tcp:127.0.0.1:*"}, nil), core.Limits{}, &netcap.Options{Linger: -1})
	r := newRemote(t, nil)
	c, err := netcap.Dial(t.Context(), e.net, "tcp", r.addr())
	if err != nil {
		t.Fatal(err)
	}
	rc := <-r.conns
	defer rc.Close()
	closed := time.Now()
	c.Close()
	waitFor(t, "the host to free the stream", func() bool { return e.srv.Stats().Streams == 0 })
	if d := time.Since(closed); d > time.Second {
		t.Errorf("the host freed the stream %v after Close, want at once", d)
	}
	rc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAll(rc); err != nil {
		t.Errorf("remote after the close: %v, want a clean end of stream", err)
	}
}
