package conformance

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/exc"
	"go.uber.org/goleak"

	"github.com/captp-go/captp/internal/callqueue"
	"github.com/captp-go/captp/internal/testcapnp"
)

// scenario is one behaviour checked in every pairing.
type scenario struct {
	name string
	run  func(t *testing.T, e *env)
	// skip, if it returns non-empty, skips the scenario in pairing p; the
	// reason must name the implementation's limitation.
	skip func(p pairing) string
}

var scenarios = []scenario{
	{name: "echo", run: testEcho},
	{name: "capsClientToServer", run: testCapsClientToServer},
	{name: "capsServerToClient", run: testCapsServerToClient},
	{name: "capIdentityRoundTrip", run: testCapIdentity},
	{name: "pipelineChain3", run: testPipelineChain},
	{name: "embargoA_promiseToCaller_pipelined", run: embargoA(false, 2), skip: goCapnpClientEmbargo},
	{name: "embargoA_promiseToCaller_afterReturn", run: embargoA(true, 2), skip: goCapnpClientEmbargo},
	{name: "embargoA_promiseToCaller_many", run: embargoA(true, 25), skip: goCapnpClientEmbargo},
	{name: "embargoB_promiseToServerObject_pipelined", run: embargoB(false, 2)},
	{name: "embargoB_promiseToServerObject_afterReturn", run: embargoB(true, 2)},
	{name: "embargoB_promiseToServerObject_many", run: embargoB(true, 25)},
	{name: "embargoC_getHeldOwnCap_resultCap", run: embargoC(false, 2), skip: goCapnpClientLateCall},
	{name: "embargoC_getHeldOwnCap_samePipelineRef", run: embargoC(true, 2), skip: goCapnpClientLateCall},
	{name: "embargoC_getHeldOwnCap_many", run: embargoC(false, 25), skip: goCapnpClientLateCall},
	{name: "brokenPromise", run: testBrokenPromise},
	{name: "exceptions", run: testExceptions},
	{name: "unknownMethod", run: testUnknownMethod},
	{name: "cancel", run: testCancel},
	{name: "release", run: testRelease},
	{name: "disconnect_serverClose", run: disconnect("close", false)},
	{name: "disconnect_serverClose_pendingCall", run: disconnect("close", true), skip: goCapnpServerClose},
	{name: "disconnect_peerEOF_pendingCall", run: disconnect("eof", true)},
}

// TestConformance runs every scenario in every pairing, each on its own
// connection, and checks for leaked goroutines after each pairing.
func TestConformance(t *testing.T) {
	for _, p := range pairings {
		t.Run(p.String(), func(t *testing.T) {
			before := goleak.IgnoreCurrent()
			t.Run("scenarios", func(t *testing.T) {
				for _, sc := range scenarios {
					t.Run(sc.name, func(t *testing.T) {
						t.Parallel()
						if sc.skip != nil {
							if why := sc.skip(p); why != "" {
								t.Skip(why)
							}
						}
						sc.run(t, newEnv(t, p))
					})
				}
			})
			if err := goleak.Find(before); err != nil {
				t.Errorf("goroutines leaked by pairing %v after every connection closed:\n%v", p, err)
			}
		})
	}
}

// ---- helpers ---------------------------------------------------------

func seq(e *env, c testcapnp.Test, n uint32) (testcapnp.Test_seq_Results_Future, capnp.ReleaseFunc) {
	return c.Seq(e.ctx, func(p testcapnp.Test_seq_Params) error { p.SetN(n); return nil })
}

// remoteLog reads c's log through its log method.
func remoteLog(t *testing.T, e *env, c testcapnp.Test) []uint32 {
	t.Helper()
	f, rel := c.Log(e.ctx, nil)
	defer rel()
	r := testcapnp.Test_log_Results(mustAwait(t, "log()", f.Future))
	l, err := r.Ns()
	if err != nil {
		t.Fatalf("log(): %v", err)
	}
	out := make([]uint32, l.Len())
	for i := range out {
		out[i] = l.At(i)
	}
	return out
}

