package core

import (
	"bytes"
	"testing"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"
)

// The envelopes must encode what go-capnp would: every field read back
// through go-capnp's own accessors, for arguments small and large (the
// segment grows and moves while they are placed).
func TestCallEnvelopeDecodes(t *testing.T) {
	if callEnvelope.err != nil || pipelinedCallEnvelope.err != nil || returnEnvelope.err != nil {
		t.Fatal(callEnvelope.err, pipelinedCallEnvelope.err, returnEnvelope.err)
	}
	pipelinedOn := &question{id: 0xbeef}
	targets := []callTarget{
		{importID: 0x123456},
		{question: pipelinedOn, transform: []capnp.PipelineOp{{Field: 0xabc}}},
	}
	for _, target := range targets {
		for _, size := range []int{0, 16, 100_000} {
			data := bytes.Repeat([]byte{0xab}, size)
			s := capnp.Send{
				Method:    capnp.Method{InterfaceID: 0x8badf00ddeadbeef, MethodID: 0xfeed},
				ArgsSize:  capnp.ObjectSize{DataSize: 16, PointerCount: 2},
				PlaceArgs: func(args capnp.Struct) error { args.SetUint64(8, 42); return args.SetData(1, data) },
			}
			env := callEnvelopeFor(target, s)
			if env == nil {
				t.Fatalf("no envelope for target %+v", target)
			}
			msg, seg, _, err := newEnvelopeCall(env, s)
			if err != nil {
				t.Fatal(err)
			}
			env.setCallTarget(seg, 0xc0ffee, target)
			frame, err := appendFrame(nil, msg)
			recycleMessage(msg)
			if err != nil {
				t.Fatal(err)
			}
			m := decodeFrameForTest(t, frame)
			if m.Which() != rpccp.Message_Which_call {
				t.Fatalf("message is %v; want call", m.Which())
			}
			call, err := m.Call()
			if err != nil {
				t.Fatal(err)
			}
			if call.QuestionId() != 0xc0ffee || call.InterfaceId() != 0x8badf00ddeadbeef || call.MethodId() != 0xfeed ||
				call.SendResultsTo().Which() != rpccp.Call_sendResultsTo_Which_caller {
				t.Fatalf("call fields: question %#x interface %#x method %#x", call.QuestionId(), call.InterfaceId(), call.MethodId())
			}
			checkEnvelopeTarget(t, call, target)
			params, err := call.Params()
			if err != nil {
				t.Fatal(err)
			}
			checkEnvelopeContent(t, params, s.ArgsSize, data)
		}
	}
	// Only a one-field transform has an envelope.
	long := callTarget{question: pipelinedOn, transform: []capnp.PipelineOp{{Field: 0}, {Field: 1}}}
	if callEnvelopeFor(long, capnp.Send{ArgsSize: capnp.ObjectSize{DataSize: 8}}) != nil {
		t.Fatal("envelope for a two-op transform")
	}
}

func checkEnvelopeTarget(t *testing.T, call rpccp.Call, want callTarget) {
	t.Helper()
	mt, err := call.Target()
	if err != nil {
		t.Fatal(err)
	}
	if want.question == nil {
		if mt.Which() != rpccp.MessageTarget_Which_importedCap || mt.ImportedCap() != want.importID {
			t.Fatalf("target %v/%#x; want import %#x", mt.Which(), mt.ImportedCap(), want.importID)
		}
		return
	}
	if mt.Which() != rpccp.MessageTarget_Which_promisedAnswer {
		t.Fatalf("target %v; want a promised answer", mt.Which())
	}
	pa, err := mt.PromisedAnswer()
	if err != nil {
		t.Fatal(err)
	}
	ops, err := pa.Transform()
	if err != nil {
		t.Fatal(err)
	}
	if pa.QuestionId() != want.question.id || ops.Len() != 1 ||
		ops.At(0).Which() != rpccp.PromisedAnswer_Op_Which_getPointerField || ops.At(0).GetPointerField() != want.transform[0].Field {
		t.Fatalf("promised answer: question %#x, %d ops", pa.QuestionId(), ops.Len())
	}
}

