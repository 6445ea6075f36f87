package cppinterop

import (
	"context"
	"fmt"
	"net"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"

	"github.com/captp-go/captp/adapters/unix"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testimpl"
)

// floodLimits are small, so that a flood crosses every bound quickly.
var floodLimits = core.Limits{MaxAnswers: 64, MaxQueuedBytes: 64 << 10}

// floodHeapBound is how much the server's live heap may grow while a
// flooding peer is connected. What floodLimits let it hold:
//
//   - answers: at most 4×MaxAnswers (256) calls not yet finished by the
//     peer, each with its Return message (about 1.7 KiB per call,
//     measured): under 0.5 MiB;
//   - outbound bytes: the queue, beyond MaxQueuedBytes of which the
//     reader stops, and the buffer the writer is blocked on, each at most
//     MaxQueuedBytes plus one message's output, doubled by append's
//     growth: under 0.5 MiB;
//   - the frame reader's buffer and MaxAnswers calls in progress.
//
// About 1 MiB in all; the bound leaves room for measurement noise. Without
// the answers bound, the unfinished flood costs about 40 MiB. Its Returns,
// all queued, would cost the finished flood only about 1 MiB: there, what
// shows the queue is bounded is that the server stops reading.
const floodHeapBound = 4 << 20

// countingConn counts the bytes the server reads.
type countingConn struct {
	net.Conn
	read atomic.Int64
}

func (c *countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.read.Add(int64(n))
	return n, err
}

// floodServer accepts one connection on a Unix socket and serves a
// testimpl object on it with lim.
type floodServer struct {
	raw  *countingConn
	conn *core.Conn
}

func startFloodServer(t *testing.T, lim core.Limits) (addr string, accept func() *floodServer) {
	t.Helper()
	lis, err := unix.Listen(listenAddr(t, "unix"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lis.Close() })
	live := new(testimpl.Live)
	accepted := make(chan *floodServer, 1)
	go func() {
		defer close(accepted)
		c, err := lis.Accept()
		if err != nil {
			return
		}
		raw := &countingConn{Conn: c}
		accepted <- &floodServer{raw: raw, conn: core.NewConn(raw, &core.Options{
			BootstrapClient: capnp.Client(testimpl.New("server", live).Client()),
			Logger:          testLogger(t),
			Limits:          lim,
			// Long enough that the final Abort reaches a flooder that
			// only starts reading once the server has given up.
			AbortTimeout: 10 * time.Second,
		})}
	}()
	return unix.FormatAddr(lis.Addr()), func() *floodServer {
		s := <-accepted
		if s == nil {
			t.Fatal("accept failed")
		}
		t.Cleanup(func() {
			s.conn.Close()
			// Not testCtx: t.Context() is already cancelled in cleanups.
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if err := live.WaitZero(ctx); err != nil {
				t.Errorf("%d server objects live after the connection closed", live.Count())
			}
		})
		return s
	}
}

// waitStalled waits until the connection has ended or the server has
// read nothing new for quiet, and returns the bytes it has read.
func (s *floodServer) waitStalled(t *testing.T, quiet, limit time.Duration) int64 {
	t.Helper()
	deadline := time.Now().Add(limit)
	last, since := s.raw.read.Load(), time.Now()
	for time.Now().Before(deadline) {
		select {
		case <-time.After(10 * time.Millisecond):
		case <-s.conn.Done():
			return s.raw.read.Load()
		}
		if s.conn.Err() != nil {
			return s.raw.read.Load()
		}
		if n := s.raw.read.Load(); n != last {
			last, since = n, time.Now()
		} else if time.Since(since) >= quiet {
			return n
		}
	}
	t.Fatalf("the server kept reading for %v (read %d bytes so far)", limit, last)
	return 0
}

// returns counts the Returns a raw peer read, per answer id and kind.
type returns struct {
	byID  map[uint32]int
	kinds map[string]int
	abort string
	other []rpccp.Message_Which
}

