package core

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"
)

// Most outbound Calls and Returns are the same structs every time but for
// a few numbers: a Call to an imported capability is a Message, Call,
// MessageTarget and Payload that differ only in the question id,
// interface, method and import; a call pipelined on one pointer field of
// a question's results (the common case of pipelining) has a
// PromisedAnswer with a one-op transform instead of the import; a Return
// with results differs only in its answer id and noFinishNeeded. So they
// are copied from an encoded envelope with those fields patched, instead
// of built struct by struct with go-capnp (about half the cost of
// building a small call). The arguments or results are still allocated
// and placed with go-capnp, right after the envelope, and the payload's
// content pointer is patched to point at them.

// envelope is an encoded message up to its payload's content, with the
// byte offsets of its variable fields.
type envelope struct {
	seg     []byte // the segment: root pointer and the structs, content null
	at      []int  // each field's offset, in the order encode takes them
	widths  []int  // each field's width in bytes; 1 is a bool field
	masks   []byte // each bool field's bit
	content int    // the payload's content pointer
	err     error  // set if the envelope could not be derived: build as before
}

// The fields of callEnvelope and pipelinedCallEnvelope.
const (
	envQuestionID  = iota
	envInterfaceID // 8 bytes
	envMethodID    // 2 bytes
	envTarget      // the import, or the question pipelined on
	envPointerField
)

var (
	callEnvelope          = newEnvelope("call", []int{4, 8, 2, 4}, encodeEnvelopeCall)
	pipelinedCallEnvelope = newEnvelope("pipelined call", []int{4, 8, 2, 4, 2}, encodeEnvelopePipelinedCall)
	returnEnvelope        = newEnvelope("return", []int{4, 1}, encodeEnvelopeReturn)
)

// The fields of returnEnvelope.
const (
	envAnswerID = iota
	envNoFinishNeeded
)

// envelopeArgs is the struct encode places as content when asked: 8 bytes
// and one pointer, right after the envelope.
var envelopeArgs = capnp.ObjectSize{DataSize: 8, PointerCount: 1}

// encodeEnvelopeCall encodes a Call to an import with go-capnp, in the
// order newMessage lays it out.
func encodeEnvelopeCall(seg *capnp.Segment, v []uint64) (rpccp.Payload, error) {
	return encodeCallTo(seg, v, func(mt rpccp.MessageTarget) error {
		mt.SetImportedCap(uint32(v[envTarget]))
		return nil
	})
}

// encodeEnvelopePipelinedCall encodes a Call on a pointer field of a
// question's results.
func encodeEnvelopePipelinedCall(seg *capnp.Segment, v []uint64) (rpccp.Payload, error) {
	return encodeCallTo(seg, v, func(mt rpccp.MessageTarget) error {
		pa, err := mt.NewPromisedAnswer()
		if err != nil {
			return err
		}
		return writePromisedAnswer(pa, uint32(v[envTarget]), []capnp.PipelineOp{{Field: uint16(v[envPointerField])}})
	})
}

// encodeCallTo encodes a Call whose target target sets.
func encodeCallTo(seg *capnp.Segment, v []uint64, target func(rpccp.MessageTarget) error) (rpccp.Payload, error) {
	m, err := rpccp.NewRootMessage(seg)
	if err != nil {
		return rpccp.Payload{}, err
	}
	call, err := m.NewCall()
	if err != nil {
		return rpccp.Payload{}, err
	}
	call.SetQuestionId(uint32(v[envQuestionID]))
	call.SetInterfaceId(v[envInterfaceID])
	call.SetMethodId(uint16(v[envMethodID]))
	mt, err := call.NewTarget()
	if err != nil {
		return rpccp.Payload{}, err
	}
	if err := target(mt); err != nil {
		return rpccp.Payload{}, err
	}
	return call.NewParams()
}

// encodeEnvelopeReturn encodes a Return with results as AllocResults does.
func encodeEnvelopeReturn(seg *capnp.Segment, v []uint64) (rpccp.Payload, error) {
	m, err := rpccp.NewRootMessage(seg)
	if err != nil {
		return rpccp.Payload{}, err
	}
	ret, err := m.NewReturn()
	if err != nil {
		return rpccp.Payload{}, err
	}
	ret.SetAnswerId(uint32(v[envAnswerID]))
	ret.SetReleaseParamCaps(false)
	ret.SetNoFinishNeeded(v[envNoFinishNeeded] != 0)
	return ret.NewResults()
}