func child(t *testing.T, e *env, of testcapnp.Test, name string) testcapnp.Test {
	t.Helper()
	f, rel := of.Child(e.ctx, func(p testcapnp.Test_child_Params) error { return p.SetName(name) })
	defer rel()
	r := testcapnp.Test_child_Results(mustAwait(t, "child("+name+")", f.Future))
	c := r.Child().AddRef()
	t.Cleanup(c.Release)
	return c
}

func name(t *testing.T, e *env, c testcapnp.Test) string {
	t.Helper()
	f, rel := c.Name(e.ctx, nil)
	defer rel()
	r := testcapnp.Test_name_Results(mustAwait(t, "name()", f.Future))
	s, err := r.Name()
	if err != nil {
		t.Fatalf("name(): %v", err)
	}
	return s
}

func upTo(n int) []uint32 {
	s := make([]uint32, n)
	for i := range s {
		s[i] = uint32(i + 1)
	}
	return s
}

// ---- echo --------------------------------------------------------------

func testEcho(t *testing.T, e *env) {
	big := make([]byte, 1<<20)
	for i := range big {
		big[i] = byte(i*7 + i>>8)
	}
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"nil", nil},
		{"empty", []byte{}},
		{"16B", []byte("0123456789abcdef")},
		{"1MiB", big},
	} {
		f, rel := e.boot.Echo(e.ctx, func(p testcapnp.Test_echo_Params) error {
			if tc.data == nil {
				return nil
			}
			return p.SetData(tc.data)
		})
		r := testcapnp.Test_echo_Results(mustAwait(t, "echo "+tc.name, f.Future))
		if got, want := r.HasData(), tc.data != nil; got != want {
			t.Errorf("echo %s: result data non-null = %v, want %v (null vs empty not preserved)", tc.name, got, want)
		}
		d, err := r.Data()
		if err != nil {
			t.Errorf("echo %s: read result: %v", tc.name, err)
		}
		if !bytes.Equal(d, tc.data) {
			t.Errorf("echo %s: got %d bytes, want %d (content differs)", tc.name, len(d), len(tc.data))
		}
		rel()
	}
}

// ---- capabilities --------------------------------------------------------

// The client passes its own object; the server calls it back.
func testCapsClientToServer(t *testing.T, e *env) {
	_, lc := e.local(t, "local")
	f, rel := e.boot.CallBack(e.ctx, func(p testcapnp.Test_callBack_Params) error {
		if err := p.SetData([]byte("ping")); err != nil {
			return err
		}
		return p.SetCb(lc.AddRef())
	})
	defer rel()
	r := testcapnp.Test_callBack_Results(mustAwait(t, "callBack(local)", f.Future))
	if d, _ := r.Data(); string(d) != "ping" {
		t.Errorf("callBack(local) returned %q, want %q", d, "ping")
	}

	// A client-hosted promise (resolved later) passed as a parameter.
	pcl, res := callqueue.NewPromise()
	pc := testcapnp.Test(pcl)
	f2, rel2 := e.boot.CallBack(e.ctx, func(p testcapnp.Test_callBack_Params) error {
		if err := p.SetData([]byte("via promise")); err != nil {
			return err
		}
		return p.SetCb(pc.AddRef())
	})
	defer rel2()
	res.Fulfill(capnp.Client(lc))
	r2 := testcapnp.Test_callBack_Results(mustAwait(t, "callBack(local promise)", f2.Future))
	if d, _ := r2.Data(); string(d) != "via promise" {
		t.Errorf("callBack(local promise) returned %q", d)
	}
	pc.Release()
}

// The server returns new objects; the client calls them and passes one
// back to the server.
func testCapsServerToClient(t *testing.T, e *env) {
	a := child(t, e, e.boot, "alice")
	b := child(t, e, e.boot, "bob")
	if got := name(t, e, a); got != "alice" {
		t.Errorf("child name %q, want alice", got)
	}
	if got := name(t, e, b); got != "bob" {
		t.Errorf("child name %q, want bob", got)
	}
	if got := e.serverLive.Count(); got != 3 {
		t.Errorf("server has %d live objects, want 3 (root + 2 children)", got)
	}
	// A server object passed back to the server as a parameter.
	f, rel := a.CallBack(e.ctx, func(p testcapnp.Test_callBack_Params) error {
		if err := p.SetData([]byte("hi bob")); err != nil {
			return err
		}
		return p.SetCb(b.AddRef())
	})
	defer rel()
	r := testcapnp.Test_callBack_Results(mustAwait(t, "alice.callBack(bob)", f.Future))
	if d, _ := r.Data(); string(d) != "hi bob" {
		t.Errorf("alice.callBack(bob) returned %q", d)
	}
}

