package core

import (
	"context"
	"fmt"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/internal/callqueue"
)

// brokenClient returns a capability broken with err: its calls fail with
// err and its brand is err, as with capnp.ErrorClient. Unlike
// ErrorClient's, a call delivered to it (Recv) returns a PipelineCaller
// that fails pipelined calls rather than nil. go-capnp's AnswerQueue,
// which holds the calls queued on a local promise and those pipelined on
// a call to a server.Server object, uses that caller unchecked: a
// capability the peer broke, used to fulfill such a promise or returned
// by such a call, crashed the process (go-capnp fixed it after
// v3.1.0-alpha.2). captp breaks its capabilities this way throughout.
func brokenClient(err error) capnp.Client { return capnp.NewClient(brokenHook{err}) }

// breakPromises rejects promised clients with err, as brokenClient
// breaks a capability.
func breakPromises(err error, rs ...capnp.Resolver[capnp.Client]) {
	var cl capnp.Client // made for the first resolver, if any
	for _, r := range rs {
		if r == nil {
			continue
		}
		if cl == (capnp.Client{}) {
			cl = brokenClient(err)
			defer cl.Release()
		}
		r.Fulfill(cl)
	}
}

type brokenHook struct{ err error }

func (h brokenHook) Send(_ context.Context, s capnp.Send) (*capnp.Answer, capnp.ReleaseFunc) {
	return capnp.ErrorAnswer(s.Method, h.err), func() {}
}

func (h brokenHook) Recv(_ context.Context, r capnp.Recv) capnp.PipelineCaller {
	r.Reject(h.err)
	return callqueue.Failed(h.err)
}

func (h brokenHook) Brand() capnp.Brand { return capnp.Brand{Value: h.err} }
func (h brokenHook) Shutdown()          {}
func (h brokenHook) String() string     { return fmt.Sprintf("captp broken capability (%v)", h.err) }
