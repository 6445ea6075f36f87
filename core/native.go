package core

import (
	"context"
	"errors"
	"sync"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/internal/callqueue"
)

// The native server path: a Handler serves an object's calls without
// go-capnp's server.Server (no goroutine per object, no Call or answer
// queue per call). A call a captp connection delivers runs inline on the
// connection's read loop, in arrival order, and its ServerCall lives in
// the connection's answer, so serving it allocates nothing of its own. A
// handler that must block moves to a goroutine with ServerCall.Go; later
// calls to the object wait for it, in order, without holding up the read
// loop. NewClient wraps a Handler as an ordinary capnp.Client, so native
// objects are passed in parameters and results, called locally and by
// capnpc-go generated clients like any other capability.

// Handler serves the calls of a native object. HandleCall runs on the
// goroutine that delivered the call (for a captp connection, its read
// loop), one call of the object at a time, in the order the calls
// arrived; it must not block. It either finishes the call before it
// returns (Results, then Return; returning without Return returns the
// results so far, or empty results), or hands the rest to Go.
//
// A Handler that also has a Shutdown method is told when the last
// reference to its object is gone and its calls have finished.
type Handler interface {
	HandleCall(ctx context.Context, call *ServerCall)
}

// ServerCall is one call to a native object. Its methods must be called
// from HandleCall or from the function given to Go, not after Return.
type ServerCall struct {
	srv  *nativeServer
	ctx  context.Context
	recv capnp.Recv
	next *ServerCall // the object's queue

	goFn   func(ctx context.Context, call *ServerCall) error
	inline bool // Return happens in the delivering goroutine, maybe the read loop

	mu          sync.Mutex // guards the fields below, for pipelined calls
	results     capnp.Struct
	returning   bool // Return has begun
	returned    bool // pipelined calls may go to the results
	retErr      error
	resultsGone bool
	pipelined   []heldCall
}

// heldCall is a call pipelined on a ServerCall before it returned: it
// waits for the results, and calls pipelined on it wait in held.
type heldCall struct {
	ctx       context.Context
	transform []capnp.PipelineOp
	recv      capnp.Recv
	held      callqueue.Held
}

// deliver hands the call to client, the capability its transform found
// in the results (err if it found none); deliver releases client.
func (hc heldCall) deliver(client capnp.Client, err error) {
	defer client.Release()
	switch {
	case err != nil:
		hc.held.Fail(hc.recv, err)
	case !client.IsValid():
		hc.held.Fail(hc.recv, errors.New("captp: pipelined call on a null capability"))
	default:
		hc.held.Deliver(hc.recv, func(r capnp.Recv) capnp.PipelineCaller { return client.RecvCall(hc.ctx, r) })
	}
}

// Method returns the interface and method the call is for.
func (sc *ServerCall) Method() capnp.Method { return sc.recv.Method }

// Args returns the call's parameters. They stay valid until Return.
func (sc *ServerCall) Args() capnp.Struct { return sc.recv.Args }

// Results allocates the results struct. Over a captp connection it is
// the content of the outbound Return message itself.
func (sc *ServerCall) Results(size capnp.ObjectSize) (capnp.Struct, error) {
	s, err := sc.recv.Returner.AllocResults(size)
	if err == nil {
		sc.mu.Lock()
		sc.results = s
		sc.mu.Unlock()
	}
	return s, err
}

// ResultsReferencing allocates the results struct with its pointer
// field number field set to data, a slice of the call's arguments (for
// example a Data parameter): over a captp connection the Return then
// carries data straight from the arguments' buffer, which stays held
// until the Return is written and the caller finishes the call, instead
// of copying it. Elsewhere, or for data shorter than 64 KiB or not a
// whole number of words, it copies, as Results followed by SetData does.
func (sc *ServerCall) ResultsReferencing(size capnp.ObjectSize, field uint16, data []byte) (capnp.Struct, error) {
	a, ok := sc.recv.Returner.(*answer)
	if !ok || a.argsMsg == nil || a.out != nil || a.c.manual || len(data) < largeFrameBytes || len(data)%8 != 0 || len(data) > maxDataListBytes {
		s, err := sc.Results(size)
		if err == nil {
			err = s.SetData(field, data)
		}
		return s, err
	}
	s, err := a.allocRefResults(size, field, data)
	if err == nil {
		sc.mu.Lock()
		sc.results = s
		sc.mu.Unlock()
	}
	return s, err
}