// A capability that makes a round trip comes back as the same capability:
// the client's own object as itself, a server object as the same import.
func testCapIdentity(t *testing.T, e *env) {
	holder := child(t, e, e.boot, "holder")
	_, lc := e.local(t, "local")
	srvObj := child(t, e, e.boot, "srv")
	for _, tc := range []struct {
		name string
		c    testcapnp.Test
	}{{"client's own object", lc}, {"server object", srvObj}} {
		hf, hrel := holder.Hold(e.ctx, func(p testcapnp.Test_hold_Params) error { return p.SetCap(tc.c.AddRef()) })
		mustAwait(t, "hold", hf.Future)
		hrel()
		gf, grel := holder.GetHeld(e.ctx, nil)
		r := testcapnp.Test_getHeld_Results(mustAwait(t, "getHeld", gf.Future))
		got := r.Cap()
		if err := got.Resolve(e.ctx); err != nil {
			t.Errorf("%s: resolve returned cap: %v", tc.name, err)
		}
		if !got.IsSame(tc.c) {
			t.Errorf("%s: getHeld did not return the same capability (got %v, want %v)", tc.name, got, tc.c)
		}
		grel()
	}
	df, drel := holder.DropHeld(e.ctx, nil)
	mustAwait(t, "dropHeld", df.Future)
	drel()
}

// ---- pipelining ------------------------------------------------------------

func testPipelineChain(t *testing.T, e *env) {
	f1, r1 := e.boot.Child(e.ctx, func(p testcapnp.Test_child_Params) error { return p.SetName("a") })
	defer r1()
	f2, r2 := f1.Child().Child(e.ctx, func(p testcapnp.Test_child_Params) error { return p.SetName("b") })
	defer r2()
	f3, r3 := f2.Child().Child(e.ctx, func(p testcapnp.Test_child_Params) error { return p.SetName("c") })
	defer r3()
	// Future.Client (behind f3.Child) must be called only once per field
	// while the call is unresolved: go-capnp v3.1.0-alpha.2 returns
	// without unlocking the promise when the pipelined client already
	// exists, and the second call deadlocks.
	c := f3.Child()
	fe, re := c.Echo(e.ctx, func(p testcapnp.Test_echo_Params) error { return p.SetData([]byte("deep")) })
	defer re()
	fn, rn := c.Name(e.ctx, nil)
	defer rn()
	// Nothing has been awaited so far.
	r := testcapnp.Test_echo_Results(mustAwait(t, "a.b.c.echo", fe.Future))
	if d, _ := r.Data(); string(d) != "deep" {
		t.Errorf("a.b.c.echo returned %q", d)
	}
	n := testcapnp.Test_name_Results(mustAwait(t, "a.b.c.name", fn.Future))
	if s, _ := n.Name(); s != "c" {
		t.Errorf("a.b.c.name = %q, want c", s)
	}
	for i, f := range []*capnp.Future{f1.Future, f2.Future, f3.Future} {
		mustAwait(t, fmt.Sprintf("child call %d", i+1), f)
	}
	if got := e.serverLive.Count(); got != 4 {
		t.Errorf("server has %d live objects, want 4 (root + a, b, c)", got)
	}
}

// ---- embargoes -------------------------------------------------------------

