// Package testnative serves and calls the Test interface of
// internal/testcapnp through captp's native path (core.Handler,
// core.Call) instead of capnpc-go's generated server and client.
//
// test.captp.go holds the stubs capnpc-captp generates from test.capnp
// (Test_Native, Test_NativeServer, ...). They live here, not next to
// capnpc-go's output in internal/testcapnp, because core's own tests
// import testcapnp and the stubs import core (see capnpc-captp's
// -package flag). Object implements Test_NativeServer; Test offers the
// calls the core tests and the benchmark use as thin wrappers over
// Test_Native.
package testnative

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/exc"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/callqueue"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// Object is a native Test object. Live, if set, counts objects whose
// capability is still referenced somewhere.
type Object struct {
	name string
	live *atomic.Int64

	blockStarted, blockCancelled chan struct{}

	mu       sync.Mutex
	seqLog   []uint32
	held     capnp.Client
	promise  capnp.Client // our reference to the outstanding promise
	resolver *callqueue.Promise
}

// Live counts live native objects (pass &N to New) and waits for a
// count, as testimpl.Live does for testimpl's objects.
type Live struct{ N atomic.Int64 }

// Count returns the number of live objects.
func (l *Live) Count() int64 { return l.N.Load() }

// Wait blocks until n objects are live or ctx ends.
func (l *Live) Wait(ctx context.Context, n int64) error {
	for l.N.Load() != n {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Millisecond):
		}
	}
	return nil
}

// WaitZero blocks until no object is live or ctx ends.
func (l *Live) WaitZero(ctx context.Context) error { return l.Wait(ctx, 0) }

// New returns a native Test object as a capability. live may be nil.
func New(name string, live *atomic.Int64) (capnp.Client, *Object) {
	o := &Object{name: name, live: live, blockStarted: make(chan struct{}, 64), blockCancelled: make(chan struct{}, 64)}
	if live != nil {
		live.Add(1)
	}
	return Test_NativeServerToClient((*server)(o)), o
}

// BlockStarted receives a value each time a block call starts (up to 64
// unread), as testimpl.Object's does.
func (o *Object) BlockStarted() <-chan struct{} { return o.blockStarted }

// BlockCancelled receives a value each time a block call sees its
// context end.
func (o *Object) BlockCancelled() <-chan struct{} { return o.blockCancelled }

// Log returns the numbers seq received, in order.
func (o *Object) Log() []uint32 {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]uint32(nil), o.seqLog...)
}

// Shutdown is called once no reference is left; an outstanding promise
// breaks.
func (o *Object) Shutdown() {
	o.mu.Lock()
	held, promise, resolver := o.held, o.promise, o.resolver
	o.held, o.promise, o.resolver = capnp.Client{}, capnp.Client{}, nil
	o.mu.Unlock()
	held.Release()
	if resolver != nil {
		resolver.Reject(exc.New(exc.Disconnected, "", "test object "+o.name+" shut down"))
	}
	promise.Release()
	if o.live != nil {
		o.live.Add(-1)
	}
}

// server is Object as a Test_NativeServer: a type of its own because
// the server's Log method would clash with Object.Log.
type server Object

var _ Test_NativeServer = (*server)(nil)

// Shutdown is the server's: see Object.Shutdown.
func (o *server) Shutdown() { (*Object)(o).Shutdown() }

// Echo returns the argument (null stays null). Large data goes back by
// reference to the arguments' buffer, not copied.
func (o *server) Echo(_ context.Context, call Test_echo_NativeServerCall) {
	args := call.Args()
	if !args.HasData() {
		_, err := call.Results()
		call.Return(err)
		return
	}
	d, err := args.Data()
	if err == nil {
		if d == nil {
			d = []byte{}
		}
		_, err = call.ResultsReferencingData(d)
	}
	call.Return(err)
}

// Fail throws an exception of the given kind with the given reason.
func (o *server) Fail(_ context.Context, call Test_fail_NativeServerCall) {
	args := call.Args()
	reason, err := args.Reason()
	if err != nil {
		call.Return(err)
		return
	}
	call.Return(testimpl.FailWith(args.Kind(), reason))
}

// Block returns only when cancelled: off the read loop. Later calls to
// this object wait behind it (unlike testimpl's, which calls Go).
func (o *server) Block(_ context.Context, call Test_block_NativeServerCall) {
	call.Go(func(ctx context.Context, _ Test_block_NativeServerCall) error {
		notify(o.blockStarted)
		<-ctx.Done()
		notify(o.blockCancelled)
		return ctx.Err()
	})
}

