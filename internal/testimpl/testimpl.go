// Package testimpl is the Go implementation of the Test interface from
// internal/testcapnp. Every test, interop test and the demo serve it.
package testimpl

import (
	"context"
	"sync"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/exc"

	"github.com/captp-go/captp/internal/callqueue"
	"github.com/captp-go/captp/internal/testcapnp"
)

// Live counts live Test servers (created minus shut down), so that tests
// can check that every capability was released. The zero value is ready.
type Live struct {
	mu      sync.Mutex
	n       int64
	changed chan struct{} // closed and replaced on every change
}

func (l *Live) add(d int64) {
	if l == nil {
		return
	}
	l.mu.Lock()
	l.n += d
	if l.changed != nil {
		close(l.changed)
		l.changed = nil
	}
	l.mu.Unlock()
}

// Count returns the number of live objects.
func (l *Live) Count() int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.n
}

// Wait blocks until the count equals n or ctx ends; then it returns
// ctx's error.
func (l *Live) Wait(ctx context.Context, n int64) error {
	for {
		l.mu.Lock()
		if l.n == n {
			l.mu.Unlock()
			return nil
		}
		if l.changed == nil {
			l.changed = make(chan struct{})
		}
		ch := l.changed
		l.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// WaitZero blocks until no object is live or ctx ends.
func (l *Live) WaitZero(ctx context.Context) error { return l.Wait(ctx, 0) }

// notifyCap is the buffer of the block notification channels; a test that
// starts more blocking calls than this without draining loses signals.
const notifyCap = 1024

// Object is one Test object. Create it with New and hand it out with
// Client.
type Object struct {
	name string
	live *Live

	blockStarted   chan struct{}
	blockCancelled chan struct{}

	mu       sync.Mutex
	weak     *capnp.WeakClient // the current server, if any
	servers  int               // servers created by Client and not yet shut down
	seqLog   []uint32
	held     capnp.Client
	promise  testcapnp.Test // our own reference to the outstanding promise
	resolver *callqueue.Promise

	// guarded objects (and their children) queue calls pipelined on their
	// calls in internal/callqueue rather than go-capnp's AnswerQueue (see
	// callqueue.Guard).
	guarded bool
}

// New returns a new object. live may be nil.
func New(name string, live *Live) *Object {
	return &Object{
		name:           name,
		live:           live,
		blockStarted:   make(chan struct{}, notifyCap),
		blockCancelled: make(chan struct{}, notifyCap),
	}
}

// NewGuarded is New for an object served through callqueue.Guard, as are
// the children it creates: for tests where go-capnp's rpc package
// delivers pipelined calls to it (go-capnp's server queue crashes on some
// of them, depending on timing).
func NewGuarded(name string, live *Live) *Object {
	o := New(name, live)
	o.guarded = true
	return o
}

// Name returns the object's name.
func (o *Object) Name() string { return o.name }

// Client returns a new reference to the object. While an earlier
// reference is alive, the new one refers to the same server (IsSame
// holds); otherwise a new server is started and counted in Live until it
// shuts down.
func (o *Object) Client() testcapnp.Test {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.weak != nil {
		if c, ok := o.weak.AddRef(); ok && c.IsValid() {
			return testcapnp.Test(c)
		}
	}
	o.servers++
	o.live.add(1)
	var h capnp.ClientHook = testcapnp.Test_NewServer(&server{o})
	if o.guarded {
		h = callqueue.Guard(h)
	}
	c := capnp.NewClient(h)
	w := c.WeakRef()
	o.weak = &w
	return testcapnp.Test(c)
}

// server implements testcapnp.Test_Server for an Object. Each server
// started by Client is one; Shutdown is called when its last reference is
// released and its calls have returned.
type server struct{ o *Object }

// Shutdown implements server.Shutdowner.
func (s *server) Shutdown() { s.o.shutdown() }

func (o *Object) shutdown() {
	o.mu.Lock()
	o.servers--
	var held capnp.Client
	var promise testcapnp.Test
	var resolver *callqueue.Promise
	if o.servers == 0 {
		held, o.held = o.held, capnp.Client{}
		promise, o.promise = o.promise, testcapnp.Test{}
		resolver, o.resolver = o.resolver, nil
		o.weak = nil
	}
	o.mu.Unlock()
	held.Release()
	if resolver != nil {
		resolver.Reject(exc.New(exc.Disconnected, "", "test object "+o.name+" shut down"))
		promise.Release()
	}
	o.live.add(-1)
}

// Log returns the numbers received by seq, in arrival order.
func (o *Object) Log() []uint32 {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]uint32(nil), o.seqLog...)
}