// newEnvelope derives an envelope from go-capnp's own encoding: each
// field's offset is where the encoding changes when only that field is
// set to all ones.
func newEnvelope(what string, widths []int, encode func(*capnp.Segment, []uint64) (rpccp.Payload, error)) envelope {
	fail := func(err error) envelope { return envelope{err: fmt.Errorf("%s envelope: %w", what, err)} }
	build := func(v []uint64, content bool) ([]byte, error) {
		msg, seg, err := capnp.NewMessage(capnp.SingleSegment(nil))
		if err != nil {
			return nil, err
		}
		defer msg.Release()
		payload, err := encode(seg, v)
		if err != nil {
			return nil, err
		}
		if content {
			args, err := capnp.NewStruct(seg, envelopeArgs)
			if err != nil {
				return nil, err
			}
			if err := payload.SetContent(args.ToPtr()); err != nil {
				return nil, err
			}
		}
		return bytes.Clone(seg.Data()), nil
	}
	zero, err := build(make([]uint64, len(widths)), false)
	if err != nil {
		return fail(err)
	}
	e := envelope{seg: zero, widths: widths}
	for k, w := range widths {
		v := make([]uint64, len(widths))
		v[k] = 1<<(8*w) - 1
		if w == 8 {
			v[k] = ^uint64(0)
		}
		one, err := build(v, false)
		if err != nil {
			return fail(err)
		}
		at, err := changedField(zero, one, w)
		if err != nil {
			return fail(fmt.Errorf("field %d: %w", k, err))
		}
		e.at = append(e.at, at)
		e.masks = append(e.masks, zero[at]^one[at])
	}
	with, err := build(make([]uint64, len(widths)), true)
	if err != nil {
		return fail(err)
	}
	if len(with) < len(zero) {
		return fail(errors.New("content shrank the message"))
	}
	if e.content, err = changedField(zero, with[:len(zero)], 8); err != nil {
		return fail(fmt.Errorf("content pointer: %w", err))
	}
	// The pointer newMessage computes must be go-capnp's own.
	if binary.LittleEndian.Uint64(with[e.content:]) != e.contentPointer(envelopeArgs) {
		return fail(errors.New("content pointer encoding differs"))
	}
	return e
}

// changedField returns the offset of the only width bytes in which zero
// and one differ, where one holds all ones.
func changedField(zero, one []byte, width int) (int, error) {
	if len(zero) != len(one) {
		return 0, errors.New("field changed the message's size")
	}
	at := -1
	for i := range zero {
		if zero[i] != one[i] {
			at = i
			break
		}
	}
	if at < 0 || at+width > len(zero) || !bytes.Equal(zero[at+width:], one[at+width:]) {
		return 0, errors.New("field not found")
	}
	return at, nil
}

// contentPointer is the struct pointer, from the payload's content field,
// to a struct of size sz placed right after the envelope.
func (e *envelope) contentPointer(sz capnp.ObjectSize) uint64 {
	offsetWords := (len(e.seg) - (e.content + 8)) / 8
	dataWords := (uint64(sz.DataSize) + 7) / 8
	return uint64(uint32(offsetWords)<<2) | dataWords<<32 | uint64(sz.PointerCount)<<48
}

// fits says whether content of size sz can follow e: a struct of no size
// is encoded specially, so it cannot.
func (e *envelope) fits(sz capnp.ObjectSize) bool {
	return e.err == nil && (sz.DataSize > 0 || sz.PointerCount > 0)
}

// newMessage builds a message from e and allocates its content, a
// struct of size sz (e.fits(sz)). The caller sets the fields (set).
func (e *envelope) newMessage(sz capnp.ObjectSize) (*capnp.Message, *capnp.Segment, capnp.Struct, error) {
	msg := messagePool.Get().(*capnp.Message)
	seg, err := msg.Reset(capnp.SingleSegment(nil))
	if err != nil {
		return nil, nil, capnp.Struct{}, err
	}
	// go-capnp reserves the root pointer first; the struct covers the
	// rest of the envelope, whose bytes then replace it.
	if _, err := capnp.NewStruct(seg, capnp.ObjectSize{DataSize: capnp.Size(len(e.seg) - 8)}); err != nil {
		recycleMessage(msg)
		return nil, nil, capnp.Struct{}, err
	}
	if len(seg.Data()) != len(e.seg) {
		recycleMessage(msg)
		return nil, nil, capnp.Struct{}, errors.New("envelope misplaced")
	}
	copy(seg.Data(), e.seg)
	content, err := capnp.NewStruct(seg, sz)
	if err != nil {
		recycleMessage(msg)
		return nil, nil, capnp.Struct{}, err
	}
	d := seg.Data() // the allocation may have moved the segment
	if got := content.Size(); uint64(len(d)-len(e.seg)) != uint64(got.DataSize)+8*uint64(got.PointerCount) {
		recycleMessage(msg)
		return nil, nil, capnp.Struct{}, errors.New("content misplaced")
	}
	binary.LittleEndian.PutUint64(d[e.content:], e.contentPointer(sz))
	return msg, seg, content, nil
}

