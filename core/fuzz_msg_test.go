package core

// FuzzMessageDecode feeds arbitrary bytes to the message decoding layer:
// as one message body (a single segment) and as a framed stream, every
// field of every RPC message type is read with go-capnp's generated
// readers under fuzzLimits; then the body is sent, as one frame, to a real
// Conn whose tables hold entries with small ids (questions, answers,
// imports, exports, a resolved promise), and the FuzzConn invariants are
// checked.

import (
	"bytes"
	"errors"
	"io"
	"testing"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"
)

const fuzzMaxBody = 16 << 10

// rpcWalker reads every field of an RPC message. Errors are expected
// (the input is garbage); only panics and runaway work are failures, and
// go-capnp's traversal and depth limits bound the work.
type rpcWalker struct {
	reads int // fields read; keeps the reads observable
}

func (w *rpcWalker) message(m rpccp.Message, depth int) {
	if depth > 4 {
		return
	}
	w.reads++
	switch m.Which() {
	case rpccp.Message_Which_unimplemented:
		if inner, err := m.Unimplemented(); err == nil {
			w.message(inner, depth+1)
		}
	case rpccp.Message_Which_abort:
		if e, err := m.Abort(); err == nil {
			w.exception(e)
		}
	case rpccp.Message_Which_bootstrap:
		if b, err := m.Bootstrap(); err == nil {
			b.QuestionId()
			w.ptr(b.DeprecatedObjectId())
		}
	case rpccp.Message_Which_call:
		c, err := m.Call()
		if err != nil {
			return
		}
		c.QuestionId()
		c.InterfaceId()
		c.MethodId()
		c.AllowThirdPartyTailCall()
		c.NoPromisePipelining()
		c.OnlyPromisePipeline()
		if mt, err := c.Target(); err == nil {
			w.target(mt)
		}
		if pl, err := c.Params(); err == nil {
			w.payload(pl)
		}
		srt := c.SendResultsTo()
		switch srt.Which() {
		case rpccp.Call_sendResultsTo_Which_thirdParty:
			w.ptr(srt.ThirdParty())
		}
	case rpccp.Message_Which_return:
		r, err := m.Return()
		if err != nil {
			return
		}
		r.AnswerId()
		r.ReleaseParamCaps()
		r.NoFinishNeeded()
		switch r.Which() {
		case rpccp.Return_Which_results:
			if pl, err := r.Results(); err == nil {
				w.payload(pl)
			}
		case rpccp.Return_Which_exception:
			if e, err := r.Exception(); err == nil {
				w.exception(e)
			}
		case rpccp.Return_Which_takeFromOtherQuestion:
			r.TakeFromOtherQuestion()
		case rpccp.Return_Which_awaitFromThirdParty:
			w.ptr(r.AwaitFromThirdParty())
		}
	case rpccp.Message_Which_finish:
		if f, err := m.Finish(); err == nil {
			f.QuestionId()
			f.ReleaseResultCaps()
			f.RequireEarlyCancellationWorkaround()
		}
	case rpccp.Message_Which_resolve:
		r, err := m.Resolve()
		if err != nil {
			return
		}
		r.PromiseId()
		switch r.Which() {
		case rpccp.Resolve_Which_cap:
			if d, err := r.Cap(); err == nil {
				w.desc(d)
			}
		case rpccp.Resolve_Which_exception:
			if e, err := r.Exception(); err == nil {
				w.exception(e)
			}
		}
	case rpccp.Message_Which_release:
		if r, err := m.Release(); err == nil {
			r.Id()
			r.ReferenceCount()
		}
	case rpccp.Message_Which_disembargo:
		d, err := m.Disembargo()
		if err != nil {
			return
		}
		if mt, err := d.Target(); err == nil {
			w.target(mt)
		}
		dc := d.Context()
		switch dc.Which() {
		case rpccp.Disembargo_context_Which_senderLoopback:
			dc.SenderLoopback()
		case rpccp.Disembargo_context_Which_receiverLoopback:
			dc.ReceiverLoopback()
		case rpccp.Disembargo_context_Which_accept:
			dc.Accept()
		}
	case rpccp.Message_Which_obsoleteSave:
		w.ptr(m.ObsoleteSave())
	case rpccp.Message_Which_obsoleteDelete:
		w.ptr(m.ObsoleteDelete())
	case rpccp.Message_Which_provide:
		if p, err := m.Provide(); err == nil {
			p.QuestionId()
			if mt, err := p.Target(); err == nil {
				w.target(mt)
			}
			w.ptr(p.Recipient())
		}
	case rpccp.Message_Which_accept:
		if a, err := m.Accept(); err == nil {
			a.QuestionId()
			w.ptr(a.Provision())
			a.Embargo()
		}
	case rpccp.Message_Which_join:
		if j, err := m.Join(); err == nil {
			j.QuestionId()
			if mt, err := j.Target(); err == nil {
				w.target(mt)
			}
			w.ptr(j.KeyPart())
		}
	case rpccp.Message_Which_thirdPartyAnswer:
		if a, err := m.ThirdPartyAnswer(); err == nil {
			a.AnswerId()
			w.ptr(a.Completion())
		}
	}
}

