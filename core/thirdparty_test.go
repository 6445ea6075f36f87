package core

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"maps"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"

	"github.com/captp-go/captp/internal/callqueue"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// testNet is an in-process Level 3 network: vats by name, connected by
// pipes. ThirdPartyToContact is "host|nonce", ThirdPartyToAwait
// "recipient|nonce", ThirdPartyCompletion "provider|nonce"; each side
// folds in the peer it knows the connection belongs to, as an
// authenticated network would.
type testNet struct {
	t     *testing.T
	mu    sync.Mutex
	vats  map[string]*testVat
	nonce int
	// gate, if set, holds Connect until it is closed.
	gate chan struct{}
	// unreachable names a vat Connect cannot reach.
	unreachable string
	// connecting counts Connects in progress; peak is their most at once.
	connecting, peak atomic.Int32
}

type testVat struct {
	name string
	n    *testNet
	vat  *Vat
	boot capnp.Client

	mu    sync.Mutex
	conns map[string]*Conn // by peer name
	peers map[*Conn]string
	// recorded are the frames this vat wrote to each peer.
	recorded map[string]*recordingPipe
}

func newTestNet(t *testing.T) *testNet {
	n := &testNet{t: t, vats: make(map[string]*testVat)}
	t.Cleanup(n.close)
	return n
}

func (n *testNet) vat(name string, boot capnp.Client) *testVat {
	v := &testVat{name: name, n: n, boot: boot, conns: make(map[string]*Conn), peers: make(map[*Conn]string), recorded: make(map[string]*recordingPipe)}
	v.vat = NewVat(v)
	n.mu.Lock()
	n.vats[name] = v
	n.mu.Unlock()
	return v
}

// dial returns v's connection to peer, connecting both ends if needed.
func (v *testVat) dial(peer string) *Conn {
	n := v.n
	n.mu.Lock()
	defer n.mu.Unlock()
	v.mu.Lock()
	if c := v.conns[peer]; c != nil {
		v.mu.Unlock()
		return c
	}
	v.mu.Unlock()
	w := n.vats[peer]
	if w == nil {
		return nil
	}
	ab, ba := newBufPipe(), newBufPipe()
	mine := &recordingPipe{rwPipe: rwPipe{}, r: ba, w: ab}
	theirs := &recordingPipe{rwPipe: rwPipe{}, r: ab, w: ba}
	c := NewConn(mine, &Options{Vat: v.vat, BootstrapClient: v.boot.AddRef()})
	d := NewConn(theirs, &Options{Vat: w.vat, BootstrapClient: w.boot.AddRef()})
	v.add(peer, c, mine)
	w.add(v.name, d, theirs)
	return c
}

func (v *testVat) add(peer string, c *Conn, rec *recordingPipe) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.conns[peer], v.peers[c], v.recorded[peer] = c, peer, rec
}

func (v *testVat) peer(c *Conn) string {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.peers[c]
}

func (v *testVat) conn(peer string) *Conn {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.conns[peer]
}

func (n *testNet) close() {
	n.mu.Lock()
	var all []*Conn
	for _, v := range n.vats {
		v.mu.Lock()
		for c := range v.peers {
			all = append(all, c)
		}
		v.mu.Unlock()
		v.boot.Release()
	}
	n.mu.Unlock()
	for _, c := range all {
		c.Close()
	}
	for _, c := range all {
		<-c.Done()
	}
}

func textPtr(s string) capnp.Ptr {
	_, seg, _ := capnp.NewMessage(capnp.SingleSegment(nil))
	t, _ := capnp.NewText(seg, s)
	return t.ToPtr()
}

func splitPtr(p capnp.Ptr) (name, nonce string, err error) {
	name, nonce, ok := strings.Cut(p.Text(), "|")
	if !ok {
		return "", "", fmt.Errorf("malformed %q", p.Text())
	}
	return name, nonce, nil
}

func (v *testVat) Introduce(host, recipient *Conn) (capnp.Ptr, capnp.Ptr, bool, error) {
	h, r := v.peer(host), v.peer(recipient)
	if h == "" || r == "" {
		return capnp.Ptr{}, capnp.Ptr{}, false, nil
	}
	v.n.mu.Lock()
	v.n.nonce++
	nonce := v.n.nonce
	v.n.mu.Unlock()
	return textPtr(fmt.Sprintf("%s|%d", h, nonce)), textPtr(fmt.Sprintf("%s|%d", r, nonce)), true, nil
}

