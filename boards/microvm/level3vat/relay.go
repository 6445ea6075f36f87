package main

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/exc"

	"github.com/captp-go/captp/internal/testcapnp"
)

// relay is the Test the host reaches as service "relay": it makes this
// vat call a capability someone else handed it (with hold), which is
// what a handoff is about. Methods other than hold, dropHeld, seq and
// name are unimplemented.
type relay struct {
	mu   sync.Mutex
	held testcapnp.Test
	// inFlight counts seq calls waiting for the held capability, bounded
	// by maxRelayInFlight: holding the relay itself (or a cycle of relays)
	// would otherwise make each seq call seq again without end.
	inFlight atomic.Int32
}

// maxRelayInFlight bounds the seq calls a relay forwards at once.
const maxRelayInFlight = 256

// Hold keeps the argument, replacing (and releasing) what was held.
func (r *relay) Hold(_ context.Context, call testcapnp.Test_hold) error {
	c := capnp.Client(call.Args().Cap()).AddRef()
	r.mu.Lock()
	old := r.held
	r.held = testcapnp.Test(c)
	r.mu.Unlock()
	old.Release()
	return nil
}

// DropHeld releases what is held.
func (r *relay) DropHeld(context.Context, testcapnp.Test_dropHeld) error {
	r.mu.Lock()
	old := r.held
	r.held = testcapnp.Test{}
	r.mu.Unlock()
	old.Release()
	return nil
}

// Seq calls seq(n) on the held capability and returns its result. The
// call is sent before this one lets the next in (call.Go), so the held
// capability receives the calls in the order they reached the relay:
// E-order through the relay is the held capability's E-order.
func (r *relay) Seq(ctx context.Context, call testcapnp.Test_seq) error {
	r.mu.Lock()
	held := r.held.AddRef()
	r.mu.Unlock()
	defer held.Release()
	n := call.Args().N()
	if !held.IsValid() {
		return fmt.Errorf("relay: seq(%d): nothing held", n)
	}
	if r.inFlight.Add(1) > maxRelayInFlight {
		r.inFlight.Add(-1)
		return exc.New(exc.Overloaded, "relay", fmt.Sprintf("seq(%d): %d calls already in flight (a cycle of relays?)", n, maxRelayInFlight))
	}
	defer r.inFlight.Add(-1)
	f, release := held.Seq(ctx, func(p testcapnp.Test_seq_Params) error { p.SetN(n); return nil })
	defer release()
	call.Go()
	res, err := f.Struct()
	if err != nil {
		return fmt.Errorf("relay: seq(%d) on the held capability: %w", n, err)
	}
	out, err := call.AllocResults()
	if err != nil {
		return err
	}
	out.SetN(res.N())
	return nil
}

// Name returns "relay".
func (r *relay) Name(_ context.Context, call testcapnp.Test_name) error {
	res, err := call.AllocResults()
	if err != nil {
		return err
	}
	return res.SetName(relayService)
}

// Shutdown releases what is held once the last reference to the relay
// is gone.
func (r *relay) Shutdown() {
	r.mu.Lock()
	old := r.held
	r.held = testcapnp.Test{}
	r.mu.Unlock()
	old.Release()
}

func (*relay) Echo(context.Context, testcapnp.Test_echo) error { return unimplemented("echo") }
func (*relay) Fail(context.Context, testcapnp.Test_fail) error { return unimplemented("fail") }
func (*relay) Block(context.Context, testcapnp.Test_block) error {
	return unimplemented("block")
}
func (*relay) Child(context.Context, testcapnp.Test_child) error {
	return unimplemented("child")
}
func (*relay) CallBack(context.Context, testcapnp.Test_callBack) error {
	return unimplemented("callBack")
}
func (*relay) GetHeld(context.Context, testcapnp.Test_getHeld) error {
	return unimplemented("getHeld")
}
func (*relay) Promise(context.Context, testcapnp.Test_promise) error {
	return unimplemented("promise")
}
func (*relay) ResolvePromise(context.Context, testcapnp.Test_resolvePromise) error {
	return unimplemented("resolvePromise")
}
func (*relay) BreakPromise(context.Context, testcapnp.Test_breakPromise) error {
	return unimplemented("breakPromise")
}
func (*relay) Log(context.Context, testcapnp.Test_log) error { return unimplemented("log") }

func unimplemented(method string) error {
	return capnp.Unimplemented("relay: " + method + " is not implemented")
}
