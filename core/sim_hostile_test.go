package core

// Hostile peers in the simulation: an adversary attached to one honest vat
// plays along for a while, then sends one protocol-valid but adversarial
// message. The honest vat must Abort that connection with a reason, and
// every other invariant of the run (E-order, no hang, no leak, no
// unexpected Abort between honest vats) must still hold.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"strings"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"

	"github.com/captp-go/captp/internal/testcapnp"
)

// An attack builds one adversarial message, given what the adversary has
// legitimately learned so far (bootstrap export id, question ids used).
type attack struct {
	name  string
	build func(m rpccp.Message, adv *adversary) error
}

var attacks = []attack{
	{"call to a forged import id", func(m rpccp.Message, adv *adversary) error {
		call, err := m.NewCall()
		if err != nil {
			return err
		}
		call.SetQuestionId(adv.nextQ())
		call.SetInterfaceId(testcapnp.Test_TypeID)
		call.SetMethodId(12)
		mt, err := call.NewTarget()
		if err != nil {
			return err
		}
		mt.SetImportedCap(adv.bootExport + 1 + uint32(adv.rng.Intn(1000)))
		_, err = call.NewParams()
		return err
	}},
	{"release of more references than held", func(m rpccp.Message, adv *adversary) error {
		rel, err := m.NewRelease()
		if err != nil {
			return err
		}
		rel.SetId(adv.bootExport)
		rel.SetReferenceCount(2 + uint32(adv.rng.Intn(100)))
		return nil
	}},
	{"disembargo for an embargo never sent", func(m rpccp.Message, adv *adversary) error {
		d, err := m.NewDisembargo()
		if err != nil {
			return err
		}
		mt, err := d.NewTarget()
		if err != nil {
			return err
		}
		mt.SetImportedCap(adv.bootExport)
		d.Context().SetReceiverLoopback(uint32(adv.rng.Intn(50)))
		return nil
	}},
	{"senderLoopback disembargo on a capability that is not a resolved promise", func(m rpccp.Message, adv *adversary) error {
		d, err := m.NewDisembargo()
		if err != nil {
			return err
		}
		mt, err := d.NewTarget()
		if err != nil {
			return err
		}
		mt.SetImportedCap(adv.bootExport)
		d.Context().SetSenderLoopback(7)
		return nil
	}},
	{"return for a question never asked", func(m rpccp.Message, adv *adversary) error {
		ret, err := m.NewReturn()
		if err != nil {
			return err
		}
		ret.SetAnswerId(1000 + uint32(adv.rng.Intn(1000)))
		_, err = ret.NewResults()
		return err
	}},
	{"finish for a question never asked", func(m rpccp.Message, adv *adversary) error {
		f, err := m.NewFinish()
		if err != nil {
			return err
		}
		f.SetQuestionId(5000 + uint32(adv.rng.Intn(1000)))
		return nil
	}},
	{"call reusing a question id still in use", func(m rpccp.Message, adv *adversary) error {
		call, err := m.NewCall()
		if err != nil {
			return err
		}
		call.SetQuestionId(adv.bootQuestion) // never finished
		call.SetInterfaceId(testcapnp.Test_TypeID)
		call.SetMethodId(12)
		mt, err := call.NewTarget()
		if err != nil {
			return err
		}
		mt.SetImportedCap(adv.bootExport)
		_, err = call.NewParams()
		return err
	}},
	{"capability descriptor naming an export it was never given", func(m rpccp.Message, adv *adversary) error {
		call, err := m.NewCall()
		if err != nil {
			return err
		}
		call.SetQuestionId(adv.nextQ())
		call.SetInterfaceId(testcapnp.Test_TypeID)
		call.SetMethodId(6) // hold(cap)
		mt, err := call.NewTarget()
		if err != nil {
			return err
		}
		mt.SetImportedCap(adv.bootExport)
		params, err := call.NewParams()
		if err != nil {
			return err
		}
		caps, err := params.NewCapTable(1)
		if err != nil {
			return err
		}
		caps.At(0).SetReceiverHosted(adv.bootExport + 1 + uint32(adv.rng.Intn(1000)))
		return nil
	}},
}

// adversary is a raw peer of one honest vat's Conn.
type adversary struct {
	rng          interface{ Intn(int) int }
	conn         *Conn // the honest side
	bootQuestion uint32
	bootExport   uint32
	q            uint32
}

func (a *adversary) nextQ() uint32 { a.q++; return a.q }

