package cppinterop

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/exc"

	"github.com/captp-go/captp/adapters/unix"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// goClientEnv is what a Go-client scenario gets: a connection to the C++
// server and its bootstrap capability.
type goClientEnv struct {
	ctx  context.Context
	srv  *cppServer
	conn *core.Conn
	boot testcapnp.Test
	live *testimpl.Live // counts the Go objects the scenario creates
}

// goScenarios run with a Go client against the C++ server. In embargo
// and forwarded, C++ forwards our calls back to us as tail calls (see
// TestTailCallFromCpp).
var goScenarios = []struct {
	name string
	run  func(t *testing.T, e *goClientEnv)
}{
	{"echo", goEcho},
	{"caps", goCaps},
	{"pipeline", goPipeline},
	{"embargo", goEmbargo},
	{"forwarded", goForwarded},
	{"exceptions", goExceptions},
	{"cancel", goCancel},
	{"unimplemented", goUnimplemented},
	{"release", goRelease},
}

func dialAddr(ctx context.Context, addr string, log *slog.Logger) (*core.Conn, error) {
	return unix.Dial(ctx, addr, &core.Options{Logger: log})
}

// TestGoClientCppServer runs every scenario with captp as the client and
// the C++ reference implementation as the server.
func TestGoClientCppServer(t *testing.T) {
	requireCpp(t)
	for _, transport := range transports {
		t.Run(transport, func(t *testing.T) {
			t.Parallel()
			ctx := testCtx(t, 60*time.Second)
			srv := startCppServer(t, ctx, transport)
			for _, sc := range goScenarios {
				t.Run(sc.name, func(t *testing.T) {
					ctx := testCtx(t, 30*time.Second)
					conn, err := dialAddr(ctx, srv.addr, testLogger(t))
					if err != nil {
						t.Fatalf("Dial(%s): %v", srv.addr, err)
					}
					e := &goClientEnv{ctx: ctx, srv: srv, conn: conn, live: new(testimpl.Live)}
					e.boot = testcapnp.Test(conn.Bootstrap(ctx))
					defer func() {
						e.boot.Release()
						if err := conn.Close(); err != nil {
							t.Errorf("Close: %v", err)
						}
						if err := e.live.WaitZero(ctx); err != nil {
							t.Errorf("%d Go objects still live after the connection closed", e.live.Count())
						}
						// Every C++ object but the bootstrap goes with the connection.
						if _, err := srv.waitStats(ctx, "C++ live objects back to 1", func(s cppStats) bool { return s.Live == 1 }); err != nil {
							t.Errorf("C++ server: %v", err)
						}
					}()
					sc.run(t, e)
				})
			}
		})
	}
}

func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + n)
	}
	return b
}

// echoCall returns the result data and whether it was non-null.
func echoCall(ctx context.Context, c testcapnp.Test, data []byte, set bool) ([]byte, bool, error) {
	f, release := c.Echo(ctx, func(p testcapnp.Test_echo_Params) error {
		if !set {
			return nil
		}
		return p.SetData(data)
	})
	defer release()
	res, err := f.Struct()
	if err != nil {
		return nil, false, err
	}
	if !res.HasData() {
		return nil, false, nil
	}
	d, err := res.Data()
	return bytes.Clone(d), true, err
}

func nameOf(ctx context.Context, c testcapnp.Test) (string, error) {
	f, release := c.Name(ctx, nil)
	defer release()
	res, err := f.Struct()
	if err != nil {
		return "", err
	}
	return res.Name()
}

