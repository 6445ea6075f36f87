package core

// Deterministic multi-vat simulation.
//
// N vats live in one goroutine. Every pair of vats is linked by two manual
// Conns whose frames sit in queues until a seeded scheduler delivers them,
// one message at a time, in an order it chooses. Between deliveries the
// vats' users act at random: bootstrap, call, pipeline, pass and return
// capabilities, create, resolve and break promises, drop references,
// cancel calls, break connections. After every step the invariants are
// checked; at the end everything is settled and dropped and every table
// must be empty.

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"
	"testing"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/exc"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"

	"github.com/captp-go/captp/internal/callqueue"
	"github.com/captp-go/captp/internal/testcapnp"
)

var (
	simSeeds     = flag.Int("sim.seeds", 300, "number of simulation seeds TestSim runs (CI budget; raise it for a soak)")
	simSteps     = flag.Int("sim.steps", 300, "user actions and deliveries per simulated run")
	simFirstSeed = flag.Int64("sim.seed", 1, "first simulation seed")
	simReproDir  = flag.String("sim.repro", "", "directory for reproducer test files of failing seeds (default: none written)")
)

type simConfig struct {
	Seed        int64
	Vats        int
	Steps       int
	SkipEmbargo bool
	// Level3 gives every vat a Vat on a simulated Network: capabilities
	// passed on are handed off (most of the time; the network declines
	// at random) instead of proxied.
	Level3 bool
	// Thieves (with Level3): now and then a vat presents the completion
	// of a handoff meant for another vat; it must get nothing.
	Thieves bool
	// Strand: now and then a vat replaces a handle by a stranded view of
	// it, a capability pipelined on go-capnp results that held it, freed
	// since (pipelineOnFreedResults): go-capnp never switches such a view
	// over when the handle's promise resolves (held_hook_test.go).
	Strand bool
	// Native: half the objects are native (NewClient with a Handler), and
	// half the calls go through the native Call, so that native answers,
	// questions and pipelines meet everything else.
	Native bool

	// onStep, if set, runs before each step's action (the hostile test
	// attaches its adversary here).
	onStep func(*sim)
}

// simFailure is an invariant violation found at Step (Step == Steps for
// the final checks).
type simFailure struct {
	Step  int
	What  string
	Trace []string
}

func (f *simFailure) Error() string { return fmt.Sprintf("step %d: %s", f.Step, f.What) }

type sim struct {
	cfg   simConfig
	rng   *rand.Rand
	vats  []*simVat
	links []*simLink
	trace []string
	step  int
	fail  *simFailure

	dead []*Conn // conns of broken links: forwarded calls may still finish there

	nextHandle int
	nextObject int
	objects    []*simObject // every object ever made, for the leak check

	nets     []*simNetwork        // Level3: each vat's network
	peerOf   map[*Conn]simConnEnd // Level3: which vats a Conn joins
	nonce    int
	handoffs []simHandoff // Level3: every introduction
	thiefRng *rand.Rand   // Thieves: a stream of its own, so honest runs replay unchanged
	stolen   []simStolen  // Thieves: what thieves got; it must all be broken
}

// simConnEnd names the two vats of a simulated connection, from one end.
type simConnEnd struct{ me, peer int }

type simVat struct {
	id      int
	handles []*simHandle // references the vat's user holds
	calls   []*simCall   // calls the user made and has not released
}

// A simHandle is one reference a user holds. Calls through it carry its
// id and a sequence number, so receivers can check E-order per handle.
type simHandle struct {
	id     int
	client capnp.Client
	seq    uint32
	desc   string
}

// A simCall is a call the user made: through go-capnp's SendCall
// (future, release) or, with simConfig.Native, sometimes through the
// native Call (pending).
type simCall struct {
	desc    string
	future  *capnp.Future
	release capnp.ReleaseFunc
	pending *PendingCall
	cancel  context.CancelFunc
}

func (c *simCall) done() <-chan struct{} {
	if c.pending != nil {
		return c.pending.Done()
	}
	return c.future.Done()
}

func (c *simCall) releaseResults() {
	if c.pending != nil {
		c.pending.Release()
		return
	}
	c.release()
}

// pipelined returns a new reference to the capability in the results'
// first pointer field, usable before they arrive.
func (c *simCall) pipelined() capnp.Client {
	if c.pending != nil {
		return c.pending.Pipeline(0)
	}
	return c.future.Field(0, nil).Client().AddRef()
}

// A simLink is the connection between two vats: a Conn at each end and
// the frames in flight each way.
type simLink struct {
	a, b     int
	ca, cb   *Conn
	toB, toA [][]byte
	gen      int // how many times the link was rebuilt
}

func (l *simLink) conn(vat int) *Conn {
	if vat == l.a {
		return l.ca
	}
	return l.cb
}