// Go finishes the call on a goroutine of its own: fn runs there with the
// call's context and the call returns fn's error (fn may fill Results
// first). Calls to the same object that arrive meanwhile wait, in order,
// and are then served by that goroutine, so the object still sees one
// call at a time. Call Go from HandleCall, then return.
func (sc *ServerCall) Go(fn func(ctx context.Context, call *ServerCall) error) { sc.goFn = fn }

// Return finishes the call with err, or with the results when err is nil.
// Calls pipelined on the results reach the capabilities in them first.
// Returning twice does nothing.
func (sc *ServerCall) Return(err error) {
	sc.mu.Lock()
	if sc.returning {
		sc.mu.Unlock()
		return
	}
	sc.returning = true
	sc.mu.Unlock()
	rt := sc.recv.Returner
	rt.PrepareReturn(err)
	for {
		sc.mu.Lock()
		if len(sc.pipelined) == 0 {
			sc.returned, sc.retErr = true, err
			sc.mu.Unlock()
			break
		}
		p := sc.pipelined[0]
		sc.pipelined = sc.pipelined[1:]
		sc.mu.Unlock()
		p.deliver(sc.resultCap(p.transform, err))
	}
	if a, ok := rt.(*answer); ok {
		a.returnFrom(sc.inline)
	} else {
		rt.Return()
	}
	sc.mu.Lock()
	sc.resultsGone = true
	sc.results = capnp.Struct{}
	sc.mu.Unlock()
	rt.ReleaseResults()
	if sc.recv.ReleaseArgs != nil {
		sc.recv.ReleaseArgs()
	} else if a, ok := rt.(*answer); ok && !a.argsPinned {
		a.freeNativeArgs() // (pinned: freed with the Return message)
	}
}

func (sc *ServerCall) resultCap(transform []capnp.PipelineOp, err error) (capnp.Client, error) {
	if err != nil {
		return capnp.Client{}, err
	}
	ptr, err := capnp.Transform(sc.results.ToPtr(), transform)
	if err != nil {
		return capnp.Client{}, err
	}
	return ptr.Interface().Client().AddRef(), nil
}

// PipelineRecv implements capnp.PipelineCaller for local callers (a
// captp connection pipelines on its own answers): a call on a capability
// in this call's results waits for the Return, then goes there.
func (sc *ServerCall) PipelineRecv(ctx context.Context, transform []capnp.PipelineOp, r capnp.Recv) capnp.PipelineCaller {
	sc.mu.Lock()
	switch {
	case !sc.returned:
		// Calls pipelined on this one wait in its Held until Return
		// delivers it.
		hc := heldCall{ctx: ctx, transform: transform, recv: r, held: callqueue.NewHeld()}
		sc.pipelined = append(sc.pipelined, hc)
		sc.mu.Unlock()
		return hc.held.Caller()
	case sc.resultsGone:
		sc.mu.Unlock()
		r.Reject(errors.New("captp: pipelined call on a native call whose results were released"))
		return nil
	}
	client, err := sc.resultCap(transform, sc.retErr)
	sc.mu.Unlock()
	deliverTo(client, err, ctx, r)
	return nil
}

// PipelineSend implements capnp.PipelineCaller.
func (sc *ServerCall) PipelineSend(ctx context.Context, transform []capnp.PipelineOp, s capnp.Send) (*capnp.Answer, capnp.ReleaseFunc) {
	return callqueue.SendAsRecv(ctx, s, func(ctx context.Context, r capnp.Recv) capnp.PipelineCaller {
		return callqueue.NonNil(sc.PipelineRecv(ctx, transform, r))
	})
}

