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

// fastReturnSeeds are bodies of one-segment messages: Returns the fast
// path takes (results as a struct, null, empty; flags set and not) and
// ones it must leave to go-capnp (capabilities, an exception, a list, a
// capability as the content, other messages).
func fastReturnSeeds(t testing.TB) [][]byte {
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
	return [][]byte{
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
	}
}

// readBody wraps body as the frame reader does for a one-segment frame.
func readBody(body []byte) *capnp.Message {
	msg := messagePool.Get().(*capnp.Message)
	_, _ = msg.Reset(inboundArena(body))
	return msg
}

// FuzzFastReturn checks decodeFastReturn against go-capnp: whatever the
// fast path accepts, go-capnp reads as a Return of those results, with the
// same fields and the same content.
func FuzzFastReturn(f *testing.F) {
	for _, s := range fastReturnSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		body = body[:len(body)/8*8]
		fast := readBody(body)
		defer recycleMessage(fast)
		fields, content, ok := decodeFastReturn(fast)
		if !ok {
			return
		}
		slow := readBody(body)
		defer recycleMessage(slow)
		m, err := rpccp.ReadRootMessage(slow)
		if err != nil || m.Which() != rpccp.Message_Which_return {
			t.Fatalf("fast path took a message go-capnp reads as %v (%v)", m.Which(), err)
		}
		ret, err := m.Return()
		if err != nil || ret.Which() != rpccp.Return_Which_results {
			t.Fatalf("fast path took a Return go-capnp reads as %v (%v)", ret.Which(), err)
		}
		p, err := ret.Results()
		if err != nil || p.HasCapTable() {
			t.Fatalf("fast path took results go-capnp reads with a cap table (%v)", err)
		}
		want, err := p.Content()
		if err != nil {
			t.Fatalf("fast path took content go-capnp fails on: %v", err)
		}
		if got := (returnFields{ret.AnswerId(), ret.ReleaseParamCaps(), ret.NoFinishNeeded()}); got != fields {
			t.Fatalf("fields %+v; go-capnp reads %+v", fields, got)
		}
		if content.IsValid() != want.IsValid() {
			t.Fatalf("content valid %v; go-capnp reads valid %v", content.IsValid(), want.IsValid())
		}
		if !content.IsValid() {
			return
		}
		if content.Struct().Size() != want.Struct().Size() {
			t.Fatalf("content size %v; go-capnp reads %v", content.Struct().Size(), want.Struct().Size())
		}
		// The same struct: its canonical form, or the same failure to
		// read it (depth, bad pointers inside), and each data word.
		got, gerr := capnp.Canonicalize(content.Struct())
		exp, eerr := capnp.Canonicalize(want.Struct())
		if string(got) != string(exp) || (gerr == nil) != (eerr == nil) || gerr != nil && gerr.Error() != eerr.Error() {
			t.Fatalf("content differs from go-capnp's: %x (%v) against %x (%v)", got, gerr, exp, eerr)
		}
		for off := capnp.DataOffset(0); off+8 <= capnp.DataOffset(want.Struct().Size().DataSize); off += 8 {
			if content.Struct().Uint64(off) != want.Struct().Uint64(off) {
				t.Fatalf("data word at %d differs from go-capnp's", off)
			}
		}
	})
}

// TestFastReturnTakesTheCommonCase: the seeds a Return of plain results
// would be, and only those, take the fast path.
func TestFastReturnTakesTheCommonCase(t *testing.T) {
	want := []bool{true, true, true, true, false, false, false, false}
	for i, body := range fastReturnSeeds(t) {
		msg := readBody(body)
		_, _, ok := decodeFastReturn(msg)
		recycleMessage(msg)
		if ok != want[i] {
			t.Errorf("seed %d: fast path %v; want %v", i, ok, want[i])
		}
	}
}