func runSim(cfg simConfig) (failure *simFailure) {
	testSkipEmbargo = cfg.SkipEmbargo
	defer func() { testSkipEmbargo = false }()
	s := &sim{cfg: cfg, rng: rand.New(rand.NewSource(cfg.Seed))}
	defer func() {
		if r := recover(); r != nil {
			failure = &simFailure{Step: s.step, What: fmt.Sprintf("panic: %v\n%s", r, debug.Stack()), Trace: s.trace}
		}
	}()
	for i := 0; i < cfg.Vats; i++ {
		s.vats = append(s.vats, &simVat{id: i})
		if cfg.Level3 {
			n := &simNetwork{s: s, vat: i}
			n.v = NewVat(n)
			s.nets = append(s.nets, n)
		}
	}
	s.peerOf = make(map[*Conn]simConnEnd)
	if cfg.Level3 && cfg.Thieves {
		s.thiefRng = rand.New(rand.NewSource(cfg.Seed ^ 0x7e1f))
	}
	for i := 0; i < cfg.Vats; i++ {
		for j := i + 1; j < cfg.Vats; j++ {
			l := &simLink{a: i, b: j}
			s.connect(l)
			s.links = append(s.links, l)
		}
	}
	for s.step = 0; s.step < cfg.Steps && s.fail == nil; s.step++ {
		s.pump()
		if cfg.onStep != nil {
			cfg.onStep(s)
		}
		if s.thiefRng != nil && s.thiefRng.Intn(40) == 0 {
			s.steal()
		}
		s.act()
		s.pump()
		s.checkStep()
	}
	if s.fail == nil {
		s.step = cfg.Steps
		s.finish()
	}
	s.teardown()
	return s.fail
}

func (s *sim) logf(format string, args ...any) {
	s.trace = append(s.trace, fmt.Sprintf("%4d  ", s.step)+fmt.Sprintf(format, args...))
}

func (s *sim) failf(format string, args ...any) {
	if s.fail == nil {
		s.fail = &simFailure{Step: s.step, What: fmt.Sprintf(format, args...), Trace: s.trace}
	}
}

func (s *sim) connect(l *simLink) {
	oa, ob := &Options{BootstrapClient: s.newObject(l.a, "bootstrap")}, &Options{BootstrapClient: s.newObject(l.b, "bootstrap")}
	if s.cfg.Level3 {
		oa.Vat, ob.Vat = s.nets[l.a].v, s.nets[l.b].v
	}
	l.ca = newConn(nil, oa)
	l.cb = newConn(nil, ob)
	l.ca.manual, l.cb.manual = true, true
	l.toA, l.toB = nil, nil
	s.peerOf[l.ca], s.peerOf[l.cb] = simConnEnd{l.a, l.b}, simConnEnd{l.b, l.a}
}

// pump moves every Conn's output into its link's queues and lets a Conn
// whose peer has gone see end of stream once it has read everything.
func (s *sim) pump() {
	for _, l := range s.links {
		l.toB = append(l.toB, splitFrames(l.ca.takeOutput())...)
		l.toA = append(l.toA, splitFrames(l.cb.takeOutput())...)
		if isDone(l.ca) && len(l.toB) == 0 && !isDone(l.cb) {
			l.cb.shutdown(errors.New("peer closed the connection"), false)
		}
		if isDone(l.cb) && len(l.toA) == 0 && !isDone(l.ca) {
			l.ca.shutdown(errors.New("peer closed the connection"), false)
		}
	}
}

func isDone(c *Conn) bool {
	select {
	case <-c.Done():
		return true
	default:
		return false
	}
}

// splitFrames cuts a stream of whole frames into frames.
func splitFrames(b []byte) [][]byte {
	var frames [][]byte
	for len(b) >= 4 {
		nseg := int(binary.LittleEndian.Uint32(b)) + 1
		hdr := 4 + 4*nseg
		if hdr%8 != 0 {
			hdr += 4
		}
		size := hdr
		for i := 0; i < nseg; i++ {
			size += 8 * int(binary.LittleEndian.Uint32(b[4+4*i:]))
		}
		frames = append(frames, b[:size:size])
		b = b[size:]
	}
	return frames
}

// deliver hands the next frame in one direction of a link to its Conn.
func (s *sim) deliver(l *simLink, toB bool) {
	q, dst, from, to := &l.toA, l.ca, l.b, l.a
	if toB {
		q, dst, from, to = &l.toB, l.cb, l.a, l.b
	}
	frame := (*q)[0]
	*q = (*q)[1:]
	if isDone(dst) {
		return
	}
	msg, err := newFrameReader(bytes.NewReader(frame), dst.lim).readMessage()
	if err != nil {
		s.failf("vat %d sent vat %d an undecodable frame: %v", from, to, err)
		return
	}
	s.logf("deliver %d→%d %s", from, to, describe(msg))
	if !dst.handleMessage(msg) {
		// An honest peer never provokes an Abort.
		if err := dst.Err(); err != nil && !strings.Contains(err.Error(), "peer closed") {
			s.failf("vat %d's connection to vat %d ended: %v", to, from, err)
		}
	}
}

