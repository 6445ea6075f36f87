package cppinterop

import (
	"bytes"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"

	"github.com/captp-go/captp/adapters/unix"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// TestReturnViolationRejectsCaller: a Return that core must reject as a
// protocol violation (here takeFromOtherQuestion naming a question that is
// not a call with sendResultsTo.yourself) aborts the connection with a
// reason, and the call it claimed to answer rejects as disconnected
// instead of waiting forever: handleReturn validates before it settles.
func TestReturnViolationRejectsCaller(t *testing.T) {
	ctx := testCtx(t, 10*time.Second)
	a, b := net.Pipe()
	defer b.Close()
	conn := core.NewConn(a, &core.Options{Logger: testLogger(t)})
	defer conn.Close()

	// The raw peer reads what core sends.
	type msgInfo struct {
		which rpccp.Message_Which
		qid   uint32
		abort string
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
			switch m.Which() {
			case rpccp.Message_Which_call:
				c, _ := m.Call()
				info.qid = c.QuestionId()
			case rpccp.Message_Which_abort:
				e, _ := m.Abort()
				info.abort, _ = e.Reason()
			}
			msgs <- info
		}
	}()

	boot := testcapnp.Test(conn.Bootstrap(ctx))
	defer boot.Release()
	// Released only once settled: releasing a pending call waits for it.
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

	const wantReason = "takes the results of question 99"
	var abort string
	for abort == "" {
		select {
		case m, ok := <-msgs:
			if !ok {
				t.Fatal("the connection closed without an Abort")
			}
			if m.which == rpccp.Message_Which_abort {
				abort = m.abort
			}
		case <-ctx.Done():
			t.Fatal("no Abort after the Return that takes another question's results")
		}
	}
	if !strings.Contains(abort, wantReason) {
		t.Errorf("Abort reason %q; want it to contain %q", abort, wantReason)
	}
	select {
	case <-conn.Done():
	case <-ctx.Done():
		t.Fatal("core did not end the connection after the bad Return")
	}
	if err := conn.Err(); err == nil || !strings.Contains(err.Error(), wantReason) {
		t.Errorf("conn.Err() = %v; want the violation (%q)", err, wantReason)
	}

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

// tapConn records every byte read from a connection, to check afterwards
// which messages the peer sent, and can hold back what arrives.
type tapConn struct {
	net.Conn
	mu   sync.Mutex
	got  []byte
	gate chan struct{} // while non-nil, Read waits for it to close
}

func (c *tapConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.mu.Lock()
	c.got = append(c.got, p[:n]...)
	gate := c.gate
	c.mu.Unlock()
	if gate != nil {
		<-gate
	}
	return n, err
}

// pause holds back inbound bytes from the reader until resume.
func (c *tapConn) pause() {
	c.mu.Lock()
	if c.gate == nil {
		c.gate = make(chan struct{})
	}
	c.mu.Unlock()
}

func (c *tapConn) resume() {
	c.mu.Lock()
	if c.gate != nil {
		close(c.gate)
		c.gate = nil
	}
	c.mu.Unlock()
}

// tailCalls counts, in the bytes read so far, Calls with
// sendResultsTo.yourself and Returns with takeFromOtherQuestion.
func (c *tapConn) tailCalls(t *testing.T) (yourself, take int) {
	c.mu.Lock()
	got := bytes.Clone(c.got)
	c.mu.Unlock()
	dec := capnp.NewDecoder(bytes.NewReader(got))
	dec.MaxMessageSize = 128 << 20
	for {
		msg, err := dec.Decode()
		if err != nil {
			return yourself, take
		}
		m, err := rpccp.ReadRootMessage(msg)
		if err != nil {
			t.Fatalf("undecodable message from the peer: %v", err)
		}
		switch m.Which() {
		case rpccp.Message_Which_call:
			if c, err := m.Call(); err == nil && c.SendResultsTo().Which() == rpccp.Call_sendResultsTo_Which_yourself {
				yourself++
			}
		case rpccp.Message_Which_return:
			if r, err := m.Return(); err == nil && r.Which() == rpccp.Return_Which_takeFromOtherQuestion {
				take++
			}
		}
	}
}

// TestTailCallFromCpp: when the C++ reference forwards a call it received
// from us to a capability we host (here a call pipelined on getHeld's
// result, which is our own object), RpcClient::call makes a tail call: it
// sends us a Call with sendResultsTo.yourself and answers our question
// with Return.takeFromOtherQuestion. The call must reach our object once,
// its results must come back to the original caller, and everything must
// be released afterwards on both sides.
func TestTailCallFromCpp(t *testing.T) {
	requireCpp(t)
	for _, transport := range transports {
		t.Run(transport, func(t *testing.T) {
			ctx := testCtx(t, 20*time.Second)
			srv := startCppServer(t, ctx, transport)
			network, address, err := unix.ParseAddr(srv.addr)
			if err != nil {
				t.Fatal(err)
			}
			var d net.Dialer
			nc, err := d.DialContext(ctx, network, address)
			if err != nil {
				t.Fatalf("dial %s: %v", srv.addr, err)
			}
			tap := &tapConn{Conn: nc}
			conn := core.NewConn(tap, &core.Options{Logger: testLogger(t)})
			defer conn.Close()
			boot := testcapnp.Test(conn.Bootstrap(ctx))
			defer boot.Release()
			live := new(testimpl.Live)
			local := testimpl.New("go-local", live)
			lc := local.Client()
			hf, release := boot.Hold(ctx, func(p testcapnp.Test_hold_Params) error { return p.SetCap(lc.AddRef()) })
			if _, err := hf.Struct(); err != nil {
				t.Fatalf("hold: %v", err)
			}
			release()
			// Pipelined on getHeld's result, which is our own object: C++
			// forwards both calls back to us. getHeld's Return is held back
			// until both calls are sent, so that they are pipelined rather
			// than made on the local object the Return names. (gf.Cap() is
			// taken once: go-capnp v3.1.0-alpha.2's Future.Client leaves the
			// promise locked when asked twice for the same unresolved
			// capability.)
			tap.pause()
			defer tap.resume()
			gf, releaseGet := boot.GetHeld(ctx, nil)
			held := gf.Cap()
			sf, releaseSeq := held.Seq(ctx, func(p testcapnp.Test_seq_Params) error { p.SetN(42); return nil })
			nf, releaseName := held.Name(ctx, nil)
			tap.resume()
			done := make(chan error, 1)
			go func() {
				_, err := sf.Struct()
				if err != nil {
					err = fmt.Errorf("seq(42): %w", err)
				} else {
					var res testcapnp.Test_name_Results
					if res, err = nf.Struct(); err != nil {
						err = fmt.Errorf("name(): %w", err)
					} else if n, _ := res.Name(); n != "go-local" {
						err = fmt.Errorf("name() = %q; want go-local", n)
					}
				}
				done <- err
			}()
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("getHeld().seq(42), getHeld().name(), pipelined: %v", err)
				}
			case <-conn.Done():
				t.Fatalf("the connection ended during calls C++ forwarded back to us: %v", conn.Err())
			case <-ctx.Done():
				t.Fatal("getHeld().seq(42), getHeld().name(), pipelined: still pending")
			}
			releaseName()
			releaseSeq()
			releaseGet()
			if log := local.Log(); !slices.Equal(log, []uint32{42}) {
				t.Errorf("go-local's seq log = %v; want [42]: the forwarded call must reach our object exactly once", log)
			}
			yourself, take := tap.tailCalls(t)
			t.Logf("C++ sent %d Calls with sendResultsTo.yourself and %d Returns with takeFromOtherQuestion", yourself, take)
			if yourself == 0 || take == 0 {
				t.Errorf("C++ sent %d sendResultsTo.yourself Calls and %d takeFromOtherQuestion Returns; this test means to exercise tail calls (did the C++ forwarding change?)", yourself, take)
			}

			// Everything goes back to the baseline, while connected.
			df, releaseDrop := boot.DropHeld(ctx, nil)
			if _, err := df.Struct(); err != nil {
				t.Errorf("dropHeld: %v", err)
			}
			releaseDrop()
			lc.Release()
			if err := live.WaitZero(ctx); err != nil {
				t.Errorf("C++ still holds go-local: %d Go objects live", live.Count())
			}
			if _, err := srv.waitStats(ctx, "C++ live objects back to 1", func(s cppStats) bool { return s.Live == 1 }); err != nil {
				t.Error(err)
			}
			boot.Release()
			if err := waitConnStats(ctx, conn, func(s core.Stats) bool { return s.IsZero() }); err != nil {
				t.Errorf("our tables after releasing everything: %v", err)
			}
		})
	}
}