// embargoOrder makes n seq calls on the promise p, resolves it by
// calling resolve, optionally waits for resolve to return, makes n more
// seq calls on p, and checks every call returns. The caller checks the
// log of the target.
func embargoOrder(t *testing.T, e *env, p testcapnp.Test, n int, waitResolve bool, resolve func() (*capnp.Future, capnp.ReleaseFunc)) {
	t.Helper()
	type call struct {
		f   testcapnp.Test_seq_Results_Future
		rel capnp.ReleaseFunc
	}
	var calls []call
	for i := 1; i <= n; i++ {
		f, rel := seq(e, p, uint32(i))
		calls = append(calls, call{f, rel})
	}
	rf, rrel := resolve()
	defer rrel()
	if waitResolve {
		mustAwait(t, "resolving call", rf)
	}
	for i := n + 1; i <= 2*n; i++ {
		f, rel := seq(e, p, uint32(i))
		calls = append(calls, call{f, rel})
	}
	for i, c := range calls {
		r := testcapnp.Test_seq_Results(mustAwait(t, fmt.Sprintf("seq(%d)", i+1), c.f.Future))
		if r.N() != uint32(i+1) {
			t.Errorf("seq(%d) returned %d", i+1, r.N())
		}
		c.rel()
	}
	mustAwait(t, "resolving call", rf)
}

// Case A: a promise from the server resolves to the caller's own object.
func embargoA(waitResolve bool, n int) func(*testing.T, *env) {
	return func(t *testing.T, e *env) {
		promiser := child(t, e, e.boot, "promiser")
		lo, lc := e.local(t, "local")
		pf, prel := promiser.Promise(e.ctx, nil)
		defer prel()
		embargoOrder(t, e, pf.Cap(), n, waitResolve, func() (*capnp.Future, capnp.ReleaseFunc) {
			f, rel := promiser.ResolvePromise(e.ctx, func(p testcapnp.Test_resolvePromise_Params) error {
				return p.SetCap(lc.AddRef())
			})
			return f.Future, rel
		})
		if got, want := lo.Log(), upTo(2*n); !slices.Equal(got, want) {
			t.Errorf("client's object received seq calls in order %v, want %v (E-order broken across promise resolution to the caller)", got, want)
		}
	}
}

// Case B: a promise resolves to another object on the server.
func embargoB(waitResolve bool, n int) func(*testing.T, *env) {
	return func(t *testing.T, e *env) {
		promiser := child(t, e, e.boot, "promiser")
		target := child(t, e, e.boot, "target")
		pf, prel := promiser.Promise(e.ctx, nil)
		defer prel()
		embargoOrder(t, e, pf.Cap(), n, waitResolve, func() (*capnp.Future, capnp.ReleaseFunc) {
			f, rel := promiser.ResolvePromise(e.ctx, func(p testcapnp.Test_resolvePromise_Params) error {
				return p.SetCap(target.AddRef())
			})
			return f.Future, rel
		})
		if got, want := remoteLog(t, e, target), upTo(2*n); !slices.Equal(got, want) {
			t.Errorf("server object received seq calls in order %v, want %v (E-order broken across promise resolution to a server object)", got, want)
		}
	}
}

// Case C: getHeld returns the caller's own object. Calls pipelined on the
// unreturned result travel to the server and back; calls made after the
// return (on the result's capability, or on the same pipelined
// reference) must not overtake them.
func embargoC(samePipelineRef bool, n int) func(*testing.T, *env) {
	return func(t *testing.T, e *env) {
		holder := child(t, e, e.boot, "holder")
		lo, lc := e.local(t, "local")
		hf, hrel := holder.Hold(e.ctx, func(p testcapnp.Test_hold_Params) error { return p.SetCap(lc.AddRef()) })
		mustAwait(t, "hold(local)", hf.Future)
		hrel()

		gf, grel := holder.GetHeld(e.ctx, nil)
		defer grel()
		pipelined := gf.Cap()
		var rels []capnp.ReleaseFunc
		var futs []*capnp.Future
		for i := 1; i <= n; i++ {
			f, rel := seq(e, pipelined, uint32(i))
			futs, rels = append(futs, f.Future), append(rels, rel)
		}
		r := testcapnp.Test_getHeld_Results(mustAwait(t, "getHeld()", gf.Future))
		direct := r.Cap()
		if samePipelineRef {
			direct = pipelined
		}
		for i := n + 1; i <= 2*n; i++ {
			f, rel := seq(e, direct, uint32(i))
			futs, rels = append(futs, f.Future), append(rels, rel)
		}
		for i, f := range futs {
			sr := testcapnp.Test_seq_Results(mustAwait(t, fmt.Sprintf("seq(%d)", i+1), f))
			if sr.N() != uint32(i+1) {
				t.Errorf("seq(%d) returned %d", i+1, sr.N())
			}
			rels[i]()
		}
		if got, want := lo.Log(), upTo(2*n); !slices.Equal(got, want) {
			t.Errorf("client's object received seq calls in order %v, want %v (calls after the Return overtook calls pipelined on it)", got, want)
		}
		df, drel := holder.DropHeld(e.ctx, nil)
		mustAwait(t, "dropHeld", df.Future)
		drel()
	}
}

