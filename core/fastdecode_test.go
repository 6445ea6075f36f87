package core

import (
	"testing"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"
)

// The fast path mirrors go-capnp's unexported capnp.Ptr layout; a go-capnp
// upgrade that changes it turns the fast path off, and this says so.
func TestFastDecodeLayoutMatchesGoCapnp(t *testing.T) {
	if !fastPtrOK {
		t.Fatal("capnp.Ptr's layout no longer matches ptrLayout: the fast Return path is off (update fastdecode.go for this go-capnp)")
	}
}

// fastSeeds are bodies of one-segment messages: Returns and Calls the
// fast path takes (a struct, null, empty; flags set and not) and ones it
// must leave to go-capnp (capabilities, an exception, a list, a
// pipelined call, a tail call, other messages), and whether it takes
// each.
func fastSeeds(t testing.TB) ([][]byte, []bool) {
	build := func(f func(m rpccp.Message, seg *capnp.Segment) error) []byte {
		msg, seg := capnp.NewSingleSegmentMessage(nil)
		m, err := rpccp.NewRootMessage(seg)
		if err == nil {
			err = f(m, seg)
		}
		if err != nil {
			t.Fatal(err)
		}
		data, err := msg.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		return data[8:] // one segment: the body after the 8-byte header
	}
	results := func(id uint32, content func(seg *capnp.Segment) (capnp.Ptr, error), flags func(rpccp.Return)) func(rpccp.Message, *capnp.Segment) error {
		return func(m rpccp.Message, seg *capnp.Segment) error {
			ret, err := m.NewReturn()
			if err != nil {
				return err
			}
			ret.SetAnswerId(id)
			if flags != nil {
				flags(ret)
			}
			p, err := ret.NewResults()
			if err != nil || content == nil {
				return err
			}
			c, err := content(seg)
			if err != nil {
				return err
			}
			return p.SetContent(c)
		}
	}
	echo := func(seg *capnp.Segment) (capnp.Ptr, error) {
		s, err := capnp.NewStruct(seg, capnp.ObjectSize{DataSize: 8, PointerCount: 1})
		if err == nil {
			s.SetUint64(0, 42)
			err = s.SetData(0, []byte("0123456789abcdef"))
		}
		return s.ToPtr(), err
	}
	empty := func(seg *capnp.Segment) (capnp.Ptr, error) {
		s, err := capnp.NewStruct(seg, capnp.ObjectSize{})
		return s.ToPtr(), err
	}
	list := func(seg *capnp.Segment) (capnp.Ptr, error) {
		l, err := capnp.NewData(seg, []byte("a list, not a struct"))
		return l.ToPtr(), err
	}
	call := func(target func(rpccp.MessageTarget) error, content func(seg *capnp.Segment) (capnp.Ptr, error), more func(rpccp.Call) error) func(rpccp.Message, *capnp.Segment) error {
		return func(m rpccp.Message, seg *capnp.Segment) error {
			c, err := m.NewCall()
			if err != nil {
				return err
			}
			c.SetQuestionId(11)
			c.SetInterfaceId(0xcea30903072b4513)
			c.SetMethodId(12)
			tg, err := c.NewTarget()
			if err == nil {
				err = target(tg)
			}
			var p rpccp.Payload
			if err == nil {
				p, err = c.NewParams()
			}
			if err == nil && content != nil {
				var ptr capnp.Ptr
				if ptr, err = content(seg); err == nil {
					err = p.SetContent(ptr)
				}
			}
			if err == nil && more != nil {
				err = more(c)
			}
			return err
		}
	}
	toImport := func(id uint32) func(rpccp.MessageTarget) error {
		return func(tg rpccp.MessageTarget) error { tg.SetImportedCap(id); return nil }
	}
	toAnswer := func(tg rpccp.MessageTarget) error {
		pa, err := tg.NewPromisedAnswer()
		pa.SetQuestionId(3)
		return err
	}
	withCap := func(c rpccp.Call) error {
		p, _ := c.Params()
		caps, err := p.NewCapTable(1)
		if err == nil {
			caps.At(0).SetSenderHosted(1)
		}
		return err
	}
	tail := func(c rpccp.Call) error { c.SendResultsTo().SetYourself(); return nil }
	bodies := [][]byte{
		build(results(7, echo, nil)),
		build(results(0xFFFFFFFF, echo, func(r rpccp.Return) { r.SetReleaseParamCaps(false); r.SetNoFinishNeeded(true) })),
		build(results(1, nil, nil)),
		build(results(2, empty, nil)),
		build(results(3, list, nil)),
		build(func(m rpccp.Message, seg *capnp.Segment) error {
			if err := results(4, echo, nil)(m, seg); err != nil {
				return err
			}
			ret, _ := m.Return()
			p, _ := ret.Results()
			caps, err := p.NewCapTable(1)
			if err == nil {
				caps.At(0).SetSenderHosted(5)
			}
			return err
		}),
		build(func(m rpccp.Message, seg *capnp.Segment) error {
			ret, err := m.NewReturn()
			if err != nil {
				return err
			}
			ret.SetAnswerId(8)
			e, err := ret.NewException()
			if err == nil {
				err = e.SetReason("no")
			}
			return err
		}),
		build(func(m rpccp.Message, seg *capnp.Segment) error {
			f, err := m.NewFinish()
			f.SetQuestionId(9)
			return err
		}),
		build(call(toImport(3), echo, nil)),
		build(call(toImport(0xFFFFFFFF), nil, nil)),
		build(call(toImport(4), empty, nil)),
		build(call(toImport(5), echo, withCap)),
		build(call(toAnswer, echo, nil)),
		build(call(toImport(6), echo, tail)),
		build(call(toImport(7), list, nil)),
		build(func(m rpccp.Message, seg *capnp.Segment) error {
			f, err := m.NewFinish()
			f.SetQuestionId(12)
			f.SetReleaseResultCaps(false)
			return err
		}),
		build(func(m rpccp.Message, seg *capnp.Segment) error {
			r, err := m.NewRelease()
			r.SetId(13)
			r.SetReferenceCount(2)
			return err
		}),
		build(func(m rpccp.Message, seg *capnp.Segment) error {
			r, err := m.NewResolve()
			r.SetPromiseId(14)
			return err
		}),
	}
	takes := []bool{true, true, true, true, false, true, false, true, true, true, true, true, true, false, false, true, true, false}
	return bodies, takes
}