func (v *testVat) Connect(ctx context.Context, via *Conn, toContact capnp.Ptr) (*Conn, capnp.Ptr, error) {
	host, nonce, err := splitPtr(toContact)
	if err != nil {
		return nil, capnp.Ptr{}, err
	}
	if n := v.n.connecting.Add(1); n > v.n.peak.Load() {
		v.n.peak.Store(n)
	}
	defer v.n.connecting.Add(-1)
	if g := v.n.gate; g != nil {
		select {
		case <-g:
		case <-ctx.Done():
			return nil, capnp.Ptr{}, ctx.Err()
		}
	}
	if host == v.n.unreachable {
		return nil, capnp.Ptr{}, fmt.Errorf("vat %q is unreachable", host)
	}
	c := v.dial(host)
	if c == nil {
		return nil, capnp.Ptr{}, fmt.Errorf("no vat %q", host)
	}
	return c, textPtr(v.peer(via) + "|" + nonce), nil
}

func (v *testVat) Expect(provider *Conn, toAwait capnp.Ptr) (string, error) {
	recipient, nonce, err := splitPtr(toAwait)
	if err != nil {
		return "", err
	}
	return v.peer(provider) + ">" + recipient + "|" + nonce, nil
}

func (v *testVat) Complete(recipient *Conn, completion capnp.Ptr) (string, error) {
	provider, nonce, err := splitPtr(completion)
	if err != nil {
		return "", err
	}
	return provider + ">" + v.peer(recipient) + "|" + nonce, nil
}

// bufPipe is one direction of a test connection: writes never block
// (an unbounded buffer), reads wait for data, and paused holds reads back
// so a test can delay what one vat receives from another.
type bufPipe struct {
	mu     sync.Mutex
	cond   *sync.Cond
	buf    bytes.Buffer
	closed bool
	paused bool
}

func newBufPipe() *bufPipe {
	p := &bufPipe{}
	p.cond = sync.NewCond(&p.mu)
	return p
}

func (p *bufPipe) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return 0, io.ErrClosedPipe
	}
	p.buf.Write(b)
	p.cond.Broadcast()
	return len(b), nil
}

func (p *bufPipe) Read(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for !p.closed && (p.paused || p.buf.Len() == 0) {
		p.cond.Wait()
	}
	if p.buf.Len() == 0 || p.paused {
		return 0, io.EOF
	}
	return p.buf.Read(b)
}

func (p *bufPipe) close() {
	p.mu.Lock()
	p.closed = true
	p.cond.Broadcast()
	p.mu.Unlock()
}

func (p *bufPipe) pause(on bool) {
	p.mu.Lock()
	p.paused = on
	p.cond.Broadcast()
	p.mu.Unlock()
}

// incoming returns the pipe v reads from peer.
func (v *testVat) incoming(peer string) *bufPipe {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.recorded[peer].r
}

// calls counts the Call messages among the frames v wrote to peer.
func (v *testVat) calls(t *testing.T, peer string) int {
	v.mu.Lock()
	rec := v.recorded[peer]
	v.mu.Unlock()
	rec.mu.Lock()
	dec := capnp.NewDecoder(bytes.NewReader(rec.out.Bytes()))
	rec.mu.Unlock()
	n := 0
	for {
		msg, err := dec.Decode()
		if err != nil {
			return n
		}
		m, err := rpccp.ReadRootMessage(msg)
		if err == nil && m.Which() == rpccp.Message_Which_call {
			n++
		}
	}
}

func seq(ctx context.Context, t testcapnp.Test, n uint32) (testcapnp.Test_seq_Results_Future, capnp.ReleaseFunc) {
	return t.Seq(ctx, func(p testcapnp.Test_seq_Params) error { p.SetN(n); return nil })
}