// A broken promise rejects calls made on it, before and after.
func testBrokenPromise(t *testing.T, e *env) {
	promiser := child(t, e, e.boot, "promiser")
	pf, prel := promiser.Promise(e.ctx, nil)
	defer prel()
	p := pf.Cap() // once only: see testPipelineChain
	before, brel := seq(e, p, 1)
	defer brel()
	kf, krel := promiser.BreakPromise(e.ctx, func(p testcapnp.Test_breakPromise_Params) error {
		return p.SetReason("promise broken on purpose")
	})
	defer krel()
	mustAwait(t, "breakPromise", kf.Future)
	after, arel := seq(e, p, 2)
	defer arel()
	for _, c := range []struct {
		name string
		f    *capnp.Future
	}{{"call before break", before.Future}, {"call after break", after.Future}} {
		_, err := await(t, c.name, c.f)
		if err == nil {
			t.Errorf("%s: succeeded on a broken promise", c.name)
			continue
		}
		if exc.TypeOf(err) != exc.Failed || !strings.Contains(err.Error(), "promise broken on purpose") {
			t.Errorf("%s: error %q (type %v), want failed with the break reason", c.name, err, exc.TypeOf(err))
		}
	}
}

// ---- errors ----------------------------------------------------------------

func testExceptions(t *testing.T, e *env) {
	for _, tc := range []struct {
		kind testcapnp.ExceptionKind
		want exc.Type
	}{
		{testcapnp.ExceptionKind_failed, exc.Failed},
		{testcapnp.ExceptionKind_overloaded, exc.Overloaded},
		{testcapnp.ExceptionKind_disconnected, exc.Disconnected},
		{testcapnp.ExceptionKind_unimplemented, exc.Unimplemented},
	} {
		reason := "deliberate " + tc.kind.String() + " failure #42"
		f, rel := e.boot.Fail(e.ctx, func(p testcapnp.Test_fail_Params) error {
			p.SetKind(tc.kind)
			return p.SetReason(reason)
		})
		_, err := await(t, "fail("+tc.kind.String()+")", f.Future)
		rel()
		if err == nil {
			t.Errorf("fail(%v) succeeded", tc.kind)
			continue
		}
		if got := exc.TypeOf(err); got != tc.want {
			t.Errorf("fail(%v): exc.TypeOf = %v, want %v (err %q)", tc.kind, got, tc.want, err)
		}
		var x *exc.Exception
		if !errors.As(err, &x) {
			t.Errorf("fail(%v): errors.As(*exc.Exception) false for %#v", tc.kind, err)
		} else if x.Type != tc.want {
			t.Errorf("fail(%v): Exception.Type = %v, want %v", tc.kind, x.Type, tc.want)
		}
		if !strings.Contains(err.Error(), reason) {
			t.Errorf("fail(%v): error %q lacks the reason %q", tc.kind, err, reason)
		}
	}
	// The connection still works.
	checkAlive(t, e, e.boot, "seq after exceptions")
}

// checkAlive makes a seq call on c and fails the test unless it returns.
func checkAlive(t *testing.T, e *env, c testcapnp.Test, what string) {
	t.Helper()
	f, rel := seq(e, c, 1)
	defer rel()
	mustAwait(t, what, f.Future)
}