func (r *returns) add(m rpccp.Message) {
	switch m.Which() {
	case rpccp.Message_Which_return:
		ret, err := m.Return()
		if err != nil {
			r.kinds["undecodable"]++
			return
		}
		r.byID[ret.AnswerId()]++
		kind := ret.Which().String()
		if ret.Which() == rpccp.Return_Which_exception {
			if e, err := ret.Exception(); err == nil {
				kind += " " + e.Type().String()
			}
		}
		r.kinds[kind]++
	case rpccp.Message_Which_abort:
		if e, err := m.Abort(); err == nil {
			r.abort, _ = e.Reason()
		}
		if r.abort == "" {
			r.abort = "(no reason)"
		}
	default:
		r.other = append(r.other, m.Which())
	}
}

// readReturns reads c until it ends, until n Returns have arrived, or
// until deadline.
func readReturns(c net.Conn, n int, deadline time.Time) (*returns, error) {
	r := &returns{byID: map[uint32]int{}, kinds: map[string]int{}}
	c.SetReadDeadline(deadline)
	dec := capnp.NewDecoder(c)
	total := 0
	for total < n {
		msg, err := dec.Decode()
		if err != nil {
			return r, err
		}
		m, err := rpccp.ReadRootMessage(msg)
		if err != nil {
			return r, fmt.Errorf("undecodable message: %w", err)
		}
		if m.Which() == rpccp.Message_Which_return {
			total++
		}
		r.add(m)
	}
	return r, nil
}

// floodCallCount is how many calls each flood sends: several times what
// the bounds let through before the server stops or aborts.
const floodCallCount = 20_000

