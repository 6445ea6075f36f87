package unix

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/exc"
	"go.uber.org/goleak"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func testCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// server is a running Serve with a testimpl bootstrap object.
type server struct {
	addr   string // ParseAddr form of the listener's address
	live   *testimpl.Live
	obj    *testimpl.Object
	cancel context.CancelFunc
	done   chan error // receives Serve's result
}

func startServer(t *testing.T, addr string, options ...Option) *server {
	t.Helper()
	lis, err := Listen(addr)
	if err != nil {
		t.Fatalf("Listen(%q): %v", addr, err)
	}
	s := &server{
		addr: FormatAddr(lis.Addr()),
		live: new(testimpl.Live),
		done: make(chan error, 1),
	}
	s.obj = testimpl.New("server", s.live)
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	opts := &core.Options{
		BootstrapClient: capnp.Client(s.obj.Client()),
		Logger:          testLogger(t),
	}
	go func() { s.done <- Serve(ctx, lis, opts, options...) }()
	t.Cleanup(func() { s.stop(t) })
	return s
}

// stop cancels Serve and checks that it returned ctx.Err() and that every
// server object was released.
func (s *server) stop(t *testing.T) {
	t.Helper()
	if s.cancel == nil {
		return
	}
	s.cancel()
	s.cancel = nil
	select {
	case err := <-s.done:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("Serve returned %v; want context.Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return 10s after its context was cancelled")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.live.WaitZero(ctx); err != nil {
		t.Errorf("%d server objects still live after Serve returned: %v", s.live.Count(), err)
	}
}

// dial connects to addr; the connection is closed when the test ends if
// the test has not closed it.
func dial(t *testing.T, ctx context.Context, addr string) *core.Conn {
	t.Helper()
	conn, err := Dial(ctx, addr, &core.Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("Dial(%q): %v", addr, err)
	}
	t.Cleanup(func() {
		conn.Close()
		<-conn.Done()
	})
	return conn
}

// verifyNoLeaks checks for leaked goroutines after every other cleanup of
// the test (servers stopped, connections closed) has run.
func verifyNoLeaks(t *testing.T) {
	t.Cleanup(func() { goleak.VerifyNone(t) })
}

func closeConn(t *testing.T, conn *core.Conn) {
	t.Helper()
	if err := conn.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	select {
	case <-conn.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("conn.Done not closed 10s after Close")
	}
}

func echo(ctx context.Context, c testcapnp.Test, data []byte) ([]byte, error) {
	f, release := c.Echo(ctx, func(p testcapnp.Test_echo_Params) error { return p.SetData(data) })
	defer release()
	res, err := f.Struct()
	if err != nil {
		return nil, err
	}
	out, err := res.Data()
	return bytes.Clone(out), err
}

func name(ctx context.Context, c testcapnp.Test) (string, error) {
	f, release := c.Name(ctx, nil)
	defer release()
	res, err := f.Struct()
	if err != nil {
		return "", err
	}
	return res.Name()
}

func haveIPv6Loopback() error {
	l, err := net.Listen("tcp", "[::1]:0")
	if err != nil {
		return err
	}
	return l.Close()
}

func TestRoundTrip(t *testing.T) {
	tests := []struct {
		name string
		addr func(t *testing.T) string
	}{
		{"unix-path", func(t *testing.T) string { return "unix:" + filepath.Join(t.TempDir(), "vat.sock") }},
		{"unix-abstract", func(t *testing.T) string {
			return fmt.Sprintf("unix-abstract:captp-test-%d-%d", os.Getpid(), time.Now().UnixNano())
		}},
		{"tcp4", func(t *testing.T) string { return "127.0.0.1:0" }},
		{"tcp6", func(t *testing.T) string {
			if err := haveIPv6Loopback(); err != nil {
				t.Skipf("SKIPPING IPv6 TEST: this machine has no usable IPv6 loopback ([::1]): %v", err)
			}
			return "[::1]:0"
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			verifyNoLeaks(t)
			ctx := testCtx(t)
			s := startServer(t, tt.addr(t))
			t.Logf("serving on %s", s.addr)

			// Two clients at once: both bootstraps reach the same object,
			// each connection holding its own reference.
			var conns []*core.Conn
			var boots []testcapnp.Test
			for i := range 2 {
				conn := dial(t, ctx, s.addr)
				conns = append(conns, conn)
				boot := testcapnp.Test(conn.Bootstrap(ctx))
				boots = append(boots, boot)
				msg := fmt.Appendf(nil, "hello %d over %s", i, tt.name)
				got, err := echo(ctx, boot, msg)
				if err != nil {
					t.Fatalf("client %d: echo: %v", i, err)
				}
				if !bytes.Equal(got, msg) {
					t.Fatalf("client %d: echo returned %q; want %q", i, got, msg)
				}
			}
			for i, boot := range boots {
				n, err := name(ctx, boot)
				if err != nil || n != "server" {
					t.Fatalf("client %d: name() = %q, %v; want \"server\"", i, n, err)
				}
			}
			if n := s.live.Count(); n != 1 {
				t.Errorf("live server objects = %d; want 1 (one object shared by both connections)", n)
			}

			// The first client leaves; the second still works.
			boots[0].Release()
			closeConn(t, conns[0])
			if got, err := echo(ctx, boots[1], []byte("still here")); err != nil || string(got) != "still here" {
				t.Fatalf("second client after first left: echo = %q, %v", got, err)
			}
			boots[1].Release()
			closeConn(t, conns[1])

			s.stop(t)
		})
	}
}

// TestServeStopsOnCancel checks that cancelling Serve's context closes the
// live connections: the client's Done closes and its pending call fails
// with a disconnected error.
func TestServeStopsOnCancel(t *testing.T) {
	verifyNoLeaks(t)
	ctx := testCtx(t)
	s := startServer(t, "unix:"+filepath.Join(t.TempDir(), "vat.sock"))
	conn := dial(t, ctx, s.addr)
	defer conn.Close()
	boot := testcapnp.Test(conn.Bootstrap(ctx))
	defer boot.Release()
	if n, err := name(ctx, boot); err != nil || n != "server" {
		t.Fatalf("name() = %q, %v", n, err)
	}

	blocked, release := boot.Block(ctx, nil)
	defer release()
	select {
	case <-s.obj.BlockStarted():
	case <-ctx.Done():
		t.Fatal("block call never reached the server")
	}

	s.stop(t) // checks Serve's result and that the server object was released

	select {
	case <-conn.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("client conn.Done not closed 10s after Serve was cancelled")
	}
	t.Logf("client conn ended with: %v", conn.Err())
	_, err := blocked.Struct()
	if err == nil {
		t.Fatal("pending block() call succeeded after the server shut down")
	}
	if !exc.IsType(err, exc.Disconnected) {
		t.Errorf("pending call failed with %v (%#v); want a disconnected exception", err, err)
	}
	if _, err := echo(ctx, boot, []byte("x")); err == nil {
		t.Error("echo on a closed connection succeeded")
	}
}

// TestServeAfterCancelBeforeAccept checks that Serve returns at once if
// its context is already done.
func TestServeAlreadyCancelled(t *testing.T) {
	defer goleak.VerifyNone(t)
	lis, err := Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := Serve(ctx, lis, nil); !errors.Is(err, context.Canceled) {
		t.Errorf("Serve with a cancelled context = %v; want context.Canceled", err)
	}
	if _, err := lis.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("listener still open after Serve returned: Accept = %v", err)
	}
}