// NewClient returns a capability served by h. Calls from any source (a
// captp connection, local callers, go-capnp generated clients, other RPC
// connections) reach h one at a time, in order.
func NewClient(h Handler) capnp.Client { return capnp.NewClient(&nativeServer{h: h}) }

// nativeServer is the capnp.ClientHook of a native object.
type nativeServer struct {
	h Handler

	mu         sync.Mutex
	busy       bool // a call is being served; others queue
	head, tail *ServerCall
	shut       bool // no reference is left
	shutDone   bool // the Handler's Shutdown ran
}

func (ns *nativeServer) Send(ctx context.Context, s capnp.Send) (*capnp.Answer, capnp.ReleaseFunc) {
	return callqueue.SendAsRecv(ctx, s, ns.Recv)
}

// Recv serves the call now if the object is idle, else queues it.
func (ns *nativeServer) Recv(ctx context.Context, r capnp.Recv) capnp.PipelineCaller {
	var sc *ServerCall
	if a, ok := r.Returner.(*answer); ok && a.native != nil {
		sc = a.native // allocated with the answer
		a.native = nil
	} else {
		sc = new(ServerCall)
	}
	sc.srv, sc.ctx, sc.recv = ns, ctx, r
	ns.mu.Lock()
	if ns.shut {
		// Only a call racing the export's release at shutdown.
		ns.mu.Unlock()
		sc.Return(errors.New("captp: call on a released native object"))
		return sc
	}
	if ns.busy {
		if ns.tail == nil {
			ns.head = sc
		} else {
			ns.tail.next = sc
		}
		ns.tail = sc
		ns.mu.Unlock()
		return sc
	}
	ns.busy = true
	ns.mu.Unlock()
	ns.serve(sc, true)
	return sc
}

// serve runs sc and then the calls queued behind it. inline says it runs
// on the goroutine that delivered sc, which must not block.
func (ns *nativeServer) serve(sc *ServerCall, inline bool) {
	for sc != nil {
		sc.inline = inline
		if err := sc.ctx.Err(); err != nil {
			sc.Return(err) // cancelled while it waited in the queue
		} else {
			ns.h.HandleCall(sc.ctx, sc)
			if fn := sc.goFn; fn != nil {
				sc.goFn = nil
				if inline {
					go ns.async(sc, fn)
					return
				}
				sc.inline = false
				sc.Return(fn(sc.ctx, sc))
			} else {
				sc.Return(nil) // does nothing if the handler returned
			}
		}
		sc = ns.nextCall()
	}
}

// async finishes a call moved off the delivering goroutine by Go, then
// serves the object's queue from there.
func (ns *nativeServer) async(sc *ServerCall, fn func(context.Context, *ServerCall) error) {
	sc.inline = false
	sc.Return(fn(sc.ctx, sc))
	ns.serve(ns.nextCall(), false)
}

// nextCall takes the next queued call, or marks the object idle.
func (ns *nativeServer) nextCall() *ServerCall {
	ns.mu.Lock()
	sc := ns.head
	if sc != nil {
		ns.head = sc.next
		if ns.head == nil {
			ns.tail = nil
		}
		sc.next = nil
		ns.mu.Unlock()
		return sc
	}
	ns.busy = false
	shutdown := ns.shut && !ns.shutDone
	ns.shutDone = ns.shutDone || shutdown
	ns.mu.Unlock()
	if shutdown {
		ns.callShutdown()
	}
	return nil
}

func (ns *nativeServer) Brand() capnp.Brand { return capnp.Brand{Value: ns} }
func (ns *nativeServer) String() string     { return "captp native object" }

// Shutdown runs when the last reference is released; the Handler hears
// of it once its calls have finished.
func (ns *nativeServer) Shutdown() {
	ns.mu.Lock()
	ns.shut = true
	now := !ns.busy && !ns.shutDone
	ns.shutDone = ns.shutDone || now
	ns.mu.Unlock()
	if now {
		ns.callShutdown()
	}
}

func (ns *nativeServer) callShutdown() {
	if s, ok := ns.h.(interface{ Shutdown() }); ok {
		s.Shutdown()
	}
}