// Child returns a new native object named by the argument.
func (o *server) Child(_ context.Context, call Test_child_NativeServerCall) {
	name, err := call.Args().Name()
	if err == nil {
		var res testcapnp.Test_child_Results
		if res, err = call.Results(); err == nil {
			child, _ := New(name, o.live)
			err = res.SetChild(testcapnp.Test(child))
		}
	}
	call.Return(err)
}

// Name returns the object's name.
func (o *server) Name(_ context.Context, call Test_name_NativeServerCall) {
	res, err := call.Results()
	if err == nil {
		err = res.SetName(o.name)
	}
	call.Return(err)
}

// CallBack calls cb.echo(data) natively, off the read loop, and returns
// what cb returned.
func (o *server) CallBack(_ context.Context, call Test_callBack_NativeServerCall) {
	args := call.Args()
	cb := capnp.Client(args.Cb()).AddRef()
	d, err := args.Data()
	if err != nil {
		cb.Release()
		call.Return(err)
		return
	}
	data := append([]byte{}, d...)
	call.Go(func(ctx context.Context, call Test_callBack_NativeServerCall) error {
		defer cb.Release()
		p := Test{cb}.Echo(ctx, data)
		defer p.Release()
		got, err := p.Data(ctx)
		if err != nil {
			return fmt.Errorf("callBack: %w", err)
		}
		res, err := call.Results()
		if err != nil {
			return err
		}
		return res.SetData(got)
	})
}

// Hold keeps a reference to the argument until DropHeld.
func (o *server) Hold(_ context.Context, call Test_hold_NativeServerCall) {
	c := capnp.Client(call.Args().Cap()).AddRef()
	o.mu.Lock()
	old := o.held
	o.held = c
	o.mu.Unlock()
	old.Release()
	call.Return(nil)
}

// DropHeld releases the held capability.
func (o *server) DropHeld(_ context.Context, call Test_dropHeld_NativeServerCall) {
	o.mu.Lock()
	old := o.held
	o.held = capnp.Client{}
	o.mu.Unlock()
	old.Release()
	call.Return(nil)
}

// GetHeld returns the held capability.
func (o *server) GetHeld(_ context.Context, call Test_getHeld_NativeServerCall) {
	res, err := call.Results()
	if err == nil {
		o.mu.Lock()
		c := o.held.AddRef()
		o.mu.Unlock()
		err = res.SetCap(testcapnp.Test(c))
	}
	call.Return(err)
}