func (a *adversary) send(build func(rpccp.Message) error) error {
	msg, m, err := newMessage()
	if err != nil {
		return err
	}
	defer msg.Release()
	if err := build(m); err != nil {
		return err
	}
	out, err := appendFrame(nil, msg)
	if err != nil {
		return err
	}
	in, err := newFrameReader(strings.NewReader(string(out)), a.conn.lim).readMessage()
	if err != nil {
		return err
	}
	a.conn.handleMessage(in)
	return nil
}

// TestSimHostile runs simulations with an adversary attached to vat 0.
func TestSimHostile(t *testing.T) {
	seeds := *simSeeds / 3
	for i := 0; i < seeds; i++ {
		seed := int64(5000 + i)
		at := attacks[i%len(attacks)]
		if err := runHostile(t, seed, at); err != nil {
			t.Fatalf("seed %d, attack %q: %v", seed, at.name, err)
		}
	}
}

func runHostile(t *testing.T, seed int64, at attack) error {
	// Odd seeds with native objects and calls among the honest vats'.
	cfg := simConfig{Seed: seed, Vats: 2 + int(seed%3), Steps: *simSteps / 2, Native: seed%2 == 1}
	var adv *adversary
	var attackErr error
	attackStep := int(seed%int64(cfg.Steps/2)) + 1
	cfg.onStep = func(s *sim) {
		switch {
		case s.step == 0:
			// The adversary connects to vat 0 and bootstraps, honestly.
			c := newConn(nil, &Options{BootstrapClient: s.newObject(0, "bootstrap for the adversary")})
			c.manual = true
			adv = &adversary{rng: s.rng, conn: c, bootQuestion: 0}
			s.dead = append(s.dead, c) // polled with the rest
			attackErr = adv.send(func(m rpccp.Message) error {
				b, err := m.NewBootstrap()
				if err != nil {
					return err
				}
				b.SetQuestionId(adv.bootQuestion)
				return nil
			})
			adv.bootExport = 0 // the honest vat's first export
		case s.step == attackStep:
			s.logf("adversary: %s", at.name)
			attackErr = adv.send(func(m rpccp.Message) error { return at.build(m, adv) })
		}
	}
	f := runSim(cfg)
	if attackErr != nil {
		return fmt.Errorf("building the attack: %w", attackErr)
	}
	if f != nil {
		return fmt.Errorf("honest vats broke: %v\n%s", f, lastLines(f.Trace, 40))
	}
	select {
	case <-adv.conn.Done():
	default:
		return errors.New("the honest vat kept the adversary's connection open")
	}
	err := adv.conn.Err()
	if err == nil || !strings.Contains(err.Error(), "protocol violation") {
		return fmt.Errorf("the adversary's connection ended with %v, want a protocol violation", err)
	}
	// The Abort the honest vat sent names the violation.
	abort, rerr := lastAbort(adv.conn.takeOutput())
	if rerr != nil || !strings.Contains(abort, "protocol violation") {
		return fmt.Errorf("no Abort with a reason reached the adversary (got %q, %v)", abort, rerr)
	}
	if st := adv.conn.Stats(); !st.IsZero() {
		return fmt.Errorf("the aborted connection still holds %v", st)
	}
	return nil
}

// lastAbort decodes the frames an honest Conn sent and returns the reason
// of its final Abort.
func lastAbort(out []byte) (string, error) {
	fr := newFrameReader(strings.NewReader(string(out)), DefaultLimits)
	reason := ""
	for {
		msg, err := fr.readMessage()
		if errors.Is(err, io.EOF) {
			return reason, nil
		}
		if err != nil {
			return reason, err
		}
		m, err := rpccp.ReadRootMessage(msg)
		if err == nil && m.Which() == rpccp.Message_Which_abort {
			e, _ := m.Abort()
			reason, _ = e.Reason()
		}
	}
}

