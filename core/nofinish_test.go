package core_test

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testnative"
)

// Return.noFinishNeeded: results without capabilities are dropped at the
// Return, and the caller sends no Finish. A peer that predates the flag
// sends its Finish anyway, and calls pipelined on the dropped results
// before the caller saw the Return fail as they would have; neither is a
// protocol violation.
func TestNoFinishNeeded(t *testing.T) {
	a, b := net.Pipe()
	root, _ := testnative.New("root", nil)
	server := core.NewConn(b, &core.Options{BootstrapClient: root})
	defer server.Close()
	p := &rawPeer{t: t, c: a, enc: capnp.NewEncoder(a), dec: capnp.NewDecoder(a)}
	defer a.Close()
	next := func() rpccp.Message {
		t.Helper()
		m, err := p.recv()
		if err != nil {
			t.Fatalf("receive: %v", err)
		}
		if m.Which() != rpccp.Message_Which_return {
			reason := ""
			if ab, err := m.Abort(); err == nil {
				reason, _ = ab.Reason()
			}
			t.Fatalf("got %v %q, want a Return", m.Which(), reason)
		}
		return m
	}
	finish := func(qid uint32) {
		p.send(func(m rpccp.Message) error {
			f, err := m.NewFinish()
			f.SetQuestionId(qid)
			f.SetReleaseResultCaps(false) // keep the bootstrap capability
			return err
		})
	}
	echoArgs := func(pl rpccp.Payload) error {
		st, err := capnp.NewStruct(pl.Segment(), capnp.ObjectSize{PointerCount: 1})
		if err == nil {
			err = st.SetData(0, []byte("hello"))
		}
		if err == nil {
			err = pl.SetContent(st.ToPtr())
		}
		return err
	}
	noArgs := func(rpccp.Payload) error { return nil }

	p.send(func(m rpccp.Message) error {
		bs, err := m.NewBootstrap()
		bs.SetQuestionId(0)
		return err
	})
	boot, _ := next().Return()
	if boot.NoFinishNeeded() {
		t.Fatal("the bootstrap Return, which carries a capability, says no Finish is needed")
	}
	res, _ := boot.Results()
	caps, _ := res.CapTable()
	export := caps.At(0).SenderHosted()
	finish(0)

	// echo: plain data, dropped at the Return.
	p.call(1, export, -1, 0, echoArgs)
	ret, _ := next().Return()
	if ret.AnswerId() != 1 || !ret.NoFinishNeeded() {
		t.Fatalf("echo Return %d: noFinishNeeded %v, want true", ret.AnswerId(), ret.NoFinishNeeded())
	}
	if s := server.Stats(); s.Answers != 0 {
		t.Errorf("server keeps %d answers after a Return that needs no Finish", s.Answers)
	}
	finish(1) // an older peer's Finish: ignored

	// A call pipelined on results the server already dropped.
	p.call(2, export, -1, 0, echoArgs)
	if ret, _ := next().Return(); !ret.NoFinishNeeded() {
		t.Fatal("second echo needs a Finish")
	}
	p.call(3, 0, 2, 4, noArgs) // name() on field 5 of echo's results
	ret, _ = next().Return()
	if ret.AnswerId() != 3 || ret.Which() != rpccp.Return_Which_exception {
		t.Fatalf("pipelined call on dropped results: Return %d is %v, want an exception", ret.AnswerId(), ret.Which())
	}
	e, _ := ret.Exception()
	if reason, _ := e.Reason(); !strings.Contains(reason, "without capabilities") {
		t.Errorf("pipelined call on dropped results failed with %q", reason)
	}
	finish(3) // an exception keeps its answer until Finish

	// The id of a dropped answer is free again, with no Finish.
	p.call(2, export, -1, 0, echoArgs)
	if ret, _ := next().Return(); ret.AnswerId() != 2 || ret.Which() != rpccp.Return_Which_results {
		t.Fatalf("reused question id 2: Return %d is %v", ret.AnswerId(), ret.Which())
	}

	// An exception needs its Finish: calls pipelined on it must fail with it.
	p.call(4, export, -1, 1, noArgs) // fail
	if ret, _ := next().Return(); ret.Which() != rpccp.Return_Which_exception || ret.NoFinishNeeded() {
		t.Fatalf("fail: Return is %v with noFinishNeeded %v, want an exception that needs Finish", ret.Which(), ret.NoFinishNeeded())
	}
	if s := server.Stats(); s.Answers != 1 {
		t.Errorf("server keeps %d answers, want the exception's", s.Answers)
	}
	finish(4)

	// Finish for an id that was dropped and already finished once is a
	// violation, as for any unknown question.
	finish(1)
	for {
		m, err := p.recv()
		if err != nil {
			t.Fatal("connection ended with no Abort after a second Finish")
		}
		if m.Which() == rpccp.Message_Which_abort {
			ab, _ := m.Abort()
			if reason, _ := ab.Reason(); !strings.Contains(reason, "finish for unknown question 1") {
				t.Errorf("Abort %q, want one for the unknown question", reason)
			}
			break
		}
	}
	select {
	case <-server.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("server did not shut down after the violation")
	}
}