// TestFloodIsBounded: a peer that pipelines calls as fast as it can and
// never reads a reply costs our server a bounded amount of memory, and
// every call the server accepted is answered, or the connection ends
// with an Abort saying why.
func TestFloodIsBounded(t *testing.T) {
	lim := floodLimits
	payload := []byte("0123456789abcdef")

	// Calls never finished: the server answers them, but must keep every
	// answer until Finish. Beyond its bound it aborts the connection.
	t.Run("unfinished", func(t *testing.T) {
		flood := bootstrapFrame(0)
		for i := uint32(1); i <= floodCallCount; i++ {
			flood = append(flood, callFrame(i, 0, false, 0, payload)...)
		}
		addr, accept := startFloodServer(t, lim)
		c := dialRaw(t, addr)
		srv := accept()
		t.Cleanup(func() { c.Close() }) // before the server's Close, which flushes to us
		before := goMem(t)
		written := make(chan error, 1)
		go func() { _, err := c.Write(flood); written <- err }()

		// The server gives up (our write fails once it closes), or at
		// least stops reading.
		srv.waitStalled(t, 300*time.Millisecond, 15*time.Second)
		after := goMem(t)
		t.Logf("server: read %d of %d bytes, live heap %+.1f MiB, ended with: %v",
			srv.raw.read.Load(), len(flood), float64(after.inuse-before.inuse)/(1<<20), srv.conn.Err())
		if grew := after.inuse - before.inuse; grew > floodHeapBound {
			t.Errorf("server live heap grew by %s; want at most %s", mib(grew), mib(floodHeapBound))
		}
		const reason = "calls unfinished"
		if err := srv.conn.Err(); err == nil || !strings.Contains(err.Error(), reason) {
			t.Fatalf("the server's connection: %v; want it aborted for %q", err, reason)
		}

		// The flooder reads what it was sent: Returns, then the Abort.
		r, err := readReturns(c, floodCallCount+1, time.Now().Add(15*time.Second))
		t.Logf("flooder: %d answers %v, other messages %v, Abort %q, end %v",
			len(r.byID), r.kinds, r.other, r.abort, err)
		if !strings.Contains(r.abort, reason) {
			t.Errorf("the flooder got Abort %q; want one for %q", r.abort, reason)
		}
		if !isEOF(err) {
			t.Errorf("after the Abort: %v; want the connection closed", err)
		}
		for id, n := range r.byID {
			if n != 1 || id > floodCallCount {
				t.Errorf("answer %d: %d Returns", id, n)
			}
		}
		// After its Abort the server reads and discards our writes for a
		// while (so that a flooder gets to read the Abort), so the write
		// may well complete; what it processed is bounded.
		<-written
		// It keeps at most 4×MaxAnswers unfinished, and as many more
		// dropped at their Return (Return.noFinishNeeded), whose ids it
		// remembers until the peer finishes or reuses them.
		if limit := 2 * 4 * lim.MaxAnswers; len(r.byID) > limit+1 {
			t.Errorf("the server answered %d calls; it keeps at most %d unfinished or dropped unfinished", len(r.byID), limit)
		}
		runtime.KeepAlive(flood) // measured as live in both samples
	})

	// Calls finished at once, replies never read: the table stays small
	// but every Return is queued for a peer that does not read. The
	// server must stop reading instead; once the peer reads, everything
	// is answered.
	t.Run("finished", func(t *testing.T) {
		ctx := testCtx(t, 30*time.Second)
		const calls = floodCallCount
		flood := bootstrapFrame(0)
		for i := uint32(1); i <= calls; i++ {
			flood = append(flood, callFrame(i, 0, false, 0, payload)...)
			flood = append(flood, finishFrame(i)...)
		}
		addr, accept := startFloodServer(t, lim)
		c := dialRaw(t, addr)
		srv := accept()
		t.Cleanup(func() { c.Close() }) // before the server's Close, which flushes to us
		before := goMem(t)
		written := make(chan error, 1)
		go func() { _, err := c.Write(flood); written <- err }()

		read := srv.waitStalled(t, 300*time.Millisecond, 20*time.Second)
		after := goMem(t)
		st := srv.conn.Stats()
		t.Logf("server stalled after reading %d of %d bytes; live heap %+.1f MiB; tables %v",
			read, len(flood), float64(after.inuse-before.inuse)/(1<<20), st)
		if err := srv.conn.Err(); err != nil {
			t.Fatalf("the server ended the connection: %v; want it open, not reading", err)
		}
		if read >= int64(len(flood)) {
			t.Errorf("the server read the whole flood (%d bytes) from a peer that reads nothing", read)
		}
		if grew := after.inuse - before.inuse; grew > floodHeapBound {
			t.Errorf("server live heap grew by %s; want at most %s", mib(grew), mib(floodHeapBound))
		}
		if max := 4*lim.MaxAnswers + 1; st.Answers > max {
			t.Errorf("the server keeps %d answers; want at most %d", st.Answers, max)
		}

		// Now the flooder reads: the server resumes, and every call,
		// the bootstrap included, gets exactly one Return.
		r, err := readReturns(c, calls+1, time.Now().Add(20*time.Second))
		t.Logf("flooder: %d answers %v, other messages %v, Abort %q, read error %v",
			len(r.byID), r.kinds, r.other, r.abort, err)
		if err != nil {
			t.Errorf("reading the answers: %v", err)
		}
		if r.abort != "" {
			t.Errorf("the server aborted: %q", r.abort)
		}
		for id := uint32(0); id <= calls; id++ {
			if n := r.byID[id]; n != 1 {
				t.Errorf("call %d: %d Returns; want 1", id, n)
				break
			}
		}
		select {
		case werr := <-written:
			if werr != nil {
				t.Errorf("writing the flood: %v", werr)
			}
		case <-ctx.Done():
			t.Error("the server never read the rest of the flood")
		}
		if err := srv.conn.Err(); err != nil {
			t.Errorf("the connection ended: %v", err)
		}
		runtime.KeepAlive(flood)
	})
}