// act performs one scheduler step: a delivery, a poll, or a user action.
func (s *sim) act() {
	var dirs []func()
	for _, l := range s.links {
		if len(l.toB) > 0 {
			dirs = append(dirs, func() { s.deliver(l, true) })
		}
		if len(l.toA) > 0 {
			dirs = append(dirs, func() { s.deliver(l, false) })
		}
	}
	r := s.rng.Intn(100)
	switch {
	case r < 45 && len(dirs) > 0:
		dirs[s.rng.Intn(len(dirs))]()
	case r < 55:
		if !s.pollAll() {
			s.checkExportedPromisesResolved()
		}
	default:
		s.userAction(s.vats[s.rng.Intn(len(s.vats))])
	}
}

func (s *sim) pollAll() bool {
	moved := false
	for _, l := range s.links {
		moved = l.ca.poll() || moved
		moved = l.cb.poll() || moved
	}
	for _, c := range s.dead {
		moved = c.poll() || moved
	}
	return moved
}

func (s *sim) pickHandle(v *simVat) *simHandle {
	if len(v.handles) == 0 {
		return nil
	}
	return v.handles[s.rng.Intn(len(v.handles))]
}

func (s *sim) addHandle(v *simVat, c capnp.Client, desc string) *simHandle {
	s.nextHandle++
	h := &simHandle{id: s.nextHandle, client: c, desc: desc}
	v.handles = append(v.handles, h)
	s.logf("vat %d: h%d = %s", v.id, h.id, desc)
	return h
}

func (s *sim) userAction(v *simVat) {
	r := s.rng.Intn(100)
	h := s.pickHandle(v)
	switch {
	case s.cfg.Strand && h != nil && r >= 82 && r < 88: // instead of some drops
		// Replace h by the view, so that it is stranded if h was the last
		// client of its promise.
		i := slices.Index(v.handles, h)
		v.handles = slices.Delete(v.handles, i, i+1)
		s.addHandle(v, pipelineOnFreedResults(h.client), fmt.Sprintf("stranded view of h%d (replacing it)", h.id))
	case r < 10 || h == nil:
		peer := s.rng.Intn(len(s.vats) - 1)
		if peer >= v.id {
			peer++
		}
		l := s.link(v.id, peer)
		s.addHandle(v, l.conn(v.id).Bootstrap(context.Background()), fmt.Sprintf("bootstrap of vat %d (link gen %d)", peer, l.gen))
	case r < 40:
		s.callSeq(v, h)
	case r < 48:
		s.callReturningCap(v, h, "child")
	case r < 53:
		s.callReturningCap(v, h, "getHeld")
	case r < 60:
		s.callReturningCap(v, h, "promise")
	case r < 68:
		s.callWithCap(v, h, "hold")
	case r < 75:
		s.callWithCap(v, h, "resolvePromise")
	case r < 77:
		s.call(v, h, "breakPromise", testSend(11, "breakPromise", capnp.ObjectSize{PointerCount: 1}, func(p capnp.Struct) error {
			return testcapnp.Test_breakPromise_Params(p).SetReason("broken by the simulation")
		}))
	case r < 80:
		o := s.newObjectRef(v.id, "local")
		s.addHandle(v, o, "a new local object")
	case r < 88:
		i := slices.Index(v.handles, h)
		v.handles = slices.Delete(v.handles, i, i+1)
		s.logf("vat %d: drop h%d", v.id, h.id)
		h.client.Release()
	case r < 91:
		s.addHandle(v, h.client.AddRef(), fmt.Sprintf("copy of h%d", h.id))
	case r < 97:
		s.settleCall(v)
	case r < 98:
		s.localPromise(v)
	default:
		s.breakLink(s.links[s.rng.Intn(len(s.links))])
	}
}

func (s *sim) link(a, b int) *simLink {
	for _, l := range s.links {
		if (l.a == a && l.b == b) || (l.a == b && l.b == a) {
			return l
		}
	}
	panic("no link")
}

// testSend is the Send of a call to Test's method id, as capnpc-go's
// generated client makes it.
func testSend(id uint16, name string, size capnp.ObjectSize, place func(capnp.Struct) error) capnp.Send {
	send := capnp.Send{Method: capnp.Method{InterfaceID: testcapnp.Test_TypeID, MethodID: id, InterfaceName: "test.capnp:Test", MethodName: name}}
	if place != nil {
		send.ArgsSize, send.PlaceArgs = size, place
	}
	return send
}

func (s *sim) call(v *simVat, h *simHandle, desc string, send capnp.Send) *simCall {
	ctx, cancel := context.WithCancel(context.Background())
	c := &simCall{desc: fmt.Sprintf("h%d.%s", h.id, desc), cancel: cancel}
	if s.cfg.Native && s.rng.Intn(2) == 0 {
		p := Call(ctx, h.client, send)
		c.pending = &p
		c.desc += " natively"
	} else {
		ans, rel := h.client.SendCall(ctx, send)
		c.future, c.release = ans.Future(), rel
	}
	v.calls = append(v.calls, c)
	s.logf("vat %d: call %s", v.id, c.desc)
	return c
}