func testUnknownMethod(t *testing.T, e *env) {
	for _, m := range []capnp.Method{
		{InterfaceID: 0x1234, MethodID: 9, InterfaceName: "unknown", MethodName: "nine"},
		{InterfaceID: testcapnp.Test_TypeID, MethodID: 99, InterfaceName: "test.capnp:Test", MethodName: "ninetyNine"},
	} {
		ans, rel := capnp.Client(e.boot).SendCall(e.ctx, capnp.Send{
			Method:    m,
			ArgsSize:  capnp.ObjectSize{DataSize: 8},
			PlaceArgs: func(capnp.Struct) error { return nil },
		})
		_, err := await(t, m.String(), ans.Future())
		rel()
		if err == nil {
			t.Errorf("%v: succeeded", m)
		} else if exc.TypeOf(err) != exc.Unimplemented {
			t.Errorf("%v: error %q has type %v, want unimplemented", m, err, exc.TypeOf(err))
		}
	}
	checkAlive(t, e, e.boot, "seq after unknown methods")
}

// ---- cancellation, release, disconnect --------------------------------------

func testCancel(t *testing.T, e *env) {
	bctx, cancel := context.WithCancel(e.ctx)
	defer cancel()
	f, rel := e.boot.Block(bctx, nil)
	defer rel()
	select {
	case <-e.root.BlockStarted():
	case <-time.After(waitTimeout):
		t.Fatal("server never started block()")
	}
	cancel()
	start := time.Now()
	if _, err := await(t, "cancelled block()", f.Future); err == nil {
		t.Error("cancelled block() returned no error")
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("cancelled block() took %v to return", d)
	}
	select {
	case <-e.root.BlockCancelled():
	case <-time.After(waitTimeout):
		t.Fatal("server-side block() never saw its context cancelled (no Finish sent, or not acted on)")
	}
	checkAlive(t, e, e.boot, "seq after cancel")
}

// After the client drops everything, the server is back to its baseline.
// (Teardown checks the same after every scenario; this one makes sure
// there was plenty to release.)
func testRelease(t *testing.T, e *env) {
	base := e.serverLive.Count()
	if base != 1 {
		t.Fatalf("server has %d live objects at start, want 1", base)
	}
	// Children, pipelined and not.
	f1, r1 := e.boot.Child(e.ctx, func(p testcapnp.Test_child_Params) error { return p.SetName("x") })
	f2, r2 := f1.Child().Child(e.ctx, func(p testcapnp.Test_child_Params) error { return p.SetName("y") })
	mustAwait(t, "x.child", f2.Future)
	kept := testcapnp.Test_child_Results(mustAwait(t, "x", f1.Future)).Child().AddRef()
	// Client objects held and dropped by the server, promises settled.
	_, lc := e.local(t, "local")
	hf, hrel := kept.Hold(e.ctx, func(p testcapnp.Test_hold_Params) error { return p.SetCap(lc.AddRef()) })
	mustAwait(t, "hold", hf.Future)
	pf, prel := kept.Promise(e.ctx, nil)
	rf, rrel := kept.ResolvePromise(e.ctx, func(p testcapnp.Test_resolvePromise_Params) error { return p.SetCap(lc.AddRef()) })
	mustAwait(t, "resolvePromise", rf.Future)
	sf, srel := seq(e, pf.Cap(), 1)
	mustAwait(t, "seq on resolved promise", sf.Future)
	cf, crel := e.boot.CallBack(e.ctx, func(p testcapnp.Test_callBack_Params) error { return p.SetCb(lc.AddRef()) })
	mustAwait(t, "callBack", cf.Future)
	if got := e.serverLive.Count(); got != 3 {
		t.Errorf("server has %d live objects, want 3", got)
	}
	for _, r := range []capnp.ReleaseFunc{r1, r2, hrel, prel, rrel, srel, crel} {
		r()
	}
	kept.Release()

	ctx, cancel := context.WithTimeout(e.ctx, waitTimeout)
	defer cancel()
	if err := e.serverLive.Wait(ctx, base); err != nil {
		t.Errorf("server has %d live objects %v after the client released them, want %d", e.serverLive.Count(), waitTimeout, base)
	}
	// The client's local reference lc is still held by this test, so the
	// client object lives; what the server held of it must be gone.
	// Teardown then releases the bootstrap and checks both sides' tables.
}