// readBody wraps body as the frame reader does for a one-segment frame.
func readBody(body []byte) *capnp.Message {
	msg := messagePool.Get().(*capnp.Message)
	_, _ = msg.Reset(inboundArena(body))
	return msg
}

// FuzzFastDecode checks decodeFast against go-capnp: whatever the fast
// path takes, go-capnp reads as the same Call or Return, with the same
// fields and the same parameters or results, and no capabilities.
func FuzzFastDecode(f *testing.F) {
	bodies, _ := fastSeeds(f)
	for _, s := range bodies {
		f.Add(s, uint16(0), uint8(0))
		f.Add(s, uint16(12), uint8(5)) // tight traversal and nesting limits
	}
	f.Fuzz(func(t *testing.T, body []byte, traverseWords uint16, depth uint8) {
		body = body[:len(body)/8*8]
		read := func() *capnp.Message {
			msg := readBody(body)
			msg.TraverseLimit, msg.DepthLimit = uint64(traverseWords)*8, uint(depth)
			return msg
		}
		fast := read()
		defer recycleMessage(fast)
		fm := decodeFast(fast)
		if fm.kind == fastNone {
			return
		}
		slow := read()
		defer recycleMessage(slow)
		// go-capnp's path reads the whole envelope first, as the
		// handlers do, and only then anything inside what it found.
		m, err := rpccp.ReadRootMessage(slow)
		if err != nil {
			t.Fatalf("fast path took a message go-capnp cannot read: %v", err)
		}
		var (
			p   rpccp.Payload
			pa  rpccp.PromisedAnswer
			got fastCall
		)
		switch fm.kind {
		case fastFinishMsg:
			f, err := m.Finish()
			if m.Which() != rpccp.Message_Which_finish || err != nil || f.QuestionId() != fm.id || f.ReleaseResultCaps() != fm.flag {
				t.Fatalf("fast path read Finish(%d, %v); go-capnp reads %v: Finish(%d, %v) (%v)", fm.id, fm.flag, m.Which(), f.QuestionId(), f.ReleaseResultCaps(), err)
			}
			return
		case fastReleaseMsg:
			r, err := m.Release()
			if m.Which() != rpccp.Message_Which_release || err != nil || r.Id() != fm.id || r.ReferenceCount() != fm.count {
				t.Fatalf("fast path read Release(%d, %d); go-capnp reads %v: Release(%d, %d) (%v)", fm.id, fm.count, m.Which(), r.Id(), r.ReferenceCount(), err)
			}
			return
		case fastReturnMsg:
			if m.Which() != rpccp.Message_Which_return {
				t.Fatalf("fast path read a Return go-capnp reads as %v", m.Which())
			}
			ret, err := m.Return()
			if err != nil || ret.Which() != rpccp.Return_Which_results {
				t.Fatalf("fast path took a Return go-capnp reads as %v (%v)", ret.Which(), err)
			}
			if got := (returnFields{ret.AnswerId(), ret.ReleaseParamCaps(), ret.NoFinishNeeded()}); got != fm.ret {
				t.Fatalf("fields %+v; go-capnp reads %+v", fm.ret, got)
			}
			if p, err = ret.Results(); err != nil {
				t.Fatalf("fast path took results go-capnp fails on: %v", err)
			}
		case fastCallMsg:
			if m.Which() != rpccp.Message_Which_call {
				t.Fatalf("fast path read a Call go-capnp reads as %v", m.Which())
			}
			call, err := m.Call()
			if err != nil || call.SendResultsTo().Which() != rpccp.Call_sendResultsTo_Which_caller {
				t.Fatalf("fast path took a call go-capnp reads sending results to %v (%v)", call.SendResultsTo().Which(), err)
			}
			tg, err := call.Target()
			if err != nil || !tg.IsValid() {
				t.Fatalf("fast path took a call whose target go-capnp fails on: %v", err)
			}
			got = fastCall{qid: call.QuestionId(), method: capnp.Method{InterfaceID: call.InterfaceId(), MethodID: call.MethodId()}}
			switch tg.Which() {
			case rpccp.MessageTarget_Which_importedCap:
				got.importedCap = tg.ImportedCap()
			case rpccp.MessageTarget_Which_promisedAnswer:
				if pa, err = tg.PromisedAnswer(); err != nil {
					t.Fatalf("fast path took a promised answer go-capnp fails on: %v", err)
				}
			default:
				t.Fatalf("fast path took a call go-capnp reads with target %v", tg.Which())
			}
			if p, err = call.Params(); err != nil || !p.IsValid() {
				t.Fatalf("fast path took parameters go-capnp fails on: %v", err)
			}
		}
		want, err := p.Content()
		if err != nil {
			t.Fatalf("fast path took content go-capnp fails on: %v", err)
		}
		// The envelope read, compare what was found, in the same order on
		// both messages (reading inside charges both traversal limits).
		if fm.kind == fastCallMsg {
			if want := (fastCall{qid: fm.call.qid, importedCap: fm.call.importedCap, method: fm.call.method}); got != want {
				t.Fatalf("call %+v; go-capnp reads %+v", want, got)
			}
			if fm.call.promisedAnswer.IsValid() != pa.IsValid() {
				t.Fatalf("fast path's promised answer valid %v; go-capnp's %v", fm.call.promisedAnswer.IsValid(), pa.IsValid())
			}
			if pa.IsValid() {
				checkSameStruct(t, "promised answer", capnp.Struct(fm.call.promisedAnswer), capnp.Struct(pa))
			}
		}
		checkSamePayload(t, fm.payload, p)
		checkSameContent(t, fm.content, want)
	})
}