func (s *sim) callSeq(v *simVat, h *simHandle) {
	h.seq++
	n := uint32(h.id)<<16 | h.seq
	s.call(v, h, fmt.Sprintf("seq(%d)", h.seq), testSend(12, "seq", capnp.ObjectSize{DataSize: 8}, func(p capnp.Struct) error {
		testcapnp.Test_seq_Params(p).SetN(n)
		return nil
	}))
}

// callReturningCap calls a method whose result is a capability and keeps
// a pipelined reference to it as a new handle.
func (s *sim) callReturningCap(v *simVat, h *simHandle, method string) {
	var send capnp.Send
	switch method {
	case "child":
		send = testSend(3, "child", capnp.ObjectSize{PointerCount: 1}, func(p capnp.Struct) error {
			return testcapnp.Test_child_Params(p).SetName("child")
		})
	case "getHeld":
		send = testSend(8, "getHeld", capnp.ObjectSize{}, nil)
	default:
		send = testSend(9, "promise", capnp.ObjectSize{}, nil)
	}
	c := s.call(v, h, method+"()", send)
	s.addHandle(v, c.pipelined(), "pipelined result of "+c.desc)
}

// callWithCap passes another of the vat's references (or a new local
// object) as the argument.
func (s *sim) callWithCap(v *simVat, h *simHandle, method string) {
	// The reference is taken inside PlaceArgs: a call that never places
	// its arguments (on a null or broken capability) must not leak it.
	var arg func() capnp.Client
	var argDesc string
	if o := s.pickHandle(v); o != nil && s.rng.Intn(4) > 0 {
		arg, argDesc = o.client.AddRef, fmt.Sprintf("h%d", o.id)
	} else {
		vat := v.id
		arg, argDesc = func() capnp.Client { return s.newObjectRef(vat, "param") }, "new local object"
	}
	send := testSend(10, method, capnp.ObjectSize{PointerCount: 1}, func(p capnp.Struct) error {
		return testcapnp.Test_resolvePromise_Params(p).SetCap(testcapnp.Test(arg()))
	})
	if method == "hold" {
		send = testSend(6, method, capnp.ObjectSize{PointerCount: 1}, func(p capnp.Struct) error {
			return testcapnp.Test_hold_Params(p).SetCap(testcapnp.Test(arg()))
		})
	}
	s.call(v, h, method+"("+argDesc+")", send)
}

// settleCall releases one outstanding call: read if done, or cancel or
// just release it while it is still running.
func (s *sim) settleCall(v *simVat) {
	if len(v.calls) == 0 {
		return
	}
	i := s.rng.Intn(len(v.calls))
	c := v.calls[i]
	if s.rng.Intn(3) == 0 {
		s.logf("vat %d: cancel %s", v.id, c.desc)
		c.cancel()
		return
	}
	// Release only settled calls: go-capnp's release of a call queued on
	// a local promise waits for it, which one goroutine cannot do.
	select {
	case <-c.done():
	default:
		return
	}
	v.calls = slices.Delete(v.calls, i, i+1)
	s.logf("vat %d: release %s", v.id, c.desc)
	c.releaseResults()
	c.cancel()
}

// localPromise makes a vat-local promise, hands it out as a handle and
// resolves it at once to another handle (or breaks it).
func (s *sim) localPromise(v *simVat) {
	p := newSimPromise()
	h := s.addHandle(v, p.first.AddRef(), "local promise")
	if o := s.pickHandle(v); o != nil && o != h && s.rng.Intn(3) > 0 {
		s.logf("vat %d: resolve local promise h%d to h%d", v.id, h.id, o.id)
		p.settle(o.client, nil)
	} else {
		s.logf("vat %d: break local promise h%d", v.id, h.id)
		p.settle(capnp.Client{}, errors.New("local promise broken"))
	}
}

func (s *sim) breakLink(l *simLink) {
	s.logf("break link %d–%d", l.a, l.b)
	l.ca.shutdown(errors.New("link broken by the simulation"), false)
	l.cb.shutdown(errors.New("link broken by the simulation"), false)
	s.dead = append(s.dead, l.ca, l.cb)
	l.gen++
	s.connect(l)
}

// checkStep checks the invariants that hold after every step.
func (s *sim) checkStep() {
	for _, l := range s.links {
		for _, c := range []*Conn{l.ca, l.cb} {
			if err := c.check(); err != nil {
				s.failf("table invariant: %v", err)
			}
		}
	}
}

// checkExportedPromisesResolved fails the run if a connection exports as
// unresolved a promise that has settled, when polling found nothing to
// do: its watch is gone or never sees it, and the peer would wait for
// the Resolve for good.
func (s *sim) checkExportedPromisesResolved() {
	for _, l := range s.links {
		for _, c := range []*Conn{l.ca, l.cb} {
			if isDone(c) {
				continue
			}
			c.mu.Lock()
			var pending []*export
			for _, id := range sortedKeys(c.exports) {
				if e := c.exports[id]; e.promise && !e.resolved && e.vine == nil {
					pending = append(pending, e)
				}
			}
			c.unlock()
			for _, e := range pending {
				snap := e.client.Snapshot()
				h, stuck := stuckOn(snap)
				settled := !snap.IsPromise() || (stuck && h.isSettled())
				desc := snap.String()
				snap.Release()
				if settled {
					s.failf("link %d–%d: export %d is a settled promise (%s) its peer never got a Resolve for", l.a, l.b, e.id, desc)
				}
			}
		}
	}
}