func goEcho(t *testing.T, e *goClientEnv) {
	if d, has, err := echoCall(e.ctx, e.boot, nil, false); err != nil || has {
		t.Errorf("echo(null) = %q (non-null %v), %v; want null", d, has, err)
	}
	if d, has, err := echoCall(e.ctx, e.boot, []byte{}, true); err != nil || !has || len(d) != 0 {
		t.Errorf("echo(empty) = %q (non-null %v), %v; want empty, non-null", d, has, err)
	}
	for _, n := range []int{16, 1 << 20} {
		want := pattern(n)
		d, has, err := echoCall(e.ctx, e.boot, want, true)
		if err != nil || !has || !bytes.Equal(d, want) {
			t.Errorf("echo(%d bytes) = %d bytes (non-null %v), %v; want the same bytes", n, len(d), has, err)
		}
	}
	st, err := e.srv.stats(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("C++ server after echo: %+v", st)
}

// goCaps passes capabilities both ways: a Go object to C++ and called back;
// held by C++ and returned to us (it must be our own object again); a C++
// object to us.
func goCaps(t *testing.T, e *goClientEnv) {
	local := testimpl.New("go-local", e.live)
	lc := local.Client()

	f, release := e.boot.CallBack(e.ctx, func(p testcapnp.Test_callBack_Params) error {
		if err := p.SetCb(lc.AddRef()); err != nil {
			return err
		}
		return p.SetData([]byte("ping"))
	})
	res, err := f.Struct()
	var got []byte
	if err == nil {
		got, err = res.Data()
	}
	if err != nil || string(got) != "ping" {
		t.Errorf("callBack(go-local, ping) = %q, %v; want ping", got, err)
	}
	release()

	hf, release := e.boot.Hold(e.ctx, func(p testcapnp.Test_hold_Params) error { return p.SetCap(lc.AddRef()) })
	if _, err := hf.Struct(); err != nil {
		t.Fatalf("hold: %v", err)
	}
	release()
	// Wait for getHeld's answer, so the calls below go to the capability
	// C++ returned; goForwarded pipelines on it instead (a tail call).
	gf, releaseGet := e.boot.GetHeld(e.ctx, nil)
	gres, err := gf.Struct()
	if err != nil {
		t.Fatalf("getHeld: %v", err)
	}
	back := gres.Cap().AddRef()
	releaseGet()
	if n, err := nameOf(e.ctx, back); err != nil || n != "go-local" {
		t.Errorf("getHeld().name() = %q, %v; want go-local", n, err)
	}
	sf, release := back.Seq(e.ctx, func(p testcapnp.Test_seq_Params) error { p.SetN(7); return nil })
	if _, err := sf.Struct(); err != nil {
		t.Errorf("getHeld().seq(7): %v", err)
	}
	release()
	if log := local.Log(); !slices.Equal(log, []uint32{7}) {
		t.Errorf("go-local's seq log = %v; want [7]: the returned capability is not our object", log)
	}
	if !back.IsSame(lc) {
		t.Logf("note: the capability C++ returned (receiverHosted) is not IsSame with the local one")
	}
	back.Release()

	cf, release := e.boot.Child(e.ctx, func(p testcapnp.Test_child_Params) error { return p.SetName("from-server") })
	child := cf.Child().AddRef()
	release()
	if n, err := nameOf(e.ctx, child); err != nil || n != "from-server" {
		t.Errorf("child().name() = %q, %v; want from-server", n, err)
	}
	child.Release()

	df, release := e.boot.DropHeld(e.ctx, nil)
	if _, err := df.Struct(); err != nil {
		t.Errorf("dropHeld: %v", err)
	}
	release()
	lc.Release()
	if err := e.live.WaitZero(e.ctx); err != nil {
		t.Errorf("the C++ server did not release go-local: %d Go objects live", e.live.Count())
	}
}

// goForwarded pipelines a call on getHeld's result, which is our own
// object: C++ receives the call and forwards it back to us.
func goForwarded(t *testing.T, e *goClientEnv) {
	live := e.live
	if live == nil {
		live = new(testimpl.Live)
	}
	local := testimpl.New("go-local", live)
	lc := local.Client()
	defer lc.Release()
	hf, release := e.boot.Hold(e.ctx, func(p testcapnp.Test_hold_Params) error { return p.SetCap(lc.AddRef()) })
	if _, err := hf.Struct(); err != nil {
		t.Fatalf("hold: %v", err)
	}
	release()
	gf, releaseGet := e.boot.GetHeld(e.ctx, nil)
	defer releaseGet()
	if n, err := nameOf(e.ctx, gf.Cap()); err != nil || n != "go-local" {
		t.Errorf("getHeld().name(), pipelined = %q, %v; want go-local", n, err)
	}
	df, release := e.boot.DropHeld(e.ctx, nil)
	if _, err := df.Struct(); err != nil {
		t.Errorf("dropHeld: %v", err)
	}
	release()
}

// goPipeline sends child(a).child(b).child(c).name() before any answer.
func goPipeline(t *testing.T, e *goClientEnv) {
	child := func(parent testcapnp.Test, n string) (testcapnp.Test_child_Results_Future, capnp.ReleaseFunc) {
		return parent.Child(e.ctx, func(p testcapnp.Test_child_Params) error { return p.SetName(n) })
	}
	f1, r1 := child(e.boot, "a")
	defer r1()
	f2, r2 := child(f1.Child(), "b")
	defer r2()
	f3, r3 := child(f2.Child(), "c")
	defer r3()
	nf, rn := f3.Child().Name(e.ctx, nil)
	defer rn()
	res, err := nf.Struct()
	var n string
	if err == nil {
		n, err = res.Name()
	}
	if err != nil || n != "c" {
		t.Errorf("child(a).child(b).child(c).name() = %q, %v; want c", n, err)
	}
}

// goEmbargo calls through a promise that the C++ server resolves to our
// own object; every call must reach it in order.
func goEmbargo(t *testing.T, e *goClientEnv) {
	local := testimpl.New("go-local", e.live)
	lc := local.Client()
	pf, releaseP := e.boot.Promise(e.ctx, nil)
	p := pf.Cap()
	const n = 60
	type pending struct {
		f       testcapnp.Test_seq_Results_Future
		release capnp.ReleaseFunc
	}
	var calls []pending
	seq := func(i uint32) {
		f, rel := p.Seq(e.ctx, func(s testcapnp.Test_seq_Params) error { s.SetN(i); return nil })
		calls = append(calls, pending{f, rel})
	}
	wait := func() {
		for i, c := range calls {
			if _, err := c.f.Struct(); err != nil {
				t.Errorf("seq call %d: %v", i, err)
			}
			c.release()
		}
		calls = nil
	}
	for i := range uint32(n / 3) {
		seq(i)
	}
	rf, releaseR := e.boot.ResolvePromise(e.ctx, func(s testcapnp.Test_resolvePromise_Params) error {
		return s.SetCap(lc.AddRef())
	})
	for i := uint32(n / 3); i < 2*n/3; i++ {
		seq(i)
	}
	if _, err := rf.Struct(); err != nil {
		t.Errorf("resolvePromise: %v", err)
	}
	releaseR()
	wait()
	for i := uint32(2 * n / 3); i < n; i++ {
		seq(i)
	}
	wait()
	releaseP()
	lc.Release()
	want := make([]uint32, n)
	for i := range want {
		want[i] = uint32(i)
	}
	if got := local.Log(); !slices.Equal(got, want) {
		t.Errorf("calls through the promise arrived as %v; want 0..%d in order", got, n-1)
	}
}

var exceptionKinds = []struct {
	kind testcapnp.ExceptionKind
	typ  exc.Type
}{
	{testcapnp.ExceptionKind_failed, exc.Failed},
	{testcapnp.ExceptionKind_overloaded, exc.Overloaded},
	{testcapnp.ExceptionKind_disconnected, exc.Disconnected},
	{testcapnp.ExceptionKind_unimplemented, exc.Unimplemented},
}

func goExceptions(t *testing.T, e *goClientEnv) {
	for _, k := range exceptionKinds {
		reason := fmt.Sprintf("reason for %v: café ✓", k.kind)
		f, release := e.boot.Fail(e.ctx, func(p testcapnp.Test_fail_Params) error {
			p.SetKind(k.kind)
			return p.SetReason(reason)
		})
		_, err := f.Struct()
		release()
		t.Logf("fail(%v) -> %v", k.kind, err)
		if err == nil {
			t.Errorf("fail(%v) succeeded", k.kind)
			continue
		}
		if got := exc.TypeOf(err); got != k.typ {
			t.Errorf("fail(%v) raised type %v; want %v", k.kind, got, k.typ)
		}
		if !strings.Contains(err.Error(), reason) {
			t.Errorf("fail(%v) error %q lost the reason %q", k.kind, err, reason)
		}
	}

	pf, releaseP := e.boot.Promise(e.ctx, nil)
	nf, releaseN := pf.Cap().Name(e.ctx, nil)
	bf, releaseB := e.boot.BreakPromise(e.ctx, func(p testcapnp.Test_breakPromise_Params) error {
		return p.SetReason("broken on purpose")
	})
	if _, err := bf.Struct(); err != nil {
		t.Errorf("breakPromise: %v", err)
	}
	_, err := nf.Struct()
	t.Logf("call on broken promise -> %v", err)
	if err == nil || exc.TypeOf(err) != exc.Failed || !strings.Contains(err.Error(), "broken on purpose") {
		t.Errorf("call on a broken promise = %v; want a failed exception with the reason", err)
	}
	releaseB()
	releaseN()
	releaseP()
}

// goCancel cancels a block() call; the C++ server must destroy the call's
// promise (its cancellation counter goes up) while the connection stays.
func goCancel(t *testing.T, e *goClientEnv) {
	before, err := e.srv.stats(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	cctx, cancel := context.WithCancel(e.ctx)
	f, release := e.boot.Block(cctx, nil)
	defer release()
	if _, err := e.srv.waitStats(e.ctx, "block to start", func(s cppStats) bool { return s.Started == before.Started+1 }); err != nil {
		t.Fatal(err)
	}
	cancel()
	if _, err := f.Struct(); err == nil {
		t.Error("cancelled block() returned success")
	} else {
		t.Logf("cancelled block() -> %v", err)
	}
	if _, err := e.srv.waitStats(e.ctx, "C++ to cancel block", func(s cppStats) bool { return s.Cancelled == before.Cancelled+1 }); err != nil {
		t.Fatal(err)
	}
	// The connection is still usable.
	if _, _, err := echoCall(e.ctx, e.boot, []byte("after"), true); err != nil {
		t.Errorf("echo after cancelling: %v", err)
	}
}

// rawCall calls method (interfaceID, methodID) on c with empty parameters.
func rawCall(ctx context.Context, c capnp.Client, interfaceID uint64, methodID uint16) error {
	ans, release := c.SendCall(ctx, capnp.Send{
		Method: capnp.Method{InterfaceID: interfaceID, MethodID: methodID, InterfaceName: "raw", MethodName: "raw"},
	})
	defer release()
	_, err := ans.Struct()
	return err
}

func goUnimplemented(t *testing.T, e *goClientEnv) {
	for _, c := range []struct {
		what  string
		iface uint64
		meth  uint16
	}{
		{"unknown method", testcapnp.Test_TypeID, 200},
		{"unknown interface", 0xa1b2c3d4e5f60718, 0},
	} {
		err := rawCall(e.ctx, capnp.Client(e.boot), c.iface, c.meth)
		t.Logf("%s -> %v", c.what, err)
		if !capnp.IsUnimplemented(err) {
			t.Errorf("%s: %v; want an unimplemented exception", c.what, err)
		}
	}
	if _, _, err := echoCall(e.ctx, e.boot, []byte("after"), true); err != nil {
		t.Errorf("echo after unimplemented calls: %v", err)
	}
}

// goRelease takes references both ways, drops them, and checks while
// connected that the C++ server is back to its bootstrap object only,
// that it dropped our objects, and that our tables are empty.
func goRelease(t *testing.T, e *goClientEnv) {
	func() {
		local := testimpl.New("go-local", e.live)
		lc := local.Client()
		defer lc.Release()
		f1, r1 := e.boot.Child(e.ctx, func(p testcapnp.Test_child_Params) error { return p.SetName("r1") })
		defer r1()
		f2, r2 := f1.Child().Child(e.ctx, func(p testcapnp.Test_child_Params) error { return p.SetName("r2") })
		defer r2()
		c2 := f2.Child().AddRef()
		defer c2.Release()
		if _, err := nameOf(e.ctx, c2); err != nil {
			t.Fatal(err)
		}
		pf, rp := e.boot.Promise(e.ctx, nil)
		defer rp()
		rf, rr := e.boot.ResolvePromise(e.ctx, func(p testcapnp.Test_resolvePromise_Params) error { return p.SetCap(c2.AddRef()) })
		defer rr()
		if _, err := rf.Struct(); err != nil {
			t.Fatal(err)
		}
		if _, err := nameOf(e.ctx, pf.Cap()); err != nil {
			t.Fatal(err)
		}
		hf, rh := e.boot.Hold(e.ctx, func(p testcapnp.Test_hold_Params) error { return p.SetCap(lc.AddRef()) })
		defer rh()
		if _, err := hf.Struct(); err != nil {
			t.Fatal(err)
		}
		gf, rg := e.boot.GetHeld(e.ctx, nil)
		defer rg()
		gres, err := gf.Struct() // not pipelined (goForwarded pipelines)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := nameOf(e.ctx, gres.Cap()); err != nil {
			t.Fatal(err)
		}
		cf, rc := c2.CallBack(e.ctx, func(p testcapnp.Test_callBack_Params) error { return p.SetCb(lc.AddRef()) })
		defer rc()
		if _, err := cf.Struct(); err != nil {
			t.Fatal(err)
		}
		df, rd := e.boot.DropHeld(e.ctx, nil)
		defer rd()
		if _, err := df.Struct(); err != nil {
			t.Fatal(err)
		}
	}()
	if err := e.live.WaitZero(e.ctx); err != nil {
		t.Errorf("C++ server still holds %d Go objects", e.live.Count())
	}
	if _, err := e.srv.waitStats(e.ctx, "C++ live objects back to 1 while connected", func(s cppStats) bool { return s.Live == 1 }); err != nil {
		t.Error(err)
	}
	// With the bootstrap capability released too, our tables empty out.
	e.boot.Release()
	e.boot = testcapnp.Test{}
	if err := waitConnStats(e.ctx, e.conn, func(s core.Stats) bool { return s.IsZero() }); err != nil {
		t.Errorf("our tables after releasing everything: %v", err)
	}
}

// waitConnStats polls conn.Stats until ok accepts them or ctx ends.
func waitConnStats(ctx context.Context, conn *core.Conn, ok func(core.Stats) bool) error {
	for {
		st := conn.Stats()
		if ok(st) {
			return nil
		}
		select {
		case <-time.After(5 * time.Millisecond):
		case <-ctx.Done():
			return fmt.Errorf("%w; tables: %v", ctx.Err(), st)
		}
	}
}