func notify(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// Promise returns a promise that settles on resolvePromise or
// breakPromise; one still outstanding from an earlier call breaks.
func (o *server) Promise(_ context.Context, call Test_promise_NativeServerCall) {
	res, err := call.Results()
	if err != nil {
		call.Return(err)
		return
	}
	p, r := callqueue.NewPromise()
	o.mu.Lock()
	oldP, oldR := o.promise, o.resolver
	o.promise, o.resolver = p, r
	out := p.AddRef()
	o.mu.Unlock()
	if oldR != nil {
		oldR.Reject(exc.New(exc.Failed, "", "promise superseded by a newer promise() call"))
	}
	oldP.Release()
	call.Return(res.SetCap(testcapnp.Test(out)))
}

// takePromise hands the outstanding promise over to be settled; the
// caller releases the returned reference once it has settled it.
func (o *server) takePromise() (*callqueue.Promise, capnp.Client, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	p, r := o.promise, o.resolver
	if r == nil {
		return nil, capnp.Client{}, exc.New(exc.Failed, "", "no outstanding promise")
	}
	o.promise, o.resolver = capnp.Client{}, nil
	return r, p, nil
}

// ResolvePromise fulfils the outstanding promise with the argument.
func (o *server) ResolvePromise(_ context.Context, call Test_resolvePromise_NativeServerCall) {
	r, p, err := o.takePromise()
	if err == nil {
		r.Fulfill(capnp.Client(call.Args().Cap()))
		p.Release()
	}
	call.Return(err)
}

// BreakPromise breaks the outstanding promise with a failed exception.
func (o *server) BreakPromise(_ context.Context, call Test_breakPromise_NativeServerCall) {
	reason, err := call.Args().Reason()
	if err != nil {
		call.Return(err)
		return
	}
	r, p, err := o.takePromise()
	if err == nil {
		r.Reject(exc.New(exc.Failed, "", reason))
		p.Release()
	}
	call.Return(err)
}

// Seq records n and returns it.
func (o *server) Seq(_ context.Context, call Test_seq_NativeServerCall) {
	n := call.Args().N()
	o.mu.Lock()
	o.seqLog = append(o.seqLog, n)
	o.mu.Unlock()
	res, err := call.Results()
	if err == nil {
		res.SetN(n)
	}
	call.Return(err)
}

// Log returns the numbers seq recorded.
func (o *server) Log(_ context.Context, call Test_log_NativeServerCall) {
	log := (*Object)(o).Log()
	res, err := call.Results()
	if err == nil {
		var l capnp.UInt32List
		if l, err = res.NewNs(int32(len(log))); err == nil {
			for i, n := range log {
				l.Set(i, n)
			}
		}
	}
	call.Return(err)
}

// Test is the client the core tests and the benchmark use: a capability
// to call natively, with plain-Go signatures over Test_Native.
type Test struct{ Client capnp.Client }

// Native returns the generated client of the same capability (not a
// new reference).
func (t Test) Native() Test_Native { return Test_Native(t) }

// Release releases the capability.
func (t Test) Release() { t.Client.Release() }

// Call is a pending call of the Test interface.
type Call struct{ core.PendingCall }

// EchoCall is a pending echo.
type EchoCall struct{ Test_echo_NativeCall }

// Echo sends echo(data); nil data sends a null pointer.
func (t Test) Echo(ctx context.Context, data []byte) EchoCall {
	if len(data) >= 64<<10 {
		// Large data goes out from data itself (see core.WithDataReference).
		ctx = core.WithDataReference(ctx, 0, data)
	}
	return EchoCall{t.Native().Echo(ctx, func(p testcapnp.Test_echo_Params) error {
		if data == nil || p.HasData() {
			return nil // null, or placed by reference
		}
		return p.SetData(data)
	})}
}

// Data waits for the echo and returns its data, valid until Release.
func (c EchoCall) Data(ctx context.Context) ([]byte, error) {
	res, err := c.Struct(ctx)
	if err != nil {
		return nil, err
	}
	return res.Data()
}

// ChildCall is a pending child call.
type ChildCall struct{ Test_child_NativeCall }

// Child sends child(name).
func (t Test) Child(ctx context.Context, name string) ChildCall {
	return ChildCall{t.Native().Child(ctx, func(p testcapnp.Test_child_Params) error { return p.SetName(name) })}
}

// Child returns the promised child, usable before the call returns. The
// caller releases it.
func (c ChildCall) Child() Test { return Test{c.Test_child_NativeCall.Child().Client} }

// Seq sends seq(n).
func (t Test) Seq(ctx context.Context, n uint32) Call {
	return Call{t.Native().Seq(ctx, func(p testcapnp.Test_seq_Params) error { p.SetN(n); return nil }).PendingCall}
}

// Block sends block(), which returns only when cancelled.
func (t Test) Block(ctx context.Context) Call {
	return Call{t.Native().Block(ctx, nil).PendingCall}
}

// EchoOrBlock sends echo() with no data, or block() if block is set, and
// waits for it with ctx: block returns only once ctx ends.
func (t Test) EchoOrBlock(ctx context.Context, block bool) error {
	var c core.PendingCall
	if block {
		c = t.Block(ctx).PendingCall
	} else {
		c = t.Echo(ctx, nil).PendingCall
	}
	defer c.Release()
	_, err := c.Wait(ctx)
	return err
}

// Name sends name() and waits for it.
func (t Test) Name(ctx context.Context) (string, error) {
	c := t.Native().Name(ctx, nil)
	defer c.Release()
	res, err := c.Struct(ctx)
	if err != nil {
		return "", err
	}
	return res.Name()
}

// Hold sends hold(cap) and waits for it.
func (t Test) Hold(ctx context.Context, cap capnp.Client) error {
	c := t.Native().Hold(ctx, func(p testcapnp.Test_hold_Params) error {
		return p.SetCap(testcapnp.Test(cap.AddRef()))
	})
	defer c.Release()
	_, err := c.Wait(ctx)
	return err
}

// CallBack sends callBack(cb, data) and waits for the data.
func (t Test) CallBack(ctx context.Context, cb capnp.Client, data []byte) ([]byte, error) {
	c := t.Native().CallBack(ctx, func(p testcapnp.Test_callBack_Params) error {
		if err := p.SetCb(testcapnp.Test(cb.AddRef())); err != nil {
			return err
		}
		return p.SetData(data)
	})
	defer c.Release()
	res, err := c.Struct(ctx)
	if err != nil {
		return nil, err
	}
	d, err := res.Data()
	return append([]byte(nil), d...), err
}