// finish settles everything, then drops everything, and checks that no
// call hangs and no table holds anything.
func (s *sim) finish() {
	// Break every promise an object still owes and forget held
	// capabilities (a cycle of holds is beyond reference counting), until
	// messages still in flight stop making new ones.
	s.settleAndDrain()
	for _, v := range s.vats {
		for _, c := range v.calls {
			select {
			case <-c.done():
			default:
				s.failf("vat %d: call %s never settled", v.id, c.desc)
			}
		}
	}
	if s.fail != nil {
		return // releasing an unsettled local call would wait forever
	}
	s.checkStolen()
	for _, v := range s.vats {
		for _, c := range v.calls {
			c.releaseResults()
			c.cancel()
		}
		v.calls = nil
		for _, h := range v.handles {
			h.client.Release()
		}
		v.handles = nil
	}
	s.settleAndDrain()
	if s.fail != nil {
		return
	}
	for _, n := range s.nets {
		if p, e := n.v.stats(); p != 0 || e != 0 {
			s.failf("vat %d still has %d provisions and %d Accepts waiting for one after everything was dropped", n.vat, p, e)
		}
	}
	for _, l := range s.links {
		for _, c := range []*Conn{l.ca, l.cb} {
			if n := len(c.provides); n > 0 && !isDone(c) {
				s.failf("link %d–%d: %d Provides never finished", l.a, l.b, n)
			}
			if st := c.Stats(); !st.IsZero() && !isDone(c) {
				s.failf("link %d–%d: tables not empty after everything was dropped: %v\n%s: %s\nother side: %s",
					l.a, l.b, st, map[bool]string{true: "vat " + fmt.Sprint(l.a), false: "vat " + fmt.Sprint(l.b)}[c == l.ca], c.dump(), map[bool]*Conn{true: l.cb, false: l.ca}[c == l.ca].dump())
			}
		}
	}
}

func (s *sim) settleAndDrain() {
	for round := 0; round < 100 && s.fail == nil; round++ {
		owed := false
		for _, o := range s.objects {
			if len(o.promises) > 0 || o.held.IsValid() {
				owed = true
			}
			o.settleAll()
		}
		// Time passes: Accepts whose Provide was lost with a broken link
		// give up, as their timeout would make them.
		for _, n := range s.nets {
			if n.v.expireEarlyAccepts() > 0 {
				owed = true
			}
		}
		if !owed && round > 0 {
			return
		}
		s.drain()
	}
}

// drain delivers and polls until nothing moves.
func (s *sim) drain() {
	for i := 0; i < 100000 && s.fail == nil; i++ {
		s.pump()
		moved := false
		for _, l := range s.links {
			if len(l.toB) > 0 {
				s.deliver(l, true)
				moved = true
			}
			if len(l.toA) > 0 {
				s.deliver(l, false)
				moved = true
			}
		}
		if s.pollAll() {
			moved = true
		}
		if !moved {
			return
		}
	}
	s.failf("the system never went quiet")
}

func (s *sim) teardown() {
	for _, l := range s.links {
		l.ca.shutdown(errors.New("simulation over"), false)
		l.cb.shutdown(errors.New("simulation over"), false)
	}
	for _, o := range s.objects {
		o.settleAll()
	}
	s.pollAll()
	if s.fail != nil {
		return
	}
	for _, o := range s.objects {
		if !o.shutdown {
			s.failf("object %d (%s, vat %d) still alive after every connection closed", o.id, o.name, o.vat)
			return
		}
	}
}

// simObject is a Test object hosted by a vat. It answers synchronously
// and checks E-order: per handle, sequence numbers only go up.
type simObject struct {
	s        *sim
	id       int
	vat      int
	name     string
	lastSeq  map[uint32]uint32
	held     capnp.Client
	promises []simPromise
	shutdown bool
}

type simPromise struct {
	first capnp.Client // the object's own reference, until settled
	p     *callqueue.Promise
}

func newSimPromise() simPromise {
	first, p := callqueue.NewPromise()
	return simPromise{first: first, p: p}
}

func (p simPromise) settle(target capnp.Client, err error) {
	if err != nil {
		p.p.Reject(err)
	} else {
		p.p.Fulfill(target)
	}
	p.first.Release()
}

func (s *sim) newObject(vat int, name string) capnp.Client {
	s.nextObject++
	o := &simObject{s: s, id: s.nextObject, vat: vat, name: name, lastSeq: map[uint32]uint32{}}
	s.objects = append(s.objects, o)
	if s.cfg.Native && s.rng.Intn(2) == 0 {
		o.name += ", native"
		return NewClient(simNative{o})
	}
	return capnp.NewClient(o)
}

func (s *sim) newObjectRef(vat int, name string) capnp.Client {
	c := s.newObject(vat, name)
	s.logf("vat %d: new object o%d (%s)", vat, s.nextObject, s.objects[len(s.objects)-1].name)
	return c
}

