package cppinterop

import (
	"errors"
	"net"
	"syscall"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"

	"github.com/captp-go/captp/adapters/unix"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// TestCoreBugReturnViolationHangsCaller: a Return that core rejects as a
// protocol violation (here takeFromOtherQuestion, which the C++ reference
// sends whenever it forwards one of our calls back to us) aborts the
// connection, but the call it answered never settles: core's handleReturn
// sets question.returned and question.settled before it validates the
// Return, so shutdown's rejectLocked skips the question. The caller waits
// forever, even after Done, whatever its context says.
func TestCoreBugReturnViolationHangsCaller(t *testing.T) {
	knownCoreBug(t, "a Return rejected as a protocol violation leaves its call pending forever (core/handle.go handleReturn sets q.settled before validating)")
	ctx := testCtx(t, 10*time.Second)
	a, b := net.Pipe()
	defer b.Close()
	conn := core.NewConn(a, &core.Options{Logger: testLogger(t)})
	defer conn.Close()

	// The raw peer reads what core sends.
	type msgInfo struct {
		which rpccp.Message_Which
		qid   uint32
	}
	msgs := make(chan msgInfo, 16)
	go func() {
		defer close(msgs)
		dec := capnp.NewDecoder(b)
		for {
			msg, err := dec.Decode()
			if err != nil {
				return
			}
			m, err := rpccp.ReadRootMessage(msg)
			if err != nil {
				return
			}
			info := msgInfo{which: m.Which()}
			if m.Which() == rpccp.Message_Which_call {
				c, _ := m.Call()
				info.qid = c.QuestionId()
			}
			msgs <- info
		}
	}()

	boot := testcapnp.Test(conn.Bootstrap(ctx))
	defer boot.Release()
	// Not deferred: with the bug, releasing blocks until the call settles,
	// which it never does.
	f, release := boot.Echo(ctx, nil)
	var callID uint32
	for got := false; !got; {
		select {
		case m := <-msgs:
			if m.which == rpccp.Message_Which_call {
				callID, got = m.qid, true
			}
		case <-ctx.Done():
			t.Fatal("core never sent the call")
		}
	}
	ret := rpcFrame(func(m rpccp.Message) error {
		r, err := m.NewReturn()
		if err != nil {
			return err
		}
		r.SetAnswerId(callID)
		r.SetTakeFromOtherQuestion(99)
		return nil
	})
	if _, err := b.Write(ret); err != nil {
		t.Fatal(err)
	}
	select {
	case <-conn.Done():
	case <-ctx.Done():
		t.Fatal("core did not end the connection after the unexpected Return")
	}
	t.Logf("connection ended: %v", conn.Err())

	done := make(chan error, 1)
	go func() {
		_, err := f.Struct()
		done <- err
	}()
	select {
	case err := <-done:
		release()
		if !capnp.IsDisconnected(err) {
			t.Errorf("pending call ended with %v; want a disconnected exception", err)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("the call answered by the rejected Return is still pending 3s after the connection ended")
	}
}

// TestCoreGapTailCallFromCpp: whenever the C++ reference forwards a call
// it received from us to a capability we host (a pipelined call on a
// result that turns out to be ours, or calls queued on a promise that
// resolves to our object), it does not make a plain call: RpcClient::call
// uses directTailCall, which sends us a Call with sendResultsTo.yourself
// and answers our question with Return.takeFromOtherQuestion. Core
// answers the first with Unimplemented and aborts on the second ("return
// type 4 ... which did not ask for it"), so these patterns break against
// C++ (and, through the bug above, the forwarded call hangs).
func TestCoreGapTailCallFromCpp(t *testing.T) {
	requireCpp(t)
	knownCoreBug(t, "Call.sendResultsTo.yourself / Return.takeFromOtherQuestion (tail calls) are not implemented; the C++ reference uses them to forward our calls back to us")
	for _, transport := range transports {
		t.Run(transport, func(t *testing.T) {
			ctx := testCtx(t, 20*time.Second)
			srv := startCppServer(t, ctx, transport)
			conn, err := dialAddr(ctx, srv.addr, testLogger(t))
			if err != nil {
				t.Fatalf("Dial(%s): %v", srv.addr, err)
			}
			defer conn.Close()
			boot := testcapnp.Test(conn.Bootstrap(ctx))
			defer boot.Release()
			local := testimpl.New("go-local", nil)
			lc := local.Client()
			defer lc.Release()
			hf, release := boot.Hold(ctx, func(p testcapnp.Test_hold_Params) error { return p.SetCap(lc.AddRef()) })
			if _, err := hf.Struct(); err != nil {
				t.Fatalf("hold: %v", err)
			}
			release()
			// Pipelined on getHeld's result, which is our own object: C++
			// forwards the call back to us.
			gf, releaseGet := boot.GetHeld(ctx, nil)
			nf, releaseName := gf.Cap().Name(ctx, nil)
			done := make(chan error, 1)
			go func() {
				res, err := nf.Struct()
				if err == nil {
					var n string
					if n, err = res.Name(); err == nil && n != "go-local" {
						err = errors.New("name() = " + n + "; want go-local")
					}
				}
				done <- err
			}()
			select {
			case err := <-done:
				releaseName()
				releaseGet()
				if err != nil {
					t.Fatalf("getHeld().name(), pipelined: %v", err)
				}
			case <-conn.Done():
				// Leave the stuck call alone: releasing it would block.
				t.Fatalf("the connection ended during a call C++ forwarded back to us: %v", conn.Err())
			case <-time.After(5 * time.Second):
				t.Fatal("getHeld().name(), pipelined, still pending after 5s")
			}
		})
	}
}

// TestCoreBugFloodUnbounded: a peer that sends calls and never reads the
// replies (nor sends Finish) costs our server memory without bound, even
// with small Limits:
//
//   - every Call is entered in the answers table before the MaxAnswers
//     check (handleCall: newAnswerLocked, then the "too many calls in
//     progress" overloaded Return), and an answer stays there, holding its
//     Return message, until the peer's Finish;
//   - Returns are queued with sendLocked, which MaxQueuedBytes does not
//     bound (waitQueue only throttles our own outbound calls), and the
//     reader keeps reading while the writer is blocked on a peer that does
//     not read.
//
// Bounded would mean: the reader stops reading (backpressure to the
// socket) once the outbound queue is over MaxQueuedBytes, or the
// connection is aborted, and the answers table never exceeds MaxAnswers.
func TestCoreBugFloodUnbounded(t *testing.T) {
	knownCoreBug(t, "answers beyond MaxAnswers and Returns to a peer that does not read are kept without bound")
	const calls = 20_000
	lim := core.Limits{MaxAnswers: 64, MaxQueuedBytes: 64 << 10}
	lis, err := unix.Listen(listenAddr(t, "unix"))
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	accepted := make(chan *core.Conn, 1)
	go func() {
		c, err := lis.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- core.NewConn(c, &core.Options{
			BootstrapClient: capnp.Client(testimpl.New("server", nil).Client()),
			Limits:          lim,
		})
	}()
	var flood []byte
	flood = append(flood, bootstrapFrame(0)...)
	for i := uint32(1); i <= calls; i++ {
		flood = append(flood, callFrame(i, 0, false, 0, []byte("0123456789abcdef"))...)
	}
	c := dialRaw(t, unix.FormatAddr(lis.Addr()))
	conn := <-accepted
	if conn == nil {
		t.Fatal("accept failed")
	}
	defer conn.Close()
	before := goMem(t)
	c.SetWriteDeadline(time.Now().Add(3 * time.Second))
	n, werr := c.Write(flood)
	time.Sleep(200 * time.Millisecond)
	after := goMem(t)
	st := conn.Stats()
	t.Logf("wrote %d of %d bytes (%v); server tables %v; live heap +%s", n, len(flood), werr, st, mib(after.inuse-before.inuse))
	select {
	case <-conn.Done():
		return // aborting the flooder is bounded too
	default:
	}
	if st.Answers > lim.MaxAnswers+1 {
		t.Errorf("answers table holds %d entries; MaxAnswers is %d", st.Answers, lim.MaxAnswers)
	}
	if grew := after.inuse - before.inuse; grew > 8<<20 {
		t.Errorf("live heap grew by %s for %d unread calls with MaxQueuedBytes %d", mib(grew), calls, lim.MaxQueuedBytes)
	}
}