func (w *rpcWalker) target(mt rpccp.MessageTarget) {
	w.reads++
	switch mt.Which() {
	case rpccp.MessageTarget_Which_importedCap:
		mt.ImportedCap()
	case rpccp.MessageTarget_Which_promisedAnswer:
		if pa, err := mt.PromisedAnswer(); err == nil {
			w.promisedAnswer(pa)
		}
	}
}

func (w *rpcWalker) promisedAnswer(pa rpccp.PromisedAnswer) {
	pa.QuestionId()
	ops, err := pa.Transform()
	if err != nil {
		return
	}
	for i := range ops.Len() {
		w.reads++
		if op := ops.At(i); op.Which() == rpccp.PromisedAnswer_Op_Which_getPointerField {
			op.GetPointerField()
		}
	}
}

func (w *rpcWalker) payload(pl rpccp.Payload) {
	content, err := pl.Content()
	if err == nil {
		w.content(content, 0)
	}
	list, err := pl.CapTable()
	if err != nil {
		return
	}
	for i := range list.Len() {
		w.desc(list.At(i))
	}
}

// content walks a payload's content the way capabilities are found in it:
// every pointer, with interfaces' capability indexes and the transforms a
// pipelined call would apply.
func (w *rpcWalker) content(p capnp.Ptr, depth int) {
	w.reads++
	if depth > 8 || !p.IsValid() {
		return
	}
	if p.Interface().IsValid() {
		p.Interface().Capability()
		return
	}
	if s := p.Struct(); s.IsValid() {
		for i := range s.Size().PointerCount {
			if q, err := s.Ptr(i); err == nil {
				w.content(q, depth+1)
			}
		}
		if depth == 0 {
			for f := uint16(0); f < 3; f++ {
				capnp.Transform(p, []capnp.PipelineOp{{Field: f}})
				capnp.Transform(p, []capnp.PipelineOp{{Field: f}, {Field: 0}})
			}
		}
		return
	}
	if l := p.List(); l.IsValid() {
		for i := range min(l.Len(), 16) {
			if s := l.Struct(i); s.IsValid() {
				w.content(s.ToPtr(), depth+1)
			}
		}
	}
}

func (w *rpcWalker) desc(d rpccp.CapDescriptor) {
	w.reads++
	d.AttachedFd()
	switch d.Which() {
	case rpccp.CapDescriptor_Which_senderHosted:
		d.SenderHosted()
	case rpccp.CapDescriptor_Which_senderPromise:
		d.SenderPromise()
	case rpccp.CapDescriptor_Which_receiverHosted:
		d.ReceiverHosted()
	case rpccp.CapDescriptor_Which_receiverAnswer:
		if pa, err := d.ReceiverAnswer(); err == nil {
			w.promisedAnswer(pa)
		}
	case rpccp.CapDescriptor_Which_thirdPartyHosted:
		if tp, err := d.ThirdPartyHosted(); err == nil {
			tp.VineId()
			w.ptr(tp.Id())
		}
	}
}