// A peer that sends 200,000 calls and never reads a reply must not grow
// the server's memory past its configured bounds: the server answers what
// it accepted, stops reading once its replies fill the outbound queue,
// and aborts a peer that leaves too many calls unfinished.
func TestFloodWithoutReadingIsBounded(t *testing.T) {
	if testing.Short() {
		t.Skip("SKIPPED in -short mode: sends 200,000 calls")
	}
	const calls = 200000
	lim := Limits{MaxAnswers: 1024, MaxQueuedBytes: 1 << 20}
	peer, server := floodPipe()
	srv := NewConn(server, &Options{BootstrapClient: capnp.Client(testcapnp.Test_ServerToClient(&floodTarget{})), Limits: lim})
	defer srv.Close()

	var before runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)

	// Write calls until the server stops reading (backpressure) or aborts.
	sent := make(chan int, 1)
	go func() {
		n := 0
		defer func() { sent <- n }()
		frame := func(build func(rpccp.Message) error) []byte {
			msg, m, _ := newMessage()
			defer msg.Release()
			if build(m) != nil {
				return nil
			}
			b, _ := appendFrame(nil, msg)
			return b
		}
		if _, err := peer.Write(frame(func(m rpccp.Message) error {
			b, err := m.NewBootstrap()
			b.SetQuestionId(0)
			return err
		})); err != nil {
			return
		}
		for i := 1; i <= calls; i++ {
			b := frame(func(m rpccp.Message) error {
				call, err := m.NewCall()
				if err != nil {
					return err
				}
				call.SetQuestionId(uint32(i))
				call.SetInterfaceId(testcapnp.Test_TypeID)
				call.SetMethodId(12)
				pa, err := call.NewTarget()
				if err != nil {
					return err
				}
				p, err := pa.NewPromisedAnswer()
				if err != nil {
					return err
				}
				p.SetQuestionId(0)
				params, err := call.NewParams()
				if err != nil {
					return err
				}
				s, err := capnp.NewStruct(params.Segment(), capnp.ObjectSize{DataSize: 8})
				if err != nil {
					return err
				}
				s.SetUint32(0, uint32(i))
				return params.SetContent(s.ToPtr())
			})
			if _, err := peer.Write(b); err != nil {
				return
			}
			n = i
		}
	}()
	var n int
	select {
	case n = <-sent:
	case <-time.After(5 * time.Second):
		// Blocked: the server stopped reading. That is the backpressure.
	}
	var after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&after)
	grown := int64(after.HeapInuse) - int64(before.HeapInuse)
	st := srv.Stats()
	t.Logf("peer wrote %d of %d calls before being stopped; server heap grew %.1f MiB; tables %v; conn ended: %v",
		n, calls, float64(grown)/(1<<20), st, srv.Err())
	// Bound: the outbound queue, plus the answers the limits allow.
	const bound = 32 << 20
	if grown > bound {
		t.Fatalf("server heap grew %d bytes under a flood, more than %d", grown, bound)
	}
	if st.Answers > 4*lim.MaxAnswers {
		t.Fatalf("server holds %d answers, more than 4×MaxAnswers (%d)", st.Answers, 4*lim.MaxAnswers)
	}
	if n == calls && srv.Err() == nil {
		t.Fatalf("the server read all %d calls while its replies went unread: no backpressure", calls)
	}
	peer.Close()
	<-srv.Done()
}

type floodTarget struct{}

func (floodTarget) Echo(context.Context, testcapnp.Test_echo) error         { return nil }
func (floodTarget) Fail(context.Context, testcapnp.Test_fail) error         { return nil }
func (floodTarget) Block(context.Context, testcapnp.Test_block) error       { return nil }
func (floodTarget) Child(context.Context, testcapnp.Test_child) error       { return nil }
func (floodTarget) Name(context.Context, testcapnp.Test_name) error         { return nil }
func (floodTarget) CallBack(context.Context, testcapnp.Test_callBack) error { return nil }
func (floodTarget) Hold(context.Context, testcapnp.Test_hold) error         { return nil }
func (floodTarget) DropHeld(context.Context, testcapnp.Test_dropHeld) error { return nil }
func (floodTarget) GetHeld(context.Context, testcapnp.Test_getHeld) error   { return nil }
func (floodTarget) Promise(context.Context, testcapnp.Test_promise) error   { return nil }
func (floodTarget) ResolvePromise(context.Context, testcapnp.Test_resolvePromise) error {
	return nil
}
func (floodTarget) BreakPromise(context.Context, testcapnp.Test_breakPromise) error { return nil }
func (floodTarget) Seq(ctx context.Context, call testcapnp.Test_seq) error {
	res, err := call.AllocResults()
	if err == nil {
		res.SetN(call.Args().N())
	}
	return err
}
func (floodTarget) Log(context.Context, testcapnp.Test_log) error { return nil }

// floodEnd is one end of an in-memory full-duplex stream.
type floodEnd struct {
	*io.PipeReader
	*io.PipeWriter
}

func (e floodEnd) Close() error {
	e.PipeReader.Close()
	return e.PipeWriter.Close()
}

func floodPipe() (floodEnd, floodEnd) {
	ar, bw := io.Pipe()
	br, aw := io.Pipe()
	return floodEnd{ar, aw}, floodEnd{br, bw}
}