// Bob calls a promise hosted by Alice, which Alice resolves to a
// capability hosted by Carol. Bob's calls made before, during and after
// the handoff arrive at Carol in order (the Accept is embargoed behind the
// calls Alice forwarded); once Bob knows where Carol is, none go through
// Alice; the vine and the provision are gone once the Accept returns;
// dropping everything empties every table.
func TestThirdPartyHandoff(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	n := newTestNet(t)
	n.gate = make(chan struct{})
	aliceObj, carolObj := testimpl.New("alice", nil), testimpl.New("carol", nil)
	alice := n.vat("alice", capnp.Client(aliceObj.Client()))
	bob := n.vat("bob", capnp.Client{})
	carol := n.vat("carol", capnp.Client(carolObj.Client()))

	aliceCap := testcapnp.Test(bob.dial("alice").Bootstrap(ctx))
	pf, prel := aliceCap.Promise(ctx, nil)
	promise := pf.Cap().AddRef()
	prel()

	const before, during, after = 20, 20, 20
	var futures []testcapnp.Test_seq_Results_Future
	var releases []capnp.ReleaseFunc
	call := func(n uint32) {
		f, r := seq(ctx, promise, n)
		futures, releases = append(futures, f), append(releases, r)
	}
	for i := range before {
		call(uint32(i))
	}
	// Once Alice answers a later call, she holds the earlier ones.
	nf, nrel := aliceCap.Name(ctx, nil)
	if _, err := nf.Struct(); err != nil {
		t.Fatalf("name: %v", err)
	}
	nrel()

	// Alice resolves her promise to Carol's capability: she forwards the
	// queued calls to Carol and hands the capability to Bob.
	carolCap := testcapnp.Test(alice.dial("carol").Bootstrap(ctx))
	if err := capnp.Client(carolCap).Resolve(ctx); err != nil {
		t.Fatalf("bootstrap Carol: %v", err)
	}
	localCall(t, aliceObj, func(c testcapnp.Test) (*capnp.Future, capnp.ReleaseFunc) {
		f, rel := c.ResolvePromise(ctx, func(p testcapnp.Test_resolvePromise_Params) error { return p.SetCap(carolCap.AddRef()) })
		return f.Future, rel
	})
	waitFor(t, ctx, "Bob to learn where the capability lives", func() bool {
		snap := capnp.Client(promise).Snapshot()
		defer snap.Release()
		return callqueue.Unsettled(snap.Brand())
	})
	// Alice writes the forwarded calls and the Resolve on different
	// connections: Bob may learn before her writer has sent them all.
	waitFor(t, ctx, "Alice to forward the calls Bob made on her promise", func() bool {
		return alice.calls(t, "carol") >= before
	})
	throughAlice := alice.calls(t, "carol")
	if throughAlice < before {
		t.Errorf("Alice forwarded %d calls to Carol; want the %d Bob made on her promise", throughAlice, before)
	}

	// Bob cannot reach Carol yet: these queue at Bob.
	for i := range during {
		call(uint32(before + i))
	}
	close(n.gate) // Bob connects to Carol and accepts
	if err := capnp.Client(promise).Resolve(ctx); err != nil {
		t.Fatalf("resolve the handed-off capability: %v", err)
	}
	for i := range after {
		call(uint32(before + during + i))
	}
	for i, f := range futures {
		if _, err := f.Struct(); err != nil {
			t.Fatalf("seq(%d): %v", i, err)
		}
		releases[i]()
	}
	log := carolObj.Log()
	if len(log) != before+during+after {
		t.Fatalf("Carol got %d calls; want %d", len(log), before+during+after)
	}
	for i, got := range log {
		if got != uint32(i) {
			t.Fatalf("Carol's call %d was seq(%d): E-order broken (log %v)", i, got, log)
		}
	}
	// Direct now: the capability is an import on Bob's connection to Carol.
	snap := capnp.Client(promise).Snapshot()
	h, ok := snap.Brand().Value.(*importClient)
	snap.Release()
	if !ok || h.c != bob.conn("carol") {
		t.Fatalf("after the handoff Bob's capability is %T, not an import from Carol", h)
	}
	if got := alice.calls(t, "carol") - throughAlice; got != 0 {
		t.Errorf("Alice forwarded %d calls to Carol once Bob knew where the capability lives; want 0", got)
	}

	// The vine and the provision go once the Accept has returned.
	waitFor(t, ctx, "the vine to be released and the Provide finished", func() bool {
		ab, ac := alice.conn("bob").Stats(), alice.conn("carol")
		p, e := carol.vat.stats()
		ac.mu.Lock()
		provides := len(ac.provides)
		ac.mu.Unlock()
		return ab.Exports == 1 && provides == 0 && p == 0 && e == 0 // 1: Alice's bootstrap object
	})

	promise.Release()
	aliceCap.Release()
	carolCap.Release()
	waitFor(t, ctx, "every table to empty", func() bool {
		for _, v := range []*testVat{alice, bob, carol} {
			v.mu.Lock()
			conns := maps.Clone(v.conns)
			v.mu.Unlock()
			for _, c := range conns {
				if !c.Stats().IsZero() {
					return false
				}
			}
		}
		return true
	})
}