func (o *simObject) settleAll() {
	// Detach first: releasing may shut this very object down (it can hold
	// a reference to itself) and re-enter.
	promises, held := o.promises, o.held
	o.promises, o.held = nil, capnp.Client{}
	for _, p := range promises {
		p.settle(capnp.Client{}, errors.New("promise abandoned at the end of the simulation"))
	}
	held.Release()
}

func (o *simObject) Send(ctx context.Context, s capnp.Send) (*capnp.Answer, capnp.ReleaseFunc) {
	return callqueue.SendAsRecv(ctx, s, o.Recv)
}

func (o *simObject) Recv(ctx context.Context, r capnp.Recv) capnp.PipelineCaller {
	if r.Method.InterfaceID != testcapnp.Test_TypeID {
		r.Reject(capnp.Unimplemented("unknown interface"))
		return nil
	}
	result, err := o.serve(r.Method.MethodID, r.Args)
	r.ReleaseArgs()
	if err == nil {
		var res capnp.Struct
		res, err = r.Returner.AllocResults(capnp.ObjectSize{PointerCount: 1})
		err = setResultCap(res, err, result)
	}
	r.Returner.PrepareReturn(err)
	r.Returner.Return()
	r.Returner.ReleaseResults()
	// Not nil: go-capnp's AnswerQueue (behind local promises) calls
	// whatever Recv returns.
	return callqueue.Failed(errors.New("pipelining on a simulated call that returned"))
}

// setResultCap puts result, which it takes, in res's first pointer field
// unless allocating res failed with err; it returns what fails the call.
func setResultCap(res capnp.Struct, err error, result capnp.Client) error {
	if err == nil && result.IsValid() {
		id := res.Message().CapTable().Add(result)
		return res.SetPtr(0, capnp.NewInterface(res.Segment(), id).ToPtr())
	}
	result.Release()
	return err
}

// simNative serves a simObject as a native object (a Handler), on the
// goroutine that delivers its calls, as NewClient's objects are.
type simNative struct{ o *simObject }

func (n simNative) HandleCall(_ context.Context, call *ServerCall) {
	if call.Method().InterfaceID != testcapnp.Test_TypeID {
		call.Return(capnp.Unimplemented("unknown interface"))
		return
	}
	result, err := n.o.serve(call.Method().MethodID, call.Args())
	if err == nil {
		var res capnp.Struct
		res, err = call.Results(capnp.ObjectSize{PointerCount: 1})
		err = setResultCap(res, err, result)
	}
	call.Return(err)
}

func (n simNative) Shutdown() { n.o.Shutdown() }

// serve performs Test's method id with args and returns the capability
// the results carry, if any.
func (o *simObject) serve(method uint16, args capnp.Struct) (result capnp.Client, err error) {
	switch method {
	case 12: // seq
		n := testcapnp.Test_seq_Params(args).N()
		handle, seq := n>>16, n&0xffff
		if last := o.lastSeq[handle]; seq <= last {
			o.s.failf("E-order: object o%d got call %d from h%d after call %d", o.id, seq, handle, last)
		}
		o.lastSeq[handle] = seq
		o.s.logf("o%d (vat %d) receives h%d seq %d", o.id, o.vat, handle, seq)
	case 3: // child
		result = o.s.newObjectRef(o.vat, "child")
	case 6: // hold
		c := testcapnp.Test_hold_Params(args).Cap()
		old := o.held
		o.held = capnp.Client(c).AddRef()
		old.Release()
	case 8: // getHeld
		if !simReturnable(o.held) {
			// The held capability may be the pipelined result of this
			// very call (held while the call waited on a promise), or
			// depend on it: returning it would resolve the answer to
			// itself, a cycle go-capnp's resolution chases forever. So
			// simulated objects return only what cannot lead back.
			err = exc.New(exc.Failed, "", "will not return an unsettled capability")
			break
		}
		result = o.held.AddRef()
	case 9: // promise
		p := newSimPromise()
		o.promises = append(o.promises, p)
		result = p.first.AddRef()
	case 10: // resolvePromise
		if len(o.promises) == 0 {
			err = exc.New(exc.Failed, "", "no promise to resolve")
			break
		}
		p := o.promises[0]
		o.promises = o.promises[1:]
		target := capnp.Client(testcapnp.Test_resolvePromise_Params(args).Cap())
		if snap := target.Snapshot(); snap.IsPromise() {
			// A promise resolved to something unsettled can end up
			// depending on itself (a cycle no protocol can untie), so
			// simulated objects only resolve to settled capabilities.
			snap.Release()
			o.promises = append([]simPromise{p}, o.promises...)
			err = exc.New(exc.Failed, "", "will not resolve to an unsettled capability")
			break
		} else {
			snap.Release()
		}
		p.settle(target, nil)
	case 11: // breakPromise
		if len(o.promises) == 0 {
			err = exc.New(exc.Failed, "", "no promise to break")
			break
		}
		p := o.promises[0]
		o.promises = o.promises[1:]
		p.settle(capnp.Client{}, exc.New(exc.Failed, "", "broken on request"))
	default:
		err = capnp.Unimplemented("not simulated")
	}
	return result, err
}

