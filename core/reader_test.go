package core

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
)

// The read role (reader.go): a caller that waits for its Return on a quiet
// connection reads it itself; input nobody waits for is still read.

// holdOrAnswer answers method 0 at once and holds method 1 until its
// context ends (the caller cancels it).
type holdOrAnswer struct{ calls atomic.Int64 }

func (h *holdOrAnswer) HandleCall(_ context.Context, sc *ServerCall) {
	h.calls.Add(1)
	if sc.Method().MethodID == 1 {
		sc.Go(func(ctx context.Context, _ *ServerCall) error {
			<-ctx.Done()
			return ctx.Err()
		})
		return
	}
	_, err := sc.Results(capnp.ObjectSize{})
	sc.Return(err)
}

// ctx5 is a context that ends the test's waits after five seconds.
func ctx5(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// testMethod is answered at once by holdOrAnswer, holdMethod held.
var (
	testMethod = capnp.Method{InterfaceID: 0x1234, MethodID: 0}
	holdMethod = capnp.Method{InterfaceID: 0x1234, MethodID: 1}
)

// rolePair connects a client to a server whose bootstrap capability is
// server; the client offers client as its own bootstrap capability.
func rolePair(t *testing.T, server, client capnp.Client) (cli, srv *Conn) {
	t.Helper()
	a, b := net.Pipe()
	srv = NewConn(b, &Options{BootstrapClient: server})
	cli = NewConn(a, &Options{BootstrapClient: client})
	t.Cleanup(func() {
		cli.Close()
		srv.Close()
		<-cli.Done()
		<-srv.Done()
	})
	return cli, srv
}

// keepRoleFree stops the read loop from taking a free read role back
// for the rest of the test, so that the next waiting caller is sure to
// find it free (on a slow single-threaded platform, js/wasm, the loop's
// check could otherwise come first).
func keepRoleFree(t *testing.T) {
	saved := idleReadDelay
	idleReadDelay = time.Hour
	t.Cleanup(func() { idleReadDelay = saved })
}

// freeRolePair is rolePair with a holdOrAnswer server, after two calls that
// leave the client's read role free, and kept free (keepRoleFree).
func freeRolePair(t *testing.T) (*Conn, capnp.Client) {
	keepRoleFree(t)
	cli, _ := rolePair(t, NewClient(&holdOrAnswer{}), capnp.Client{})
	boot := cli.Bootstrap(context.Background())
	t.Cleanup(boot.Release)
	callOnce(t, context.Background(), boot)
	callOnce(t, context.Background(), boot)
	waitRoleFree(t, cli, boot, nil)
	return cli, boot
}

// waitRoleFree waits until cli's read role is free and idle holds too,
// if given. The read loop frees the role only after reading a Return it
// was hinted about while the connection was quiet; if it kept the role
// (under load it may not have been quiet at that moment), another call
// gives it another chance.
func waitRoleFree(t *testing.T, cli *Conn, boot capnp.Client, idle func() bool) {
	t.Helper()
	ready := func() bool {
		return cli.read.state.Load() == roleFree && (idle == nil || idle())
	}
	deadline := time.Now().Add(5 * time.Second)
	for tries := 0; !ready(); tries++ {
		if time.Now().After(deadline) {
			t.Fatal("timed out waiting for the client's read role to be free")
		}
		if tries%10 == 9 {
			callOnce(t, context.Background(), boot)
		}
		time.Sleep(time.Millisecond)
	}
}

// callOnce makes one native call and waits for it with ctx.
func callOnce(t *testing.T, ctx context.Context, target capnp.Client) {
	t.Helper()
	p := Call(ctx, target, capnp.Send{Method: testMethod})
	if _, err := p.Wait(ctx); err != nil {
		t.Fatalf("call: %v", err)
	}
	p.Release()
}

func TestCallerReadsItsOwnReturn(t *testing.T) {
	keepRoleFree(t) // under -race the loop's check could come between calls
	h := &holdOrAnswer{}
	cli, _ := rolePair(t, NewClient(h), capnp.Client{})
	boot := cli.Bootstrap(context.Background())
	defer boot.Release()

	for range 20 {
		callOnce(t, context.Background(), boot)
	}
	if n := cli.read.takes.Load(); n < 15 {
		t.Errorf("callers read %d of 20 Returns themselves; want nearly all (the first wakes the role free)", n)
	}

	// A context that can end: the caller's read can be interrupted
	// (net.Pipe has read deadlines), so it reads its Return too.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	before := cli.read.takes.Load()
	for range 5 {
		callOnce(t, ctx, boot)
	}
	if n := cli.read.takes.Load() - before; n < 4 {
		t.Errorf("callers with cancellable contexts read %d of 5 Returns themselves", n)
	}
	if got := h.calls.Load(); got != 25 {
		t.Errorf("server saw %d calls, want 25", got)
	}
}

// Calls a caller makes together (a call and calls pipelined on it, or
// several it then waits for) leave the read role free: the caller that
// waits reads all their Returns itself, instead of the second call
// handing the role to the read loop, whose hand-over of each Return
// costs a thread wake-up.
func TestCallerReadsReturnsOfCallsMadeTogether(t *testing.T) {
	cli, boot := freeRolePair(t)
	ctx := ctx5(t)
	before := cli.read.takes.Load()
	for range 10 {
		first := Call(ctx, boot, capnp.Send{Method: testMethod})
		second := Call(ctx, boot, capnp.Send{Method: testMethod})
		for _, p := range []PendingCall{second, first} {
			if _, err := p.Wait(ctx); err != nil {
				t.Fatalf("call: %v", err)
			}
		}
		first.Release()
		second.Release()
	}
	if n := cli.read.takes.Load() - before; n < 8 {
		t.Errorf("callers read the Returns of %d of 10 call pairs themselves; want nearly all", n)
	}
}

// Once callers stop, a free role goes back to the read loop: the peer's
// calls are answered, the Finishes that waited for the next frame go out,
// and the end of the stream is noticed.
func TestFreeRoleStillReads(t *testing.T) {
	served := &holdOrAnswer{}
	callback := &holdOrAnswer{}
	cli, srv := rolePair(t, NewClient(served), NewClient(callback))
	boot := cli.Bootstrap(context.Background())
	defer boot.Release()
	back := srv.Bootstrap(context.Background())
	defer back.Release()
	callOnce(t, context.Background(), back) // the client's bootstrap answers

	// The loop keeps the role for peerCallQuiet after it first sees
	// that the peer called; then callers take it.
	// (No pause between calls: the loop takes a free role back when no
	// caller came for idleReadDelay.)
	for end := time.Now().Add(5 * time.Second); cli.read.takes.Load() == 0 && time.Now().Before(end); {
		callOnce(t, context.Background(), boot)
	}
	if cli.read.takes.Load() == 0 {
		t.Fatal("no caller read its own Return; the test does not exercise the free role")
	}
	waitFor(t, ctx5(t), "the client's Finishes reach the server", func() bool { return srv.Stats().Answers == 0 })

	// The server calls the client while no client call is outstanding.
	start := time.Now()
	callOnce(t, context.Background(), back)
	if callback.calls.Load() != 2 {
		t.Fatalf("client served %d calls, want 2", callback.calls.Load())
	}
	t.Logf("call into an idle client answered in %v", time.Since(start))

	for range 10 {
		callOnce(t, context.Background(), boot)
	}
	srv.Close()
	select {
	case <-cli.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("client did not notice the server closing while its read role was free")
	}
	if err := cli.Err(); err == nil {
		t.Error("client ended with no error after the server closed")
	}
}

// A caller reading its own Return when the connection is closed returns
// with the connection's error, and the read loop ends.
func TestCloseWhileCallerReads(t *testing.T) {
	cli, boot := freeRolePair(t)

	p := Call(context.Background(), boot, capnp.Send{Method: holdMethod})
	defer p.Release()
	errc := make(chan error, 1)
	go func() {
		_, err := p.Wait(context.Background())
		errc <- err
	}()
	waitFor(t, ctx5(t), "the caller holds the read role", func() bool { return cli.read.state.Load() == roleCaller })
	cli.Close()
	select {
	case err := <-errc:
		if err == nil {
			t.Fatal("Wait returned no error after Close")
		}
		if !strings.Contains(err.Error(), "closed") {
			t.Fatalf("Wait after Close: %v, want the connection's closing error", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a caller reading its Return did not return after Close")
	}
	select {
	case <-cli.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the connection did not finish closing")
	}
}

// noDeadlines hides a transport's read deadlines.
type noDeadlines struct{ net.Conn }

func (c noDeadlines) Read(p []byte) (int, error)  { return c.Conn.Read(p) }
func (c noDeadlines) Write(p []byte) (int, error) { return c.Conn.Write(p) }
func (c noDeadlines) Close() error                { return c.Conn.Close() }

// Over a transport whose reads cannot be interrupted, only callers whose
// contexts cannot end read their own Returns.
func TestCallerReadsOnlyIfInterruptible(t *testing.T) {
	a, b := net.Pipe()
	srv := NewConn(b, &Options{BootstrapClient: NewClient(&holdOrAnswer{})})
	cli := NewConn(struct{ io.ReadWriteCloser }{noDeadlines{a}}, nil)
	defer func() { cli.Close(); srv.Close(); <-cli.Done(); <-srv.Done() }()
	boot := cli.Bootstrap(context.Background())
	defer boot.Release()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	for range 10 {
		callOnce(t, ctx, boot)
	}
	if n := cli.read.takes.Load(); n != 0 {
		t.Errorf("callers with cancellable contexts took the read role %d times over a transport without deadlines", n)
	}
	for range 10 {
		callOnce(t, context.Background(), boot)
	}
	if n := cli.read.takes.Load(); n < 5 {
		t.Errorf("callers whose contexts cannot end read %d of 10 Returns themselves", n)
	}
}

// Cancelling a call whose caller is reading interrupts the read: Wait
// returns the context's error, and the connection reads on normally.
func TestCancelWhileCallerReads(t *testing.T) {
	cli, boot := freeRolePair(t)

	ctx, cancel := context.WithCancel(context.Background())
	p := Call(ctx, boot, capnp.Send{Method: holdMethod})
	errc := make(chan error, 1)
	go func() {
		_, err := p.Wait(ctx)
		errc <- err
	}()
	waitFor(t, ctx5(t), "the caller holds the read role", func() bool { return cli.read.state.Load() == roleCaller })
	cancel()
	select {
	case err := <-errc:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Wait after cancel: %v, want context.Canceled", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("cancelling the call did not interrupt its caller's read")
	}
	p.Release()

	// The interrupt's deadline is gone: calls keep working, read by
	// their callers or by the loop.
	for range 10 {
		callOnce(t, context.Background(), boot)
	}
	if err := cli.Err(); err != nil {
		t.Fatalf("connection failed after an interrupted read: %v", err)
	}
}

// Many goroutines share a connection: native callers with and without
// contexts that end, cancelled calls, calls through go-capnp's path, and
// the peer calling back, so the read role moves between the loop and
// callers all the time. Every call must finish as it should, and the
// tables must empty.
func TestReadRoleStress(t *testing.T) {
	srvObj, cliObj := &holdOrAnswer{}, &holdOrAnswer{}
	cli, srv := rolePair(t, NewClient(srvObj), NewClient(cliObj))
	boot := cli.Bootstrap(context.Background())
	defer boot.Release()
	back := srv.Bootstrap(context.Background())
	defer back.Release()

	const rounds = 300
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	errc := make(chan error, 16)
	run := func(f func(i int) error) {
		go func() {
			for i := range rounds {
				if err := f(i); err != nil {
					errc <- err
					return
				}
			}
			errc <- nil
		}()
	}
	native := func(ctx context.Context, target capnp.Client, method uint16) error {
		p := Call(ctx, target, capnp.Send{Method: capnp.Method{InterfaceID: 0x1234, MethodID: method}})
		defer p.Release()
		_, err := p.Wait(ctx)
		return err
	}
	workers := 0
	for w := range 4 {
		workers++
		run(func(i int) error {
			callCtx := context.Background()
			if w%2 == 1 {
				callCtx = ctx
			}
			if w >= 2 && i%10 == 0 {
				// A call cancelled while its caller may be reading.
				c, stop := context.WithTimeout(ctx, time.Duration(i%3)*100*time.Microsecond)
				defer stop()
				if err := native(c, boot, 1); !errors.Is(err, context.DeadlineExceeded) {
					return fmt.Errorf("cancelled call: %v", err)
				}
				return nil
			}
			if err := native(callCtx, boot, 0); err != nil {
				return fmt.Errorf("native call: %w", err)
			}
			return nil
		})
	}
	workers++
	run(func(int) error { // go-capnp's path
		ans, rel := boot.SendCall(ctx, capnp.Send{Method: capnp.Method{InterfaceID: 0x1234, MethodID: 0}})
		defer rel()
		_, err := ans.Struct()
		return err
	})
	workers++
	run(func(i int) error { // the peer calls the client
		if i%3 != 0 {
			return nil
		}
		return native(ctx, back, 0)
	})
	for range workers {
		select {
		case err := <-errc:
			if err != nil {
				t.Fatal(err)
			}
		case <-ctx.Done():
			buf := make([]byte, 1<<20)
			t.Logf("goroutines:\n%s", buf[:runtime.Stack(buf, true)])
			t.Fatal("calls did not finish: a waiter was left without a reader?")
		}
	}
	t.Logf("callers took the read role %d times", cli.read.takes.Load())

	// Once the peer stops calling, callers read their Returns again.
	before := cli.read.takes.Load()
	for end := time.Now().Add(5 * time.Second); cli.read.takes.Load() == before && time.Now().Before(end); {
		if err := native(ctx, boot, 0); err != nil {
			t.Fatal(err)
		}
	}
	if cli.read.takes.Load() == before {
		t.Error("no caller took the read role after the stress")
	}
	waitFor(t, ctx5(t), "the tables empty", func() bool {
		s, c := srv.Stats(), cli.Stats()
		return s.Questions == 0 && s.Answers == 0 && c.Questions == 0 && c.Answers == 0
	})
}
