// Package testnative serves and calls the Test interface of
// internal/testcapnp through captp's native path (core.Handler,
// core.Call) instead of capnpc-go's generated server and client.
//
// The stubs here are written by hand; they are what a captp code
// generator would produce from test.capnp: a method switch for the
// server, typed call functions and pending-call wrappers for the client.
// Struct accessors still come from capnpc-go's generated code.
package testnative

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/exc"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
)

// Method ordinals of test.capnp's Test interface.
const (
	methodEcho     = 0
	methodFail     = 1
	methodBlock    = 2
	methodChild    = 3
	methodName     = 4
	methodCallBack = 5
	methodHold     = 6
	methodDropHeld = 7
	methodGetHeld  = 8
	methodSeq      = 12
	methodLog      = 13
)

func method(id uint16, name string) capnp.Method {
	return capnp.Method{InterfaceID: testcapnp.Test_TypeID, MethodID: id, InterfaceName: "test.capnp:Test", MethodName: name}
}

var (
	onePtr = capnp.ObjectSize{PointerCount: 1}
	twoPtr = capnp.ObjectSize{PointerCount: 2}
	oneU32 = capnp.ObjectSize{DataSize: 8}
)

// Object is a native Test object. Live, if set, counts objects whose
// capability is still referenced somewhere.
type Object struct {
	name string
	live *atomic.Int64

	// BlockStarted receives a value when a block call starts.
	BlockStarted chan struct{}

	mu     sync.Mutex
	seqLog []uint32
	held   capnp.Client
}

// New returns a native Test object as a capability. live may be nil.
func New(name string, live *atomic.Int64) (capnp.Client, *Object) {
	o := &Object{name: name, live: live, BlockStarted: make(chan struct{}, 64)}
	if live != nil {
		live.Add(1)
	}
	return core.NewClient(o), o
}

// Log returns the numbers seq received, in order.
func (o *Object) Log() []uint32 {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]uint32(nil), o.seqLog...)
}

// Shutdown is called once no reference is left.
func (o *Object) Shutdown() {
	o.mu.Lock()
	held := o.held
	o.held = capnp.Client{}
	o.mu.Unlock()
	held.Release()
	if o.live != nil {
		o.live.Add(-1)
	}
}

// HandleCall implements core.Handler.
func (o *Object) HandleCall(ctx context.Context, call *core.ServerCall) {
	m := call.Method()
	if m.InterfaceID != testcapnp.Test_TypeID {
		call.Return(exc.New(exc.Unimplemented, "", fmt.Sprintf("testnative: interface %#x", m.InterfaceID)))
		return
	}
	switch m.MethodID {
	case methodEcho:
		call.Return(o.echo(call))
	case methodFail:
		args := testcapnp.Test_fail_Params(call.Args())
		reason, err := args.Reason()
		if err != nil {
			call.Return(err)
			return
		}
		call.Return(exc.New(exc.Failed, "", reason))
	case methodBlock:
		// Blocks until cancelled: off the read loop. Later calls to this
		// object wait behind it (unlike testimpl's, which calls Go).
		call.Go(func(ctx context.Context, _ *core.ServerCall) error {
			select {
			case o.BlockStarted <- struct{}{}:
			default:
			}
			<-ctx.Done()
			return ctx.Err()
		})
	case methodChild:
		name, err := testcapnp.Test_child_Params(call.Args()).Name()
		if err == nil {
			var res capnp.Struct
			if res, err = call.Results(onePtr); err == nil {
				child, _ := New(name, o.live)
				err = testcapnp.Test_child_Results(res).SetChild(testcapnp.Test(child))
			}
		}
		call.Return(err)
	case methodName:
		res, err := call.Results(onePtr)
		if err == nil {
			err = testcapnp.Test_name_Results(res).SetName(o.name)
		}
		call.Return(err)
	case methodCallBack:
		args := testcapnp.Test_callBack_Params(call.Args())
		cb := capnp.Client(args.Cb()).AddRef()
		d, err := args.Data()
		if err != nil {
			cb.Release()
			call.Return(err)
			return
		}
		data := append([]byte{}, d...)
		call.Go(func(ctx context.Context, call *core.ServerCall) error {
			defer cb.Release()
			p := Test{cb}.Echo(ctx, data)
			defer p.Release()
			got, err := p.Data(ctx)
			if err != nil {
				return fmt.Errorf("callBack: %w", err)
			}
			res, err := call.Results(onePtr)
			if err != nil {
				return err
			}
			return testcapnp.Test_callBack_Results(res).SetData(got)
		})
	case methodHold:
		c := capnp.Client(testcapnp.Test_hold_Params(call.Args()).Cap()).AddRef()
		o.mu.Lock()
		old := o.held
		o.held = c
		o.mu.Unlock()
		old.Release()
		call.Return(nil)
	case methodDropHeld:
		o.mu.Lock()
		old := o.held
		o.held = capnp.Client{}
		o.mu.Unlock()
		old.Release()
		call.Return(nil)
	case methodGetHeld:
		res, err := call.Results(onePtr)
		if err == nil {
			o.mu.Lock()
			c := o.held.AddRef()
			o.mu.Unlock()
			err = testcapnp.Test_getHeld_Results(res).SetCap(testcapnp.Test(c))
		}
		call.Return(err)
	case methodSeq:
		n := testcapnp.Test_seq_Params(call.Args()).N()
		o.mu.Lock()
		o.seqLog = append(o.seqLog, n)
		o.mu.Unlock()
		res, err := call.Results(oneU32)
		if err == nil {
			testcapnp.Test_seq_Results(res).SetN(n)
		}
		call.Return(err)
	case methodLog:
		o.mu.Lock()
		log := append([]uint32(nil), o.seqLog...)
		o.mu.Unlock()
		res, err := call.Results(onePtr)
		if err == nil {
			var l capnp.UInt32List
			if l, err = testcapnp.Test_log_Results(res).NewNs(int32(len(log))); err == nil {
				for i, n := range log {
					l.Set(i, n)
				}
			}
		}
		call.Return(err)
	default:
		call.Return(exc.New(exc.Unimplemented, "", fmt.Sprintf("testnative: method %d not implemented", m.MethodID)))
	}
}