func (w *rpcWalker) exception(e rpccp.Exception) {
	w.reads++
	e.Type()
	e.Reason()
	e.Trace()
	e.ObsoleteDurability()
	e.ObsoleteIsCallersFault()
	if ds, err := e.Details(); err == nil {
		for i := range min(ds.Len(), 16) {
			d := ds.At(i)
			d.DetailId()
			d.Data()
		}
	}
	_ = e.ToError()
}

func (w *rpcWalker) ptr(p capnp.Ptr, err error) {
	if err == nil {
		w.content(p, 1)
	}
}

// walkRPC decodes msg as an RPC message and reads all of it.
func walkRPC(msg *capnp.Message) {
	m, err := rpccp.ReadRootMessage(msg)
	if err != nil {
		return
	}
	var w rpcWalker
	w.message(m, 0)
}

// limitMessage applies fuzzLimits' decoding limits, as the frame reader does.
func limitMessage(msg *capnp.Message) {
	msg.TraverseLimit = traverseBytes(fuzzLimits.TraversalLimit)
	msg.DepthLimit = uint(fuzzLimits.NestingLimit)
}

// fuzzMsgPrelude leaves the Conn with entries at small ids in every table:
// answers 0 (bootstrap, returned) and 1 (block(), running); questions
// (a pipelined call on the peer's bootstrap, holding export 1, a local
// object, and export 2, a local promise resolved to the peer's import 5,
// so a Disembargo may target it); imports 5 and 6.
func fuzzMsgPrelude() []byte {
	a := &fuzzAsm{}
	a.bootstrap(0).
		call(1, answerTarget(0), mBlock, noPayload).
		localObject().localPromise().localBootstrap(). // caps 0, 1, 2; question 0
		localCall(2, lmHold, 0).                       // question 1: export senderHosted
		localCall(2, lmHold, 1).                       // question 2: export senderPromise
		wait(waitCall, 2).
		returnResults(0, func(a *fuzzAsm) { a.payload(contentCap, 0, 0, "", descSenderHosted(5)) }).
		barrier().
		localFulfil(0, 2). // the exported promise resolves to the peer's import 5
		wait(waitResolve, 1).
		call(2, answerTarget(0), mCallBack, func(a *fuzzAsm) {
			a.payload(contentCapFirst, 0, 0, "", descSenderPromise(6))
		}).
		barrier()
	return a.b
}

