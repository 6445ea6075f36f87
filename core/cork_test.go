package core

import (
	"context"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/core/flow"
)

// Batching without a writer goroutine: calls a native caller makes before
// it waits leave in one write (corkableLocked, uncork), and Returns the
// read role's holder writes for input that arrived together leave in one
// write (claimInlineLocked, payReaderDebt).

// countingConn counts the Writes made on a transport.
type countingConn struct {
	net.Conn
	writes atomic.Int64
}

func (c *countingConn) Write(p []byte) (int, error) {
	c.writes.Add(1)
	return c.Conn.Write(p)
}

// corkPair connects a client to a holdOrAnswer server over transports
// that count their writes, and makes two calls, after which the client's
// read role is free and kept free (keepRoleFree).
func corkPair(t *testing.T) (cli *Conn, boot capnp.Client, h *holdOrAnswer, cw, sw *countingConn) {
	t.Helper()
	keepRoleFree(t)
	a, b := net.Pipe()
	cw, sw = &countingConn{Conn: a}, &countingConn{Conn: b}
	h = &holdOrAnswer{}
	srv := NewConn(sw, &Options{BootstrapClient: NewClient(h)})
	cli = NewConn(cw, nil)
	t.Cleanup(func() {
		cli.Close()
		srv.Close()
		<-cli.Done()
		<-srv.Done()
	})
	boot = cli.Bootstrap(context.Background())
	t.Cleanup(boot.Release)
	callOnce(t, context.Background(), boot)
	callOnce(t, context.Background(), boot)
	waitCorkable(t, cli, boot)
	return cli, boot, h, cw, sw
}

// waitCorkable waits until cli's read role is free and nothing of the
// calls before is still outstanding or being written (a Finish, the
// bootstrap's), so that the next lone call is corked.
func waitCorkable(t *testing.T, cli *Conn, boot capnp.Client) {
	t.Helper()
	waitRoleFree(t, cli, boot, func() bool {
		cli.mu.Lock()
		defer cli.mu.Unlock()
		return !cli.writing && cli.queuedLocked() == 0 && len(cli.questions) == 0 && len(cli.outWake) == 0
	})
}

// corkAttempts bounds the retries of a scenario that a stale writer
// wake-up spoiled: a writer goroutine signalled for earlier output, which
// someone else wrote first, wakes later and writes whatever is queued by
// then, a corked call included (harmless: it just goes out sooner).
const corkAttempts = 20

// corkedCall makes a native call and returns it once one was corked,
// with the number of calls h had served before it.
func corkedCall(t *testing.T, ctx context.Context, cli *Conn, boot capnp.Client, h *holdOrAnswer) (PendingCall, int64) {
	t.Helper()
	for range corkAttempts {
		waitCorkable(t, cli, boot)
		before := h.calls.Load()
		p := Call(ctx, boot, capnp.Send{Method: testMethod})
		if cli.corked.Load() {
			return p, before
		}
		if _, err := p.Wait(ctx); err != nil {
			t.Fatal(err)
		}
		p.Release()
	}
	t.Fatalf("no call was corked in %d attempts", corkAttempts)
	return PendingCall{}, 0
}

func TestCallsBeforeWaitLeaveInOneWrite(t *testing.T) {
	cli, boot, h, cw, sw := corkPair(t)
	ctx := ctx5(t)
	var srvWoken atomic.Int64
	hook := func(c *Conn) {
		if c != cli {
			srvWoken.Add(1)
		}
	}
	testWriterWoken.Store(&hook)
	t.Cleanup(func() { testWriterWoken.Store(nil) })

	// Each attempt: two calls before waiting. It counts if both stayed
	// corked and nothing woke the server's writer (a stale wake-up
	// spoils either; without batching neither ever holds).
	for attempt := 1; ; attempt++ {
		p1, served := corkedCall(t, ctx, cli, boot, h)
		c0, s0 := cw.writes.Load(), sw.writes.Load()
		srvWoken.Store(0)
		p2 := Call(ctx, boot, capnp.Send{Method: testMethod})
		corked := cli.corked.Load()
		if n := cw.writes.Load() - c0; corked && n != 0 {
			t.Fatalf("the client wrote %d times before anyone waited, want 0", n)
		}
		for _, p := range []PendingCall{p2, p1} {
			if _, err := p.Wait(ctx); err != nil {
				t.Fatal(err)
			}
			p.Release()
		}
		if n := h.calls.Load() - served; n != 2 {
			t.Fatalf("server served %d calls, want 2", n)
		}
		woken := srvWoken.Load()
		if corked && woken == 0 {
			if n := cw.writes.Load() - c0; n != 1 {
				t.Errorf("two calls made before waiting took %d writes, want 1", n)
			}
			// The server read both calls at once and answered both in
			// its read loop's one write, without waking its writer
			// goroutine for the first Return.
			if n := sw.writes.Load() - s0; n != 1 {
				t.Errorf("the server answered two calls that arrived together in %d writes, want 1", n)
			}
			return
		}
		if attempt == corkAttempts {
			t.Fatalf("in %d attempts, never were both calls corked (last: %v) with the server's writer left asleep (last: woken %d times)", attempt, corked, woken)
		}
	}
}