func TestReturnEnvelopeDecodes(t *testing.T) {
	for _, size := range []int{0, 16, 100_000} {
		data := bytes.Repeat([]byte{0xcd}, size)
		a := &answer{id: 0xabcdef}
		sz := capnp.ObjectSize{DataSize: 16, PointerCount: 2}
		res, err := a.AllocResults(sz)
		if err != nil {
			t.Fatal(err)
		}
		res.SetUint64(8, 42)
		if err := res.SetData(1, data); err != nil {
			t.Fatal(err)
		}
		if ret, err := returnOf(a.out, a.outRet); err != nil || ret.AnswerId() != 0xabcdef {
			t.Fatalf("returnOf: answer id %#x, %v", ret.AnswerId(), err)
		}
		noFinish := size == 16
		if seg, err := a.out.Segment(0); noFinish && err == nil {
			returnEnvelope.set(seg, envNoFinishNeeded, 1)
		}
		frame, err := appendFrame(nil, a.out)
		recycleMessage(a.out)
		if err != nil {
			t.Fatal(err)
		}
		m := decodeFrameForTest(t, frame)
		ret, err := m.Return()
		if err != nil || m.Which() != rpccp.Message_Which_return {
			t.Fatalf("message is %v (%v); want return", m.Which(), err)
		}
		if ret.AnswerId() != 0xabcdef || ret.ReleaseParamCaps() || ret.NoFinishNeeded() != noFinish || ret.Which() != rpccp.Return_Which_results {
			t.Fatalf("return fields: answer %#x releaseParamCaps %v noFinishNeeded %v which %v",
				ret.AnswerId(), ret.ReleaseParamCaps(), ret.NoFinishNeeded(), ret.Which())
		}
		results, err := ret.Results()
		if err != nil {
			t.Fatal(err)
		}
		checkEnvelopeContent(t, results, sz, data)
	}
}

func checkEnvelopeContent(t *testing.T, p rpccp.Payload, sz capnp.ObjectSize, data []byte) {
	t.Helper()
	content, err := p.Content()
	if err != nil {
		t.Fatal(err)
	}
	st := content.Struct()
	if st.Size() != sz || st.Uint64(8) != 42 {
		t.Fatalf("content: size %+v (want %+v), field %d", st.Size(), sz, st.Uint64(8))
	}
	got, err := st.Ptr(1)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.Data(), data) {
		t.Fatalf("content data: %d bytes; want %d", len(got.Data()), len(data))
	}
	if p.HasCapTable() {
		t.Fatal("payload has a cap table")
	}
}

func decodeFrameForTest(t *testing.T, frame []byte) rpccp.Message {
	t.Helper()
	msg, err := capnp.Unmarshal(frame)
	if err != nil {
		t.Fatal(err)
	}
	m, err := rpccp.ReadRootMessage(msg)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// Structs of no size are encoded specially: they take the ordinary path.
func TestEnvelopeRefusesEmptyContent(t *testing.T) {
	if callEnvelope.fits(capnp.ObjectSize{}) || returnEnvelope.fits(capnp.ObjectSize{}) {
		t.Fatal("envelope takes an empty struct")
	}
	if !callEnvelope.fits(capnp.ObjectSize{PointerCount: 1}) {
		t.Fatal("envelope refuses a one-pointer struct")
	}
}

// A broken encoding function leaves the envelope unusable, with an error
// that says why, rather than a wrong template.
func TestEnvelopeDerivationFails(t *testing.T) {
	e := newEnvelope("test", []int{4, 1}, func(seg *capnp.Segment, v []uint64) (rpccp.Payload, error) {
		return encodeEnvelopeReturn(seg, make([]uint64, 2)) // ignores v: no field is ever found
	})
	if e.err == nil || e.fits(capnp.ObjectSize{DataSize: 8}) {
		t.Fatalf("envelope derived from an encoder that ignores its field: %+v", e)
	}
}

func BenchmarkCallEnvelope(b *testing.B) {
	data := make([]byte, 16)
	s := capnp.Send{
		Method:    capnp.Method{InterfaceID: 1, MethodID: 2},
		ArgsSize:  capnp.ObjectSize{PointerCount: 1},
		PlaceArgs: func(args capnp.Struct) error { return args.SetData(0, data) },
	}
	var frame []byte
	b.Run("envelope", func(b *testing.B) {
		for b.Loop() {
			msg, seg, _, err := newEnvelopeCall(&callEnvelope, s)
			if err != nil {
				b.Fatal(err)
			}
			callEnvelope.setCallTarget(seg, 5, callTarget{importID: 7})
			frame, _ = appendFrame(frame[:0], msg)
			recycleMessage(msg)
		}
	})
	b.Run("structs", func(b *testing.B) {
		for b.Loop() {
			msg, m, err := newMessage()
			if err != nil {
				b.Fatal(err)
			}
			call, _, err := buildCall(m, s, nil, capnp.List{})
			if err != nil {
				b.Fatal(err)
			}
			call.SetQuestionId(5)
			mt, _ := call.NewTarget()
			mt.SetImportedCap(7)
			frame, _ = appendFrame(frame[:0], msg)
			recycleMessage(msg)
		}
	})
}