// fakeListener returns the errors in errs one per Accept, then blocks
// until closed.
type fakeListener struct {
	mu      sync.Mutex
	errs    []error
	accepts int
	closed  chan struct{}
	once    sync.Once
}

func newFakeListener(errs ...error) *fakeListener {
	return &fakeListener{errs: errs, closed: make(chan struct{})}
}

func (l *fakeListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	l.accepts++
	var err error
	if len(l.errs) > 0 {
		err, l.errs = l.errs[0], l.errs[1:]
	}
	l.mu.Unlock()
	if err != nil {
		return nil, err
	}
	<-l.closed
	return nil, net.ErrClosed
}

func (l *fakeListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

func (l *fakeListener) Addr() net.Addr { return &net.UnixAddr{Net: "unix", Name: "fake"} }

func (l *fakeListener) acceptCount() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.accepts
}

func TestServeRetriesTemporaryErrors(t *testing.T) {
	defer goleak.VerifyNone(t)
	emfile := &net.OpError{Op: "accept", Net: "unix", Err: os.NewSyscallError("accept4", syscall.EMFILE)}
	permanent := errors.New("listener broke")
	lis := newFakeListener(emfile, emfile, syscall.ECONNABORTED, permanent)
	start := time.Now()
	err := Serve(context.Background(), lis, &core.Options{Logger: testLogger(t)})
	if !errors.Is(err, permanent) {
		t.Fatalf("Serve = %v; want it to wrap %v", err, permanent)
	}
	if !strings.Contains(err.Error(), "accept") {
		t.Errorf("error %q does not say it came from accept", err)
	}
	if n := lis.acceptCount(); n != 4 {
		t.Errorf("Accept called %d times; want 4 (3 temporary errors retried, then the permanent one)", n)
	}
	// Backoff 5ms + 10ms + 20ms.
	if d := time.Since(start); d < 35*time.Millisecond {
		t.Errorf("Serve retried after %v; want backoff of at least 35ms", d)
	}
	select {
	case <-lis.closed:
	default:
		t.Error("Serve did not close the listener after a permanent error")
	}
}