// simReturnable reports whether a simulated object may return c as a
// result without risking a promise cycle: c is settled, or is an object's
// unresolved promise (those resolve only to settled capabilities, see
// resolvePromise). Any other promise (a pipelined answer, an import of a
// remote promise) might resolve, directly or not, to the very answer it
// would be returned in.
func simReturnable(c capnp.Client) bool {
	snap := c.Snapshot()
	defer snap.Release()
	if !snap.IsPromise() {
		return true
	}
	return callqueue.Unsettled(snap.Brand())
}

func (o *simObject) Brand() capnp.Brand { return capnp.Brand{Value: o} }
func (o *simObject) String() string     { return fmt.Sprintf("sim object o%d", o.id) }
func (o *simObject) Shutdown() {
	o.shutdown = true
	o.settleAll()
}

// describe names a message for the trace.
func describe(msg *capnp.Message) string {
	m, err := rpccp.ReadRootMessage(msg)
	if err != nil {
		return "undecodable message"
	}
	return describeMessage(m)
}

func TestSim(t *testing.T) {
	seeds, steps := *simSeeds, *simSteps
	if testing.Short() {
		seeds = 20
	}
	for i := 0; i < seeds; i++ {
		seed := *simFirstSeed + int64(i)
		cfg := simConfig{Seed: seed, Vats: 2 + int(seed%4), Steps: steps}
		if f := runSim(cfg); f != nil {
			reportSimFailure(t, cfg, f)
			return
		}
	}
}

// Seed 1301425 at 836 steps left an export of an embargoed promise that
// never resolved: a capability pipelined on results that held it kept its
// hook after the results were freed (TestEmbargoResolvesCapabilitiesHoldingItsHook).
func TestSimSeed1301425EmbargoOutlivesClients(t *testing.T) {
	cfg := simConfig{Seed: 1301425, Vats: 3, Steps: 836}
	if f := runSim(cfg); f != nil {
		reportSimFailure(t, cfg, f)
	}
}

// TestSimStranded runs the simulation with stranded views of handles
// (simConfig.Strand), half of the seeds with three-party handoff.
func TestSimStranded(t *testing.T) {
	seeds, steps := *simSeeds/2, *simSteps
	if testing.Short() {
		seeds = 10
	}
	for i := 0; i < seeds; i++ {
		seed := *simFirstSeed + int64(i)
		cfg := simConfig{Seed: seed, Vats: 2 + int(seed%4), Steps: steps, Strand: true}
		if seed%2 == 1 {
			cfg.Vats, cfg.Level3, cfg.Thieves = 3+int(seed%3), true, true
		}
		if f := runSim(cfg); f != nil {
			reportSimFailure(t, cfg, f)
			return
		}
	}
}

// TestSimNative runs the simulation with native objects and native calls
// (simConfig.Native) among go-capnp's: a third of the seeds with
// three-party handoff and thieves, a third with stranded views.
func TestSimNative(t *testing.T) {
	seeds, steps := *simSeeds/2, *simSteps
	if testing.Short() {
		seeds = 10
	}
	for i := 0; i < seeds; i++ {
		seed := *simFirstSeed + int64(i)
		cfg := simConfig{Seed: seed, Vats: 2 + int(seed%4), Steps: steps, Native: true}
		switch seed % 3 {
		case 1:
			cfg.Vats, cfg.Level3, cfg.Thieves = 3+int(seed%3), true, true
		case 2:
			cfg.Strand = true
		}
		if f := runSim(cfg); f != nil {
			reportSimFailure(t, cfg, f)
			return
		}
	}
}

// TestSimLevel3 runs the simulation with three-party handoff: three to
// five vats, capabilities handed off between them at random times, links
// breaking during handoffs, with the same E-order, hang and leak checks.
func TestSimLevel3(t *testing.T) {
	seeds, steps := *simSeeds, *simSteps
	if testing.Short() {
		seeds = 20
	}
	for i := 0; i < seeds; i++ {
		seed := *simFirstSeed + int64(i)
		cfg := simConfig{Seed: seed, Vats: 3 + int(seed%3), Steps: steps, Level3: true, Thieves: true}
		if f := runSim(cfg); f != nil {
			reportSimFailure(t, cfg, f)
			return
		}
	}
}

// The simulation must find a deliberately injected ordering bug (no
// embargoes) within the CI seed budget.
func TestSimFindsInjectedBug(t *testing.T) {
	cfg, f := findInjectedBug(*simSeeds)
	if f == nil {
		t.Fatalf("with embargoes disabled, %d seeds found no E-order violation", *simSeeds)
	}
	if !strings.Contains(f.What, "E-order") {
		t.Fatalf("expected an E-order violation, got: %v", f)
	}
	min := minimizeSim(cfg, f)
	t.Logf("seed %d finds the injected bug at step %d (%d vats): %s", cfg.Seed, min.Steps, cfg.Vats, f.What)
	// The minimal run fails the same way, and runs without the bug pass.
	if g := runSim(min); g == nil || !strings.Contains(g.What, "E-order") {
		t.Fatalf("minimized run does not reproduce: %v", g)
	}
	min.SkipEmbargo = false
	if g := runSim(min); g != nil {
		t.Fatalf("without the injected bug the same run fails: %v", g)
	}
}