// fuzzMessageSeeds are message bodies: one of each kind the Conn
// handles, addressed to the prelude's entries, plus malformed ones.
func fuzzMessageSeeds(t testing.TB) []fuzzSeed {
	body := func(build func(a *fuzzAsm)) []byte {
		a := &fuzzAsm{}
		build(a)
		p := &fuzzProg{b: a.b[1:]} // skip the opcode
		_, seg, err := capnp.NewMessage(capnp.SingleSegment(nil))
		if err != nil {
			t.Fatal(err)
		}
		m, err := rpccp.NewRootMessage(seg)
		if err != nil {
			t.Fatal(err)
		}
		if err := p.message(m, a.b[0], 0); err != nil {
			t.Fatal(err)
		}
		data := seg.Data()
		return append([]byte{}, data...)
	}
	var seeds []fuzzSeed
	add := func(name string, build func(a *fuzzAsm)) {
		seeds = append(seeds, fuzzSeed{name, body(build)})
	}
	add("bootstrap", func(a *fuzzAsm) { a.bootstrap(3) })
	add("call-import", func(a *fuzzAsm) {
		a.call(3, importTarget(0), mEcho, func(a *fuzzAsm) { a.payload(contentCapLast, 0, 0, "hi") })
	})
	add("call-pipelined-with-caps", func(a *fuzzAsm) {
		a.call(3, answerTarget(0), mCallBack, func(a *fuzzAsm) {
			a.payload(contentCapFirst, 1, 0, "x", descSenderHosted(7), descReceiverHosted(1), descReceiverAnswer(0))
		})
	})
	add("return-results-caps", func(a *fuzzAsm) {
		a.returnResults(1, func(a *fuzzAsm) {
			a.payload(contentCapFirst, 0, 0, "", descSenderPromise(4), descThirdParty(2))
		})
	})
	add("return-loopback", func(a *fuzzAsm) {
		a.returnResults(2, func(a *fuzzAsm) { a.payload(contentCapFirst, 0, 0, "", descReceiverHosted(1)) })
	})
	add("return-exception", func(a *fuzzAsm) { a.returnException(1) })
	add("finish-release", func(a *fuzzAsm) { a.finish(0, true) })
	add("finish-cancel", func(a *fuzzAsm) { a.finish(1, false) })
	add("resolve-cap", func(a *fuzzAsm) { a.resolveCap(6, descSenderHosted(4)) })
	add("resolve-loopback", func(a *fuzzAsm) { a.resolveCap(6, descReceiverHosted(1)) })
	add("resolve-exception", func(a *fuzzAsm) { a.resolveException(6) })
	add("release", func(a *fuzzAsm) { a.release(1, 1) })
	add("disembargo-sender", func(a *fuzzAsm) { a.disembargoSender(importTarget(2), 0) })
	add("disembargo-receiver", func(a *fuzzAsm) { a.disembargoReceiver(importTarget(5), 0) })
	add("abort", func(a *fuzzAsm) { a.abort() })
	add("unimplemented-call", func(a *fuzzAsm) {
		a.op(opUnimplemented).bytes(opCall)
		a.b = append(a.b, (&fuzzAsm{}).call(1, importTarget(5), mEcho, noPayload).b[1:]...)
	})
	add("provide", func(a *fuzzAsm) { a.op(opOther).bytes(2, 4, 0, 1) })
	seeds = append(seeds,
		fuzzSeed{"empty", nil},
		fuzzSeed{"null-root", make([]byte, 8)},
		// A root struct pointer whose offset points far outside the segment.
		fuzzSeed{"root-out-of-bounds", []byte{0xfc, 0xff, 0xff, 0x7f, 1, 0, 1, 0}},
		// A far pointer to a segment that does not exist.
		fuzzSeed{"far-pointer", []byte{0x02, 0, 0, 0, 5, 0, 0, 0}},
		// A list pointer as the root.
		fuzzSeed{"list-root", []byte{0x01, 0, 0, 0, 0x0d, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8}},
	)
	return seeds
}

func FuzzMessageDecode(f *testing.F) {
	prelude := fuzzMsgPrelude()
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > fuzzMaxBody {
			return
		}
		// One segment.
		frame := singleSegmentFrame(data)
		body := frame[8:]
		if msg, err := capnp.NewSingleSegmentMessage(append([]byte{}, body...)); err == nil {
			limitMessage(msg)
			walkRPC(msg)
		}
		// A framed stream.
		fr := newFrameReader(bytes.NewReader(data), fuzzLimits)
		for {
			msg, err := fr.readMessage()
			if err != nil {
				var fe *FrameError
				if err != io.EOF && !errors.Is(err, io.ErrUnexpectedEOF) && (!errors.As(err, &fe) || fe.Reason == "") {
					t.Fatalf("frame reader: unexpected error %v", err)
				}
				break
			}
			walkRPC(msg)
		}
		// A real Conn.
		h := newFuzzHarness(t)
		h.run(prelude)
		h.write(frame)
		h.finish()
	})
}