// disconnect makes a pending block() call, then ends the server side by
// cut: closing the server Conn, or closing its socket under it (the client
// sees EOF). The client's connection must end, calls on it fail with
// disconnected, and the server's handler sees its context cancelled. If
// checkPending, the pending call must fail with disconnected too.
func disconnect(cut string, checkPending bool) func(*testing.T, *env) {
	return func(t *testing.T, e *env) {
		f, rel := e.boot.Block(e.ctx, nil)
		defer rel()
		select {
		case <-e.root.BlockStarted():
		case <-time.After(waitTimeout):
			t.Fatal("server never started block()")
		}
		e.serverClosed = true
		switch cut {
		case "close":
			e.server.Close()
		case "eof":
			e.serverSock.Close()
		}
		_, err := await(t, "block() across the disconnect", f.Future)
		if checkPending {
			if err == nil {
				t.Error("pending block() returned success after the server went away")
			} else if !capnp.IsDisconnected(err) {
				t.Errorf("pending block() failed with %q (type %v), want disconnected", err, exc.TypeOf(err))
			}
		}
		select {
		case <-e.client.Done():
		case <-time.After(waitTimeout):
			t.Error("client conn Done() not closed after the server went away")
		}
		select {
		case <-e.root.BlockCancelled():
		case <-time.After(waitTimeout):
			t.Error("server's block() context not cancelled when its connection ended")
		}
		// Calls after the disconnect fail with disconnected too.
		sf, srel := seq(e, e.boot, 1)
		defer srel()
		if _, err := await(t, "seq after disconnect", sf.Future); !capnp.IsDisconnected(err) {
			t.Errorf("seq after disconnect: %v (type %v), want disconnected", err, exc.TypeOf(err))
		}
	}
}

// goCapnpClientEmbargo names the go-capnp client bug that breaks E-order
// when a promise resolves back to the caller while calls keep flowing.
func goCapnpClientEmbargo(p pairing) string {
	if p.client == gocapnp {
		return "SKIP (go-capnp v3.1.0-alpha.2 client bug): a call made on the promise while its Resolve " +
			"(receiverHosted) is being processed goes out to the old promise import AFTER the client's own " +
			"Disembargo(senderLoopback), so the reflected Disembargo lifts the embargo before that call comes back " +
			"and later calls overtake it. Wire trace (gocapnp client, our server): <- Resolve promise#2 receiverHosted#0, " +
			"-> Disembargo import#2 senderLoopback 0, -> Call import#2 seq(3), <- Disembargo receiverLoopback 0, " +
			"<- Call seq(3); the client's object logs [1 2 4 3]. Fails 1-10% of runs against either server; " +
			"the _pipelined variant, whose calls 3 and 4 go out before the resolving call returns, 1 run in " +
			"300 to 2,000 against our server (the same trace: seq(3), pipelined on the promise's answer, goes out " +
			"after the Disembargo; not seen in 600 runs against go-capnp's server). " +
			"Run -wiretrace to see it. Covered with our core as the client."
	}
	return ""
}

// goCapnpClientLateCall names the go-capnp client race that lets a call
// pipelined on a result overtake later calls when the Return arrives while
// the call is being made.
func goCapnpClientLateCall(p pairing) string {
	if p.client == gocapnp {
		return "SKIP (go-capnp v3.1.0-alpha.2 client race): a call made on a pipelined capability while the " +
			"question's Return is being handled can reach question.PipelineSend after parseReturn has computed the " +
			"embargoes from q.called, so it goes out pipelined with no embargo and comes back after the calls made " +
			"directly on the returned (local) capability. Seen in about 1 of 1,000 runs, against go-capnp's own " +
			"server as well as ours (the client's object logged [2 3 ... 50 1]). Covered with our core as the client."
	}
	return ""
}

// goCapnpServerClose names the go-capnp bug that makes a pending call
// succeed when a go-capnp server closes.
func goCapnpServerClose(p pairing) string {
	if p.server == gocapnp {
		return "SKIP (go-capnp v3.1.0-alpha.2 server bug): when a go-capnp rpc.Conn closes while a call's handler is running, " +
			"the handler's error return goes out as a Return whose exception was never filled in (rpc/answer.go " +
			"prepareSendException skips NewException once bgctx is done, completeSendException still sends), i.e. an " +
			"empty *success*; the client then sees block() succeed. Covered instead by disconnect_peerEOF_pendingCall."
	}
	return ""
}