// set sets field k of a message built from e.
func (e *envelope) set(seg *capnp.Segment, k int, v uint64) {
	d := seg.Data()[e.at[k]:]
	switch e.widths[k] {
	case 1:
		if v != 0 {
			d[0] |= e.masks[k]
		} else {
			d[0] &^= e.masks[k]
		}
	case 2:
		binary.LittleEndian.PutUint16(d, uint16(v))
	case 4:
		binary.LittleEndian.PutUint32(d, uint32(v))
	default:
		binary.LittleEndian.PutUint64(d, v)
	}
}

// callEnvelopeFor returns the envelope a call to t with s can be built
// from, or nil.
func callEnvelopeFor(t callTarget, s capnp.Send) *envelope {
	var e *envelope
	switch {
	case t.question == nil:
		e = &callEnvelope
	case len(t.transform) == 1:
		e = &pipelinedCallEnvelope
	default:
		return nil
	}
	if !e.fits(s.ArgsSize) {
		return nil
	}
	return e
}

// setCallTarget sets the question id and the target of a call built from
// e (callEnvelopeFor(t)).
func (e *envelope) setCallTarget(seg *capnp.Segment, qid uint32, t callTarget) {
	e.set(seg, envQuestionID, uint64(qid))
	if t.question == nil {
		e.set(seg, envTarget, uint64(t.importID))
		return
	}
	e.set(seg, envTarget, uint64(t.question.id))
	e.set(seg, envPointerField, uint64(t.transform[0].Field))
}

// newEnvelopeCall builds a Call from e (callEnvelope or
// pipelinedCallEnvelope) and places its arguments. The question id and
// the target go in later, under c.mu (setCallTarget).
func newEnvelopeCall(e *envelope, s capnp.Send) (*capnp.Message, *capnp.Segment, capnp.Struct, error) {
	msg, seg, args, err := e.newMessage(s.ArgsSize)
	if err != nil {
		return nil, nil, capnp.Struct{}, fmt.Errorf("build call: %w", err)
	}
	e.set(seg, envInterfaceID, s.Method.InterfaceID)
	e.set(seg, envMethodID, uint64(s.Method.MethodID))
	if s.PlaceArgs != nil {
		if err := s.PlaceArgs(args); err != nil {
			msg.Release()
			return nil, nil, capnp.Struct{}, fmt.Errorf("place arguments: %w", err)
		}
	}
	return msg, seg, args, nil
}

// returnOf returns ret, the Return struct of msg, reading it from msg if
// msg was built from returnEnvelope (which leaves ret unset).
func returnOf(msg *capnp.Message, ret rpccp.Return) (rpccp.Return, error) {
	if ret.IsValid() {
		return ret, nil
	}
	m, err := rpccp.ReadRootMessage(msg)
	if err != nil {
		return rpccp.Return{}, err
	}
	return m.Return()
}

// setNoFinishNeeded sets Return.noFinishNeeded in msg, whose Return
// struct is ret, or unset if msg was built from returnEnvelope: then the
// bit is patched in place rather than the Return read back.
func setNoFinishNeeded(msg *capnp.Message, ret rpccp.Return) {
	if ret.IsValid() {
		ret.SetNoFinishNeeded(true)
	} else if seg, err := msg.Segment(0); err == nil {
		returnEnvelope.set(seg, envNoFinishNeeded, 1)
	}
}

// outResultsPayload returns the payload of a's results message.
func outResultsPayload(a *answer) (rpccp.Payload, error) {
	ret, err := returnOf(a.out, a.outRet)
	if err != nil {
		return rpccp.Payload{}, err
	}
	return ret.Results()
}

// callParams reads back the payload of an outbound call, to encode its
// capability table: only calls that carry capabilities need it.
func callParams(msg *capnp.Message) (rpccp.Payload, error) {
	m, err := rpccp.ReadRootMessage(msg)
	if err != nil {
		return rpccp.Payload{}, err
	}
	call, err := m.Call()
	if err != nil {
		return rpccp.Payload{}, err
	}
	return call.Params()
}