// echo returns the argument (null stays null). Large data goes back by
// reference to the arguments' buffer, not copied.
func (o *Object) echo(call *core.ServerCall) error {
	args := testcapnp.Test_echo_Params(call.Args())
	if !args.HasData() {
		_, err := call.Results(onePtr)
		return err
	}
	d, err := args.Data()
	if err != nil {
		return err
	}
	if d == nil {
		d = []byte{}
	}
	_, err = call.ResultsReferencing(onePtr, 0, d)
	return err
}

// Test is the client stub: a capability to call natively.
type Test struct{ Client capnp.Client }

// Release releases the capability.
func (t Test) Release() { t.Client.Release() }

// Call is a pending call of the Test interface.
type Call struct{ core.PendingCall }

// EchoCall is a pending echo.
type EchoCall struct{ Call }

// Echo sends echo(data).
func (t Test) Echo(ctx context.Context, data []byte) EchoCall {
	if len(data) >= 64<<10 {
		// Large data goes out from data itself (see core.WithDataReference).
		ctx = core.WithDataReference(ctx, 0, data)
	}
	return EchoCall{Call{core.Call(ctx, t.Client, capnp.Send{
		Method:   method(methodEcho, "echo"),
		ArgsSize: onePtr,
		PlaceArgs: func(s capnp.Struct) error {
			if data == nil || s.HasPtr(0) {
				return nil // null, or placed by reference
			}
			return testcapnp.Test_echo_Params(s).SetData(data)
		},
	})}}
}

// Data waits for the echo and returns its data, valid until Release.
func (c EchoCall) Data(ctx context.Context) ([]byte, error) {
	s, err := c.Wait(ctx)
	if err != nil {
		return nil, err
	}
	return testcapnp.Test_echo_Results(s).Data()
}

// ChildCall is a pending child call.
type ChildCall struct{ Call }

// Child sends child(name).
func (t Test) Child(ctx context.Context, name string) ChildCall {
	return ChildCall{Call{core.Call(ctx, t.Client, capnp.Send{
		Method:    method(methodChild, "child"),
		ArgsSize:  onePtr,
		PlaceArgs: func(s capnp.Struct) error { return testcapnp.Test_child_Params(s).SetName(name) },
	})}}
}

// Child returns the promised child, usable before the call returns. The
// caller releases it.
func (c ChildCall) Child() Test { return Test{c.Pipeline(0)} }

// Seq sends seq(n).
func (t Test) Seq(ctx context.Context, n uint32) Call {
	return Call{core.Call(ctx, t.Client, capnp.Send{
		Method:    method(methodSeq, "seq"),
		ArgsSize:  oneU32,
		PlaceArgs: func(s capnp.Struct) error { testcapnp.Test_seq_Params(s).SetN(n); return nil },
	})}
}

// Block sends block(), which returns only when cancelled.
func (t Test) Block(ctx context.Context) Call {
	return Call{core.Call(ctx, t.Client, capnp.Send{Method: method(methodBlock, "block")})}
}

// Name sends name().
func (t Test) Name(ctx context.Context) (string, error) {
	c := core.Call(ctx, t.Client, capnp.Send{Method: method(methodName, "name")})
	defer c.Release()
	s, err := c.Wait(ctx)
	if err != nil {
		return "", err
	}
	return testcapnp.Test_name_Results(s).Name()
}

// Hold sends hold(cap) and waits for it.
func (t Test) Hold(ctx context.Context, cap capnp.Client) error {
	c := core.Call(ctx, t.Client, capnp.Send{
		Method:   method(methodHold, "hold"),
		ArgsSize: onePtr,
		PlaceArgs: func(s capnp.Struct) error {
			return testcapnp.Test_hold_Params(s).SetCap(testcapnp.Test(cap.AddRef()))
		},
	})
	defer c.Release()
	_, err := c.Wait(ctx)
	return err
}

// CallBack sends callBack(cb, data) and waits for the data.
func (t Test) CallBack(ctx context.Context, cb capnp.Client, data []byte) ([]byte, error) {
	c := core.Call(ctx, t.Client, capnp.Send{
		Method:   method(methodCallBack, "callBack"),
		ArgsSize: twoPtr,
		PlaceArgs: func(s capnp.Struct) error {
			p := testcapnp.Test_callBack_Params(s)
			if err := p.SetCb(testcapnp.Test(cb.AddRef())); err != nil {
				return err
			}
			return p.SetData(data)
		},
	})
	defer c.Release()
	s, err := c.Wait(ctx)
	if err != nil {
		return nil, err
	}
	d, err := testcapnp.Test_callBack_Results(s).Data()
	return append([]byte(nil), d...), err
}