// Between captp connections the caller sends no Finish for such results:
// the server's answer table is empty right after each call returns.
func TestNoFinishNeededBetweenCaptp(t *testing.T) {
	a, b := net.Pipe()
	root, _ := testnative.New("root", nil)
	server := core.NewConn(b, &core.Options{BootstrapClient: root})
	client := core.NewConn(a, nil)
	defer func() { client.Close(); server.Close(); <-client.Done(); <-server.Done() }()
	ctx := context.Background()
	boot := testnative.Test{Client: client.Bootstrap(ctx)}
	defer boot.Release()
	for i := range 20 {
		c := boot.Echo(ctx, []byte("x"))
		if _, err := c.Data(ctx); err != nil {
			t.Fatal(err)
		}
		// Dropped before the Return was written: a Finish would come
		// only after this Release. Only the bootstrap answer, which
		// carries a capability, is kept.
		if s := server.Stats(); s.Answers > 1 {
			t.Fatalf("echo %d: server keeps %d answers once it has returned", i, s.Answers)
		}
		c.Release()
	}
	if s := client.Stats(); s.Questions > 1 {
		t.Errorf("client keeps %d questions", s.Questions)
	}
}

// A peer that neither finishes nor reuses its question ids cannot grow
// the set of dropped ids without bound: past the answer table's limit,
// answers wait for their Finish again.
func TestNoFinishNeededBounded(t *testing.T) {
	a, b := net.Pipe()
	root, _ := testnative.New("root", nil)
	server := core.NewConn(b, &core.Options{BootstrapClient: root, Limits: core.Limits{MaxAnswers: 1}})
	defer server.Close()
	p := &rawPeer{t: t, c: a, enc: capnp.NewEncoder(a), dec: capnp.NewDecoder(a)}
	defer a.Close()
	p.send(func(m rpccp.Message) error {
		bs, err := m.NewBootstrap()
		bs.SetQuestionId(0)
		return err
	})
	m, err := p.recv()
	if err != nil {
		t.Fatal(err)
	}
	boot, _ := m.Return()
	res, _ := boot.Results()
	caps, _ := res.CapTable()
	export := caps.At(0).SenderHosted()
	noArgs := func(rpccp.Payload) error { return nil }
	var flags []bool
	for qid := uint32(1); qid <= 6; qid++ {
		p.call(qid, export, -1, 12, noArgs) // seq
		m, err := p.recv()
		if err != nil {
			t.Fatalf("call %d: %v", qid, err)
		}
		ret, _ := m.Return()
		flags = append(flags, ret.NoFinishNeeded())
	}
	// MaxAnswers 1: the answer table holds 4 unfinished; so does the set.
	want := []bool{true, true, true, true, false, false}
	for i := range want {
		if flags[i] != want[i] {
			t.Fatalf("noFinishNeeded of calls 1–6: %v, want %v", flags, want)
		}
	}
}