// The harness writes a reproducer for a failing seed; the file must
// compile and fail the same way. It needs the go command, so it runs
// where the sources and toolchain are (not under js/wasm).
func TestSimReproducerFile(t *testing.T) {
	if runtime.GOOS == "js" || runtime.GOOS == "wasip1" {
		t.Skip("SKIPPED: the reproducer check runs `go test` on the generated file; it runs on the host build, not under " + runtime.GOOS)
	}
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("SKIPPED: no `go` command on PATH to compile the reproducer (install Go)")
	}
	cfg, f := findInjectedBug(*simSeeds)
	if f == nil {
		t.Fatal("no failing seed to write a reproducer for")
	}
	min := minimizeSim(cfg, f)
	path, err := writeSimRepro(".", min)
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(path)
	name := fmt.Sprintf("TestSimRepro_seed%d_steps%d", min.Seed, min.Steps)
	out, err := exec.Command(gobin, "test", "-count=1", "-run", "^"+name+"$", ".").CombinedOutput()
	if err == nil {
		t.Fatalf("reproducer %s passed; want it to fail:\n%s", path, out)
	}
	if !strings.Contains(string(out), "E-order") {
		t.Fatalf("reproducer %s failed for another reason:\n%s", path, out)
	}
}

func findInjectedBug(seeds int) (simConfig, *simFailure) {
	for i := 0; i < seeds; i++ {
		cfg := simConfig{Seed: int64(1000 + i), Vats: 2 + i%4, Steps: *simSteps, SkipEmbargo: true}
		if f := runSim(cfg); f != nil {
			return cfg, f
		}
	}
	return simConfig{}, nil
}

// minimizeSim finds the fewest steps with which cfg still fails. A run's
// first n steps do not depend on how many follow, so a failure found at
// step k needs at most k+1 steps; end-of-run failures are searched.
func minimizeSim(cfg simConfig, f *simFailure) simConfig {
	if f.Step < cfg.Steps {
		cfg.Steps = f.Step + 1
		return cfg
	}
	lo, hi := 0, cfg.Steps // runs with hi steps fail
	for lo+1 < hi {
		mid := (lo + hi) / 2
		c := cfg
		c.Steps = mid
		if runSim(c) != nil {
			hi = mid
		} else {
			lo = mid
		}
	}
	cfg.Steps = hi
	return cfg
}

func reportSimFailure(t *testing.T, cfg simConfig, f *simFailure) {
	t.Helper()
	min := minimizeSim(cfg, f)
	g := runSim(min)
	if g == nil {
		g = f
		min = cfg
	}
	trace := g.Trace
	if p := os.Getenv("SIM_TRACE_FILE"); p != "" {
		os.WriteFile(p, []byte(strings.Join(trace, "\n")), 0o644)
	}
	if len(trace) > 200 {
		trace = trace[len(trace)-200:]
	}
	msg := fmt.Sprintf("simulation seed %d (%d vats) fails after %d steps: %s\nlast steps of the trace:\n%s",
		min.Seed, min.Vats, min.Steps, g.What, strings.Join(trace, "\n"))
	if *simReproDir != "" {
		path, err := writeSimRepro(*simReproDir, min)
		if err != nil {
			msg += "\n(could not write reproducer: " + err.Error() + ")"
		} else {
			msg += "\nreproducer written to " + path
		}
	}
	t.Fatal(msg)
}

// writeSimRepro writes a ready-to-run regression test for cfg into dir
// (normally the core package directory).
func writeSimRepro(dir string, cfg simConfig) (string, error) {
	name := fmt.Sprintf("TestSimRepro_seed%d_steps%d", cfg.Seed, cfg.Steps)
	src := fmt.Sprintf(`package core

import "testing"

// %s reproduces a failure found by the simulation.
// Generated by writeSimRepro; keep it as a regression test.
func %s(t *testing.T) {
	cfg := simConfig{Seed: %d, Vats: %d, Steps: %d, SkipEmbargo: %v, Level3: %v, Thieves: %v, Strand: %v, Native: %v}
	if f := runSim(cfg); f != nil {
		t.Fatalf("%%v\n%%s", f, lastLines(f.Trace, 60))
	}
}
`, name, name, cfg.Seed, cfg.Vats, cfg.Steps, cfg.SkipEmbargo, cfg.Level3, cfg.Thieves, cfg.Strand, cfg.Native)
	path := filepath.Join(dir, fmt.Sprintf("sim_repro_seed%d_steps%d_test.go", cfg.Seed, cfg.Steps))
	return path, os.WriteFile(path, []byte(src), 0o644)
}

func lastLines(lines []string, n int) string {
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