func TestServeCancelDuringBackoff(t *testing.T) {
	defer goleak.VerifyNone(t)
	errs := make([]error, 100)
	for i := range errs {
		errs[i] = syscall.EMFILE
	}
	lis := newFakeListener(errs...)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := Serve(ctx, lis, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Serve = %v; want context.DeadlineExceeded", err)
	}
}

func TestServeListenerClosedElsewhere(t *testing.T) {
	defer goleak.VerifyNone(t)
	lis, err := Listen("unix:" + filepath.Join(t.TempDir(), "vat.sock"))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- Serve(context.Background(), lis, nil) }()
	time.Sleep(10 * time.Millisecond)
	lis.Close()
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("Serve = %v; want it to wrap net.ErrClosed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after its listener was closed")
	}
}

func TestDialErrors(t *testing.T) {
	ctx := testCtx(t)
	if _, err := Dial(ctx, "foo:bar:baz", nil); !errors.Is(err, ErrBadAddress) {
		t.Errorf("Dial(bad address) = %v; want ErrBadAddress", err)
	}
	missing := "unix:" + filepath.Join(t.TempDir(), "nobody.sock")
	_, err := Dial(ctx, missing, nil)
	if !errors.Is(err, syscall.ENOENT) {
		t.Errorf("Dial(%s) = %v; want ENOENT", missing, err)
	}
	if err != nil && !strings.Contains(err.Error(), missing) {
		t.Errorf("Dial error %q does not name the address", err)
	}
}

func TestListenRemovesStaleSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "vat.sock")
	// Leave a socket file behind, as a crashed process would.
	l, err := net.ListenUnix("unix", &net.UnixAddr{Net: "unix", Name: path})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	if _, err := os.Lstat(path); err != nil {
		t.Fatalf("stale socket file not left behind: %v", err)
	}

	lis, err := Listen("unix:" + path)
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	lis.Close()
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket file still there after the listener closed: %v", err)
	}
}

func TestListenKeepsLiveSocket(t *testing.T) {
	addr := "unix:" + filepath.Join(t.TempDir(), "vat.sock")
	first, err := Listen(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	accepted := make(chan error, 1)
	go func() {
		c, err := first.Accept() // the liveness probe of the second Listen
		if err == nil {
			c.Close()
		}
		accepted <- err
	}()

	second, err := Listen(addr)
	if err == nil {
		second.Close()
		t.Fatal("second Listen on a live socket succeeded")
	}
	if !strings.Contains(err.Error(), "in use") {
		t.Errorf("error %q does not say the address is in use", err)
	}
	if err := <-accepted; err != nil {
		t.Fatalf("first listener broken: %v", err)
	}
	// The first listener must still be reachable.
	_, path, _ := ParseAddr(addr)
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("first listener no longer reachable: %v", err)
	}
	c.Close()
}

func TestListenNeverRemovesRegularFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "precious.txt")
	if err := os.WriteFile(path, []byte("keep me"), 0o600); err != nil {
		t.Fatal(err)
	}
	lis, err := Listen("unix:" + path)
	if err == nil {
		lis.Close()
		t.Fatal("Listen over a regular file succeeded")
	}
	if !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("error %q does not say the file is not a socket", err)
	}
	if b, err := os.ReadFile(path); err != nil || string(b) != "keep me" {
		t.Errorf("regular file damaged: %q, %v", b, err)
	}
}

func TestListenBadAddress(t *testing.T) {
	if _, err := Listen("unix:"); !errors.Is(err, ErrBadAddress) {
		t.Errorf("Listen(unix:) = %v; want ErrBadAddress", err)
	}
}