// A corked call goes out when its caller releases it unawaited, or selects
// on Done, without waiting for the read loop's next check.
func TestCorkedCallFlushedByReleaseAndDone(t *testing.T) {
	cli, boot, h, _, _ := corkPair(t)
	ctx := ctx5(t)

	p, _ := corkedCall(t, ctx, cli, boot, h)
	select {
	case <-p.Done():
	case <-ctx.Done():
		t.Fatal("a corked call selected on with Done never returned")
	}
	if _, err := p.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	p.Release()

	// Done gave the role to the loop; it frees it again once it has read
	// the Return, the connection being quiet (corkedCall waits for that).
	p, before := corkedCall(t, ctx, cli, boot, h)
	p.Release()
	waitFor(t, ctx, "the released call reaches the server", func() bool { return h.calls.Load() == before+1 })
}

// A corked call whose caller neither waits nor releases it goes out when
// the read loop next checks the free role (awaitRole).
func TestCorkedCallGoesOutUnawaited(t *testing.T) {
	saved := idleReadDelay
	t.Cleanup(func() { idleReadDelay = saved })
	for attempt := 0; ; attempt++ {
		idleReadDelay = 20 * time.Millisecond
		a, b := net.Pipe()
		h := &holdOrAnswer{}
		srv := NewConn(b, &Options{BootstrapClient: NewClient(h)})
		cli := NewConn(a, nil)
		boot := cli.Bootstrap(context.Background())
		callOnce(t, context.Background(), boot)
		callOnce(t, context.Background(), boot)
		p := Call(context.Background(), boot, capnp.Send{Method: testMethod})
		corked := cli.corked.Load()
		if corked {
			ctx := ctx5(t)
			waitFor(t, ctx, "an unawaited corked call reaches the server", func() bool { return h.calls.Load() == 3 })
		}
		p.Release()
		boot.Release()
		cli.Close()
		srv.Close()
		<-cli.Done()
		<-srv.Done()
		if corked {
			return
		}
		// The loop took the role back before the call (a slow machine):
		// it was written at once, which is not the case under test.
		if attempt == 20 {
			t.Fatal("no call was corked in 20 attempts; the test does not exercise the fallback")
		}
	}
}

// Calls made without waiting on an import whose flow-control window is
// smaller than them: the caller blocks in flow control with calls still
// corked, and must not wait for them forever: before a call waits for the
// window, it sends what is corked and wakes the read loop (startFlow), so
// the window opens as the Returns arrive.
func TestCorkedCallsUnderFlowControl(t *testing.T) {
	keepRoleFree(t)
	for attempt := 1; ; attempt++ {
		if corkedUnderFlowControl(t) {
			return
		}
		// The Returns came back before the window filled (a stale
		// writer wake-up sent the first call early): nothing waited.
		if attempt == corkAttempts {
			t.Fatalf("no call waited for the flow-control window in %d attempts; the test does not exercise it", attempt)
		}
	}
}

// corkedUnderFlowControl makes eight calls, each half the window, without
// waiting, and reports whether any of them waited for the window.
func corkedUnderFlowControl(t *testing.T) bool {
	a, b := net.Pipe()
	h := &holdOrAnswer{}
	srv := NewConn(b, &Options{BootstrapClient: NewClient(h)})
	cli := NewConn(a, &Options{Limits: Limits{Flow: flow.Config{
		Mode: flow.Fixed, Window: 2048, MinWindow: 1024, MaxWindow: 4096,
	}}})
	defer func() {
		cli.Close()
		srv.Close()
		<-cli.Done()
		<-srv.Done()
	}()
	boot := cli.Bootstrap(context.Background())
	defer boot.Release()
	callOnce(t, context.Background(), boot)
	callOnce(t, context.Background(), boot)
	waitCorkable(t, cli, boot)

	ctx := ctx5(t)
	data := make([]byte, 1000)
	send := dataSend(testMethod, data)
	done := make(chan []PendingCall, 1)
	go func() {
		var calls []PendingCall
		for range 8 {
			calls = append(calls, Call(ctx, boot, send))
		}
		done <- calls
	}()
	var calls []PendingCall
	select {
	case calls = <-done:
	case <-ctx.Done():
		t.Fatal("calls beyond the flow-control window never got the window: the corked calls before them were not sent")
	}
	for i, p := range calls {
		if _, err := p.Wait(ctx); err != nil {
			t.Errorf("call %d: %v", i, err)
		}
		p.Release()
	}
	var waits uint64
	cli.mu.Lock()
	for _, ie := range cli.imports {
		if ie.hook.lim != nil {
			waits += uint64(ie.hook.lim.Stats().Waits)
		}
	}
	cli.mu.Unlock()
	return waits > 0
}