// BlockStarted receives one value each time a block call starts.
func (o *Object) BlockStarted() <-chan struct{} { return o.blockStarted }

// BlockCancelled receives one value each time a block call observes its
// context cancelled.
func (o *Object) BlockCancelled() <-chan struct{} { return o.blockCancelled }

func notify(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// Echo returns its argument, null as null and empty as empty.
func (s *server) Echo(ctx context.Context, call testcapnp.Test_echo) error {
	args := call.Args()
	res, err := call.AllocResults()
	if err != nil {
		return err
	}
	if !args.HasData() {
		return nil
	}
	d, err := args.Data()
	if err != nil {
		return err
	}
	if d == nil {
		d = []byte{}
	}
	return res.SetData(d)
}

// Fail returns an exception of the requested kind.
func (s *server) Fail(ctx context.Context, call testcapnp.Test_fail) error {
	args := call.Args()
	reason, err := args.Reason()
	if err != nil {
		return err
	}
	return FailWith(args.Kind(), reason)
}

// FailWith is the exception fail(kind, reason) returns (native test
// objects share it).
func FailWith(kind testcapnp.ExceptionKind, reason string) error {
	var t exc.Type
	switch kind {
	case testcapnp.ExceptionKind_failed:
		t = exc.Failed
	case testcapnp.ExceptionKind_overloaded:
		t = exc.Overloaded
	case testcapnp.ExceptionKind_disconnected:
		t = exc.Disconnected
	case testcapnp.ExceptionKind_unimplemented:
		t = exc.Unimplemented
	default:
		return exc.New(exc.Failed, "", "fail: unknown exception kind "+kind.String())
	}
	return exc.New(t, "", reason)
}

// Block returns when its context is cancelled. It lets other calls on the
// object proceed meanwhile.
func (s *server) Block(ctx context.Context, call testcapnp.Test_block) error {
	call.Go()
	notify(s.o.blockStarted)
	<-ctx.Done()
	notify(s.o.blockCancelled)
	return ctx.Err()
}

// Child returns a new object named by the argument, counted in the same
// Live.
func (s *server) Child(ctx context.Context, call testcapnp.Test_child) error {
	name, err := call.Args().Name()
	if err != nil {
		return err
	}
	res, err := call.AllocResults()
	if err != nil {
		return err
	}
	child := New(name, s.o.live)
	child.guarded = s.o.guarded
	return res.SetChild(child.Client())
}

// Name returns the object's name.
func (s *server) Name(ctx context.Context, call testcapnp.Test_name) error {
	res, err := call.AllocResults()
	if err != nil {
		return err
	}
	return res.SetName(s.o.name)
}

// CallBack calls cb.echo(data) and returns its result.
func (s *server) CallBack(ctx context.Context, call testcapnp.Test_callBack) error {
	args := call.Args()
	cb := args.Cb()
	var data []byte
	hasData := args.HasData()
	if hasData {
		d, err := args.Data()
		if err != nil {
			return err
		}
		data = append([]byte{}, d...)
	}
	// The call below may take a round trip; let other calls proceed (and
	// avoid deadlock when cb is this very object).
	call.Go()
	f, release := cb.Echo(ctx, func(p testcapnp.Test_echo_Params) error {
		if !hasData {
			return nil
		}
		return p.SetData(data)
	})
	defer release()
	r, err := f.Struct()
	if err != nil {
		return exc.Annotate("", "callBack", err)
	}
	res, err := call.AllocResults()
	if err != nil {
		return err
	}
	if !r.HasData() {
		return nil
	}
	d, err := r.Data()
	if err != nil {
		return err
	}
	if d == nil {
		d = []byte{}
	}
	return res.SetData(d)
}

// Hold keeps a reference to the argument, replacing any held before.
func (s *server) Hold(ctx context.Context, call testcapnp.Test_hold) error {
	c := capnp.Client(call.Args().Cap()).AddRef()
	s.o.mu.Lock()
	old := s.o.held
	s.o.held = c
	s.o.mu.Unlock()
	old.Release()
	return nil
}

// Held returns a new reference to the capability hold last stored (null
// if none), so that a test can call it from the holder's vat.
func (o *Object) Held() capnp.Client {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.held.AddRef()
}

// DropHeld releases the held reference.
func (s *server) DropHeld(ctx context.Context, call testcapnp.Test_dropHeld) error {
	s.o.mu.Lock()
	old := s.o.held
	s.o.held = capnp.Client{}
	s.o.mu.Unlock()
	old.Release()
	return nil
}

// GetHeld returns the held reference (null if none).
func (s *server) GetHeld(ctx context.Context, call testcapnp.Test_getHeld) error {
	res, err := call.AllocResults()
	if err != nil {
		return err
	}
	s.o.mu.Lock()
	c := s.o.held.AddRef()
	s.o.mu.Unlock()
	return res.SetCap(testcapnp.Test(c))
}

// Promise returns a promise that settles on resolvePromise or
// breakPromise. A promise still outstanding from an earlier call is
// broken.
func (s *server) Promise(ctx context.Context, call testcapnp.Test_promise) error {
	res, err := call.AllocResults()
	if err != nil {
		return err
	}
	pc, r := callqueue.NewPromise()
	p := testcapnp.Test(pc)
	s.o.mu.Lock()
	oldP, oldR := s.o.promise, s.o.resolver
	s.o.promise, s.o.resolver = p, r
	out := p.AddRef()
	s.o.mu.Unlock()
	if oldR != nil {
		oldR.Reject(exc.New(exc.Failed, "", "promise superseded by a newer promise() call"))
		oldP.Release()
	}
	return res.SetCap(out)
}

// takePromise hands the outstanding promise over to be settled; the
// caller releases the returned reference once it has settled it.
func (o *Object) takePromise() (*callqueue.Promise, testcapnp.Test, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	p, r := o.promise, o.resolver
	if r == nil {
		return nil, testcapnp.Test{}, exc.New(exc.Failed, "", "no outstanding promise")
	}
	o.promise, o.resolver = testcapnp.Test{}, nil
	return r, p, nil
}

// ResolvePromise fulfils the outstanding promise with the argument.
func (s *server) ResolvePromise(ctx context.Context, call testcapnp.Test_resolvePromise) error {
	r, p, err := s.o.takePromise()
	if err != nil {
		return err
	}
	r.Fulfill(capnp.Client(call.Args().Cap()))
	p.Release()
	return nil
}

// BreakPromise rejects the outstanding promise with a failed exception.
func (s *server) BreakPromise(ctx context.Context, call testcapnp.Test_breakPromise) error {
	reason, err := call.Args().Reason()
	if err != nil {
		return err
	}
	r, p, err := s.o.takePromise()
	if err != nil {
		return err
	}
	r.Reject(exc.New(exc.Failed, "", reason))
	p.Release()
	return nil
}

// Seq appends n to the log and returns it.
func (s *server) Seq(ctx context.Context, call testcapnp.Test_seq) error {
	n := call.Args().N()
	s.o.mu.Lock()
	s.o.seqLog = append(s.o.seqLog, n)
	s.o.mu.Unlock()
	res, err := call.AllocResults()
	if err != nil {
		return err
	}
	res.SetN(n)
	return nil
}

// Log returns the numbers seq has received, in arrival order.
func (s *server) Log(ctx context.Context, call testcapnp.Test_log) error {
	ns := s.o.Log()
	res, err := call.AllocResults()
	if err != nil {
		return err
	}
	l, err := res.NewNs(int32(len(ns)))
	if err != nil {
		return err
	}
	for i, n := range ns {
		l.Set(i, n)
	}
	return nil
}

var _ testcapnp.Test_Server = (*server)(nil)