// localCall makes one call on a new local reference to obj, waits for
// it and releases everything.
func localCall(t *testing.T, obj *testimpl.Object, call func(testcapnp.Test) (*capnp.Future, capnp.ReleaseFunc)) {
	t.Helper()
	c := obj.Client()
	defer c.Release()
	f, rel := call(c)
	defer rel()
	if _, err := f.Struct(); err != nil {
		t.Fatalf("local call: %v", err)
	}
}

func waitFor(t *testing.T, ctx context.Context, what string, cond func() bool) {
	t.Helper()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("timed out waiting for %s", what)
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// A completion presented by anyone but the recipient matches nothing:
// Dave, given Bob's completion, gets the error an unknown one gets, and
// the provision stays for Bob.
func TestAcceptByOtherVatRefused(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	n := newTestNet(t)
	carolObj := testimpl.New("carol", nil)
	n.vat("alice", capnp.Client{})
	carol := n.vat("carol", capnp.Client(carolObj.Client()))
	dave := n.vat("dave", capnp.Client{})
	carol.vat.acceptTimeout = 50 * time.Millisecond

	// Dave replays what Bob would send: provider alice, nonce 1.
	toCarol := dave.dial("carol")
	stolen := toCarol.requestCap(ctx, "accept", nil, func(m rpccp.Message, qid uint32) error {
		acc, err := m.NewAccept()
		if err != nil {
			return err
		}
		acc.SetQuestionId(qid)
		return acc.SetProvision(textPtr("alice|1"))
	})
	defer stolen.Release()
	err := stolen.Resolve(ctx)
	if err == nil {
		f, rel := testcapnp.Test(stolen).Name(ctx, nil)
		_, err = f.Struct()
		rel()
	}
	if err == nil || !strings.Contains(err.Error(), ErrNoProvision.Error()) {
		t.Fatalf("Dave's Accept: %v; want %q", err, ErrNoProvision)
	}
	if p, e := carol.vat.stats(); p != 0 || e != 0 {
		t.Errorf("Carol keeps %d provisions and %d early accepts after refusing", p, e)
	}
}

// The embargo: Bob's calls to Alice's promise are still unread by Alice
// when she resolves it to Carol's capability and hands it to Bob, who
// then calls Carol directly (pipelined on his Accept). Carol must hold
// those until Alice has forwarded the earlier ones, which she does when
// Bob's Disembargo, sent behind them, reaches her.
func TestThirdPartyHandoffEmbargo(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	n := newTestNet(t)
	aliceObj, carolObj := testimpl.New("alice", nil), testimpl.New("carol", nil)
	alice := n.vat("alice", capnp.Client(aliceObj.Client()))
	bob := n.vat("bob", capnp.Client{})
	n.vat("carol", capnp.Client(carolObj.Client()))

	aliceCap := testcapnp.Test(bob.dial("alice").Bootstrap(ctx))
	defer aliceCap.Release()
	pf, prel := aliceCap.Promise(ctx, nil)
	promise := pf.Cap().AddRef()
	defer promise.Release()
	if _, err := pf.Struct(); err != nil {
		t.Fatalf("promise: %v", err)
	}
	prel()
	carolCap := testcapnp.Test(alice.dial("carol").Bootstrap(ctx))
	defer carolCap.Release()
	if err := capnp.Client(carolCap).Resolve(ctx); err != nil {
		t.Fatalf("bootstrap Carol: %v", err)
	}

	const before, after = 20, 20
	var futures []testcapnp.Test_seq_Results_Future
	var releases []capnp.ReleaseFunc
	call := func(n uint32) {
		f, r := seq(ctx, promise, n)
		futures, releases = append(futures, f), append(releases, r)
	}
	alice.incoming("bob").pause(true)
	sent := bob.calls(t, "alice")
	for i := range before {
		call(uint32(i))
	}
	waitFor(t, ctx, "Bob's calls to be on their way to Alice", func() bool { return bob.calls(t, "alice") >= sent+before })

	localCall(t, aliceObj, func(c testcapnp.Test) (*capnp.Future, capnp.ReleaseFunc) {
		f, rel := c.ResolvePromise(ctx, func(p testcapnp.Test_resolvePromise_Params) error { return p.SetCap(carolCap.AddRef()) })
		return f.Future, rel
	})
	waitFor(t, ctx, "Bob to accept from Carol", func() bool {
		snap := capnp.Client(promise).Snapshot()
		defer snap.Release()
		_, ok := snap.Brand().Value.(*bootstrapHook) // pipelining on the Accept
		_, direct := snap.Brand().Value.(*importClient)
		return ok || direct && bob.conn("carol") != nil
	})
	for i := range after {
		call(uint32(before + i))
	}
	waitFor(t, ctx, "Carol to hold Bob's pipelined calls", func() bool {
		c := n.vats["carol"].conn("bob")
		if c == nil {
			return false
		}
		c.mu.Lock()
		defer c.mu.Unlock()
		for _, a := range c.answers {
			if len(a.queued) == after {
				return true
			}
		}
		return false
	})
	if log := carolObj.Log(); len(log) != 0 {
		t.Fatalf("Carol delivered %v while the calls Alice has to forward are still unread: no embargo", log)
	}
	alice.incoming("bob").pause(false)
	for i, f := range futures {
		if _, err := f.Struct(); err != nil {
			t.Fatalf("seq(%d): %v", i, err)
		}
		releases[i]()
	}
	log := carolObj.Log()
	if len(log) != before+after {
		t.Fatalf("Carol got %d calls; want %d", len(log), before+after)
	}
	for i, got := range log {
		if got != uint32(i) {
			t.Fatalf("Carol's call %d was seq(%d): E-order broken (log %v)", i, got, log)
		}
	}
}

// When Bob cannot reach Carol, the capability works through the vine,
// and dropping it leaves no table entries, provisions or Provides.
func TestThirdPartyHandoffFallsBackToVine(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	n := newTestNet(t)
	aliceObj, carolObj := testimpl.New("alice", nil), testimpl.New("carol", nil)
	alice := n.vat("alice", capnp.Client(aliceObj.Client()))
	bob := n.vat("bob", capnp.Client{})
	carol := n.vat("carol", capnp.Client(carolObj.Client()))
	n.unreachable = "carol"

	aliceCap := testcapnp.Test(bob.dial("alice").Bootstrap(ctx))
	carolCap := testcapnp.Test(alice.dial("carol").Bootstrap(ctx))
	if err := capnp.Client(carolCap).Resolve(ctx); err != nil {
		t.Fatal(err)
	}
	localCall(t, aliceObj, func(c testcapnp.Test) (*capnp.Future, capnp.ReleaseFunc) {
		f, rel := c.Hold(ctx, func(p testcapnp.Test_hold_Params) error { return p.SetCap(carolCap.AddRef()) })
		return f.Future, rel
	})
	hf, hrel := aliceCap.GetHeld(ctx, nil)
	held := hf.Cap().AddRef()
	hrel()
	for i := range 5 {
		sf, srel := seq(ctx, held, uint32(i))
		if _, err := sf.Struct(); err != nil {
			t.Fatalf("seq(%d) through the vine: %v", i, err)
		}
		srel()
	}
	if got := carolObj.Log(); len(got) != 5 {
		t.Fatalf("Carol got %v; want 5 calls through the vine", got)
	}
	if bob.conn("carol") != nil {
		t.Fatal("Bob connected to an unreachable Carol")
	}
	held.Release()
	aliceCap.Release()
	carolCap.Release()
	localCall(t, aliceObj, func(c testcapnp.Test) (*capnp.Future, capnp.ReleaseFunc) {
		f, rel := c.DropHeld(ctx, nil)
		return f.Future, rel
	})
	waitFor(t, ctx, "every table, provision and Provide to empty", func() bool {
		p, e := carol.vat.stats()
		ac := alice.conn("carol")
		ac.mu.Lock()
		provides := len(ac.provides)
		ac.mu.Unlock()
		return p == 0 && e == 0 && provides == 0 && alice.conn("bob").Stats().IsZero() && ac.Stats().IsZero()
	})
}

// Replaying an Accept once its Provide has finished gets nothing: the
// provision is gone, and the answer is the same as for a forged one.
func TestAcceptReplayAfterFinishRefused(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	n := newTestNet(t)
	aliceObj, carolObj := testimpl.New("alice", nil), testimpl.New("carol", nil)
	alice := n.vat("alice", capnp.Client(aliceObj.Client()))
	bob := n.vat("bob", capnp.Client{})
	carol := n.vat("carol", capnp.Client(carolObj.Client()))
	carol.vat.acceptTimeout = 50 * time.Millisecond

	carolCap := testcapnp.Test(alice.dial("carol").Bootstrap(ctx))
	defer carolCap.Release()
	if err := capnp.Client(carolCap).Resolve(ctx); err != nil {
		t.Fatal(err)
	}
	localCall(t, aliceObj, func(c testcapnp.Test) (*capnp.Future, capnp.ReleaseFunc) {
		f, rel := c.Hold(ctx, func(p testcapnp.Test_hold_Params) error { return p.SetCap(carolCap.AddRef()) })
		return f.Future, rel
	})
	aliceCap := testcapnp.Test(bob.dial("alice").Bootstrap(ctx))
	defer aliceCap.Release()
	hf, hrel := aliceCap.GetHeld(ctx, nil)
	held := hf.Cap().AddRef()
	hrel()
	defer held.Release()
	if err := capnp.Client(held).Resolve(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, "the Provide to finish", func() bool {
		p, e := carol.vat.stats()
		return p == 0 && e == 0
	})
	// Bob sends his Accept again (nonce 1 is the only handoff so far).
	replay := bob.dial("carol").requestCap(ctx, "accept", nil, func(m rpccp.Message, qid uint32) error {
		acc, err := m.NewAccept()
		if err != nil {
			return err
		}
		acc.SetQuestionId(qid)
		return acc.SetProvision(textPtr("alice|1"))
	})
	defer replay.Release()
	nf, nrel := testcapnp.Test(replay).Name(ctx, nil)
	_, err := nf.Struct()
	nrel()
	if err == nil || !strings.Contains(err.Error(), ErrNoProvision.Error()) {
		t.Fatalf("replayed Accept: %v; want %q", err, ErrNoProvision)
	}
	// The capability Bob picked up still works.
	sf, srel := seq(ctx, testcapnp.Test(held), 1)
	if _, err := sf.Struct(); err != nil {
		t.Fatalf("the handed-off capability after the replay: %v", err)
	}
	srel()
}

// A peer that sends more thirdPartyHosted descriptors than hosts answer
// cannot make a connection start a goroutine and a dial for each: beyond
// maxHandoffs at once, capabilities are used through their vines, and
// every one of them still works.
func TestHandoffsBoundedPerConnection(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	n := newTestNet(t)
	n.gate = make(chan struct{})
	aliceObj, carolObj := testimpl.New("alice", nil), testimpl.New("carol", nil)
	alice := n.vat("alice", capnp.Client(aliceObj.Client()))
	bob := n.vat("bob", capnp.Client{})
	n.vat("carol", capnp.Client(carolObj.Client()))
	carolCap := testcapnp.Test(alice.dial("carol").Bootstrap(ctx))
	defer carolCap.Release()
	if err := capnp.Client(carolCap).Resolve(ctx); err != nil {
		t.Fatal(err)
	}
	localCall(t, aliceObj, func(c testcapnp.Test) (*capnp.Future, capnp.ReleaseFunc) {
		f, rel := c.Hold(ctx, func(p testcapnp.Test_hold_Params) error { return p.SetCap(carolCap.AddRef()) })
		return f.Future, rel
	})
	aliceCap := testcapnp.Test(bob.dial("alice").Bootstrap(ctx))
	defer aliceCap.Release()
	const n3 = maxHandoffs + 16
	var held []testcapnp.Test
	for range n3 {
		f, rel := aliceCap.GetHeld(ctx, nil)
		held = append(held, f.Cap().AddRef())
		if _, err := f.Struct(); err != nil {
			t.Fatal(err)
		}
		rel()
	}
	waitFor(t, ctx, "the pickups to reach Connect", func() bool { return n.connecting.Load() >= maxHandoffs })
	if got := bob.conn("alice").handoffs.Load(); got > maxHandoffs {
		t.Fatalf("%d pickups running on one connection; want at most %d", got, maxHandoffs)
	}
	close(n.gate)
	for i, h := range held {
		f, rel := seq(ctx, h, uint32(i+1))
		if _, err := f.Struct(); err != nil {
			t.Fatalf("capability %d: %v", i, err)
		}
		rel()
		h.Release()
	}
	if p := n.peak.Load(); p > maxHandoffs {
		t.Fatalf("%d Connects at once; want at most %d", p, maxHandoffs)
	}
}