// checkSameContent fails t unless content is what go-capnp read, want.
func checkSameContent(t *testing.T, content, want capnp.Ptr) {
	t.Helper()
	if content.IsValid() != want.IsValid() {
		t.Fatalf("content valid %v; go-capnp reads valid %v", content.IsValid(), want.IsValid())
	}
	if !content.IsValid() {
		return
	}
	checkSameStruct(t, "content", content.Struct(), want.Struct())
}

// checkSamePayload fails t unless payload, zero for one without
// capabilities, is the payload go-capnp read, want.
func checkSamePayload(t *testing.T, payload, want rpccp.Payload) {
	t.Helper()
	if !payload.IsValid() {
		if want.HasCapTable() {
			t.Fatal("fast path left out a payload go-capnp reads with a cap table")
		}
		return
	}
	if !want.HasCapTable() {
		t.Fatal("fast path kept a payload go-capnp reads without a cap table")
	}
	checkSameStruct(t, "payload", capnp.Struct(payload), capnp.Struct(want))
}

// checkSameStruct fails t unless s is the struct go-capnp read, want: the
// same size, data words, and canonical form (or the same failure to read
// it: depth, bad pointers inside).
func checkSameStruct(t *testing.T, what string, s, want capnp.Struct) {
	t.Helper()
	if s.Size() != want.Size() {
		t.Fatalf("%s size %v; go-capnp reads %v", what, s.Size(), want.Size())
	}
	got, gerr := capnp.Canonicalize(s)
	exp, eerr := capnp.Canonicalize(want)
	if string(got) != string(exp) || (gerr == nil) != (eerr == nil) || gerr != nil && gerr.Error() != eerr.Error() {
		t.Fatalf("%s differs from go-capnp's: %x (%v) against %x (%v)", what, got, gerr, exp, eerr)
	}
	for off := capnp.DataOffset(0); off+8 <= capnp.DataOffset(want.Size().DataSize); off += 8 {
		if s.Uint64(off) != want.Uint64(off) {
			t.Fatalf("%s: data word at %d differs from go-capnp's", what, off)
		}
	}
}

// TestFastDecodeTakesTheCommonCases: the seeds that are a Return of
// results or a Call (to an export or pipelined) whose content is a struct
// or null, a Finish or a Release, and only those, take the fast path.
func TestFastDecodeTakesTheCommonCases(t *testing.T) {
	bodies, takes := fastSeeds(t)
	for i, body := range bodies {
		msg := readBody(body)
		fm := decodeFast(msg)
		recycleMessage(msg)
		if (fm.kind != fastNone) != takes[i] {
			t.Errorf("seed %d: fast path %v; want %v", i, fm.kind != fastNone, takes[i])
		}
	}
}
