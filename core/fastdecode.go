package core

import (
	"encoding/binary"
	"reflect"
	"unsafe"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"
)

// The inbound fast path. go-capnp reads every pointer on the way from a
// message's root to a Call's parameters or a Return's results through
// its traversal checks (about 500 ns for the four of an echo's Return, a
// tenth of a call's CPU with calls in flight); the envelope's layout is
// fixed by rpc.capnp, so the commonest messages, in one segment (a Call
// to an export or pipelined on an answer, a Return of results, a Finish,
// a Release), are read here directly, with bounds checks of their own,
// charging go-capnp's traversal limit as its reads would. go-capnp is
// handed only what it must read itself (parameters or results, a cap
// table, a promised answer's transform), as the values its own reads
// would have produced. Anything else, or anything unexpected, takes
// go-capnp's path. FuzzFastDecode holds the two paths to the same
// reading, which also catches a go-capnp whose flag encodings change
// under an unchanged layout.

// ptrLayout mirrors capnp.Ptr (go-capnp v3.1.0-alpha.2), whose fields
// are unexported; fastPtrOK says the mirror matches the real layout, and
// the fast path runs only then.
type ptrLayout struct {
	seg        *capnp.Segment
	off        uint32
	lenOrCap   uint32
	size       capnp.ObjectSize
	depthLimit uint
	flags      uint8
}

// structLayout mirrors capnp.Struct the same way.
type structLayout struct {
	seg        *capnp.Segment
	off        uint32
	size       capnp.ObjectSize
	depthLimit uint
	flags      uint8
}

var fastPtrOK = sameLayout(reflect.TypeFor[capnp.Ptr](), reflect.TypeFor[ptrLayout]()) &&
	sameLayout(reflect.TypeFor[capnp.Struct](), reflect.TypeFor[structLayout]())

// sameLayout reports whether a and b are structs with fields of the same
// names, kinds, sizes and offsets, in order.
func sameLayout(a, b reflect.Type) bool {
	if a.Kind() != reflect.Struct || b.Kind() != reflect.Struct || a.Size() != b.Size() || a.NumField() != b.NumField() {
		return false
	}
	for i := range a.NumField() {
		fa, fb := a.Field(i), b.Field(i)
		if fa.Name != fb.Name || fa.Offset != fb.Offset || fa.Type.Size() != fb.Type.Size() || fa.Type.Kind() != fb.Type.Kind() {
			return false
		}
		if fa.Type.Kind() == reflect.Struct && !sameLayout(fa.Type, fb.Type) {
			return false
		}
	}
	return true
}

// structPtr returns the capnp.Ptr go-capnp's readPtr returns for s in
// seg.
func structPtr(seg *capnp.Segment, s rawStruct) capnp.Ptr {
	l := ptrLayout{seg: seg, off: uint32(s.at * 8), size: s.size(), depthLimit: s.depth} // flags 0: a struct pointer
	return *(*capnp.Ptr)(unsafe.Pointer(&l))
}

// structAt returns the capnp.Struct go-capnp's reads return for s in
// seg.
func structAt(seg *capnp.Segment, s rawStruct) capnp.Struct {
	l := structLayout{seg: seg, off: uint32(s.at * 8), size: s.size(), depthLimit: s.depth}
	return *(*capnp.Struct)(unsafe.Pointer(&l))
}

// rawStruct is a struct found by readStructPtr: its data section and
// pointer section, in words from the segment's start, and (set by
// envReader) the nesting depth go-capnp would have left for reading
// pointers out of it.
type rawStruct struct {
	at, dataWords, ptrs int
	depth               uint
}

// readStructPtr reads the pointer at word at of data: a struct pointer
// (null says so), or ok false for anything else (lists, capabilities,
// far pointers, out of bounds), which the fast path leaves to go-capnp.
func readStructPtr(data []byte, at int) (s rawStruct, null, ok bool) {
	if at < 0 || at >= len(data)/8 {
		return rawStruct{}, false, false
	}
	w := binary.LittleEndian.Uint64(data[at*8:])
	if w == 0 {
		return rawStruct{}, true, true
	}
	if w&3 != 0 {
		return rawStruct{}, false, false
	}
	t := at + 1 + int(int32(uint32(w))>>2)
	s = rawStruct{at: t, dataWords: int(uint16(w >> 32)), ptrs: int(uint16(w >> 48))}
	if t < 0 || t+s.dataWords+s.ptrs > len(data)/8 {
		return rawStruct{}, false, false
	}
	return s, false, true
}

func (s rawStruct) size() capnp.ObjectSize {
	return capnp.ObjectSize{DataSize: capnp.Size(s.dataWords * 8), PointerCount: uint16(s.ptrs)}
}

// u16 and u32 read data fields at byte offset off of s, zero (the
// default) past its data section, as go-capnp's accessors do.
func (s rawStruct) u16(data []byte, off int) uint16 {
	if off+2 > s.dataWords*8 {
		return 0
	}
	return binary.LittleEndian.Uint16(data[s.at*8+off:])
}

func (s rawStruct) u32(data []byte, off int) uint32 {
	if off+4 > s.dataWords*8 {
		return 0
	}
	return binary.LittleEndian.Uint32(data[s.at*8+off:])
}

func (s rawStruct) u64(data []byte, off int) uint64 {
	if off+8 > s.dataWords*8 {
		return 0
	}
	return binary.LittleEndian.Uint64(data[s.at*8+off:])
}

func (s rawStruct) bit(data []byte, n int) bool {
	if n/8 >= s.dataWords*8 {
		return false
	}
	return data[s.at*8+n/8]&(1<<(n%8)) != 0
}

// ptr reads pointer field i of s (null past its pointer section).
func (s rawStruct) ptr(data []byte, i int) (rawStruct, bool, bool) {
	if i >= s.ptrs {
		return rawStruct{}, true, true
	}
	return readStructPtr(data, s.at+s.dataWords+i)
}

// rpc.capnp's layout: Message's union tag; Call's, MessageTarget's and
// Return's fields and union tags (offsets in bytes, bits for Bools); a
// Payload's pointers.
const (
	messageWhichCall            = 2
	messageWhichReturn          = 3
	messageWhichFinish          = 4
	messageWhichRelease         = 6
	finishQuestionIDOffset      = 0
	finishNoReleaseBit          = 32 // releaseResultCaps, stored inverted (default true)
	releaseIDOffset             = 0
	releaseCountOffset          = 4
	callQuestionIDOffset        = 0
	callMethodIDOffset          = 4
	callSendResultsToOffset     = 6 // union tag; 0 is caller
	callInterfaceIDOffset       = 8
	callTargetPointer           = 0
	callParamsPointer           = 1
	targetImportedCapOffset     = 0
	targetWhichOffset           = 4 // union tag
	targetWhichImportedCap      = 0
	targetWhichPromisedAnswer   = 1
	targetPromisedAnswerPointer = 0
	returnAnswerIDOffset        = 0
	returnWhichOffset           = 6  // union tag; 0 is results
	returnNoReleaseBit          = 32 // releaseParamCaps, stored inverted (default true)
	returnNoFinishNeededBit     = 33
	returnResultsPointer        = 0
	payloadContentPointer       = 0
	payloadCapTablePointer      = 1
	goCapnpDefaultDepthLimit    = 64
	goCapnpDefaultTraverseLimit = 64 << 20
)

// fastKind says what decodeFast found.
type fastKind uint8

const (
	fastNone       fastKind = iota // go-capnp's path
	fastCallMsg                    // a Call to an export, parameters without capabilities
	fastReturnMsg                  // a Return of results without capabilities
	fastFinishMsg                  // a Finish
	fastReleaseMsg                 // a Release
)

// fastCall is a Call decodeFast read: to export importedCap, or pipelined
// on promisedAnswer if that is valid.
type fastCall struct {
	qid, importedCap uint32
	promisedAnswer   rpccp.PromisedAnswer
	method           capnp.Method
}

// fastMsg is what decodeFast read: a Call, or a Return's fields, with
// the payload's content (parameters or results) and the payload itself
// when it has capabilities (zero otherwise); a Finish's question and
// releaseResultCaps (flag); a Release's export and count.
type fastMsg struct {
	kind      fastKind
	call      fastCall
	ret       returnFields
	content   capnp.Ptr
	payload   rpccp.Payload
	id, count uint32
	flag      bool
}

// decodeFast reads msg if it is, in one segment, a Call to an export
// (sent to the caller) or a Return of results, either without
// capabilities, a Finish or a Release; parameters or results are as
// go-capnp would read them (capnp.Ptr, null included). Otherwise its kind
// is fastNone.
func decodeFast(msg *capnp.Message) fastMsg {
	if !fastPtrOK || msg.NumSegments() != 1 {
		return fastMsg{}
	}
	seg, err := msg.Segment(0)
	if err != nil {
		return fastMsg{}
	}
	r := envReader{data: seg.Data(), seg: seg, depth: msg.DepthLimit}
	if r.depth == 0 {
		r.depth = goCapnpDefaultDepthLimit
	}
	fm := r.decode()
	if fm.kind == fastNone {
		return fastMsg{}
	}
	// Charge the reads go-capnp's path would have made, as it would: a
	// message over its traversal limit takes that path, and fails there.
	limit := msg.TraverseLimit
	if limit == 0 {
		limit = goCapnpDefaultTraverseLimit
	}
	if r.charged > limit {
		return fastMsg{}
	}
	msg.ResetReadLimit(limit - r.charged)
	return fm
}

// envReader reads a message's envelope for decodeFast, adding up the
// bytes go-capnp's traversal limit would have been charged.
type envReader struct {
	data    []byte
	seg     *capnp.Segment
	depth   uint // the message's nesting limit
	charged uint64
}

// field reads struct pointer field i of s, as readStructPtr does, and
// charges the struct's size; reading past the nesting limit is left to
// go-capnp (not ok).
func (r *envReader) field(s rawStruct, i int) (rawStruct, bool, bool) {
	t, null, ok := s.ptr(r.data, i)
	if ok && !null {
		if s.depth == 0 {
			return rawStruct{}, false, false
		}
		t.depth = s.depth - 1
		r.charged += uint64(t.dataWords+t.ptrs) * 8
	}
	return t, null, ok
}

func (r *envReader) decode() fastMsg {
	data := r.data
	root, null, ok := readStructPtr(data, 0)
	if !ok || null || r.depth == 0 {
		return fastMsg{}
	}
	root.depth = r.depth - 1
	r.charged += uint64(root.dataWords+root.ptrs) * 8
	switch root.u16(data, 0) {
	case messageWhichCall:
		call, null, ok := r.field(root, 0)
		if !ok || null || call.u16(data, callSendResultsToOffset) != 0 {
			return fastMsg{}
		}
		target, null, ok := r.field(call, callTargetPointer)
		if !ok || null {
			return fastMsg{}
		}
		fc := fastCall{
			qid:    call.u32(data, callQuestionIDOffset),
			method: capnp.Method{InterfaceID: call.u64(data, callInterfaceIDOffset), MethodID: call.u16(data, callMethodIDOffset)},
		}
		switch target.u16(data, targetWhichOffset) {
		case targetWhichImportedCap:
			fc.importedCap = target.u32(data, targetImportedCapOffset)
		case targetWhichPromisedAnswer:
			pa, null, ok := r.field(target, targetPromisedAnswerPointer)
			if !ok || null {
				return fastMsg{}
			}
			fc.promisedAnswer = rpccp.PromisedAnswer(structAt(r.seg, pa))
		default:
			return fastMsg{}
		}
		content, payload, ok := r.payloadContent(call, callParamsPointer)
		if !ok {
			return fastMsg{}
		}
		return fastMsg{kind: fastCallMsg, call: fc, content: content, payload: payload}
	case messageWhichReturn:
		ret, null, ok := r.field(root, 0)
		if !ok || null || ret.u16(data, returnWhichOffset) != 0 {
			return fastMsg{}
		}
		content, payload, ok := r.payloadContent(ret, returnResultsPointer)
		if !ok {
			return fastMsg{}
		}
		return fastMsg{kind: fastReturnMsg, content: content, payload: payload, ret: returnFields{
			id:               ret.u32(data, returnAnswerIDOffset),
			releaseParamCaps: !ret.bit(data, returnNoReleaseBit),
			noFinishNeeded:   ret.bit(data, returnNoFinishNeededBit),
		}}
	case messageWhichFinish:
		f, null, ok := r.field(root, 0)
		if !ok || null {
			return fastMsg{}
		}
		return fastMsg{kind: fastFinishMsg, id: f.u32(data, finishQuestionIDOffset), flag: !f.bit(data, finishNoReleaseBit)}
	case messageWhichRelease:
		rel, null, ok := r.field(root, 0)
		if !ok || null {
			return fastMsg{}
		}
		return fastMsg{kind: fastReleaseMsg, id: rel.u32(data, releaseIDOffset), count: rel.u32(data, releaseCountOffset)}
	}
	return fastMsg{}
}

// payloadContent reads the Payload in pointer field i of s (a Call or
// Return under the root), if it is there and its content is a struct or
// null: the content, and the payload itself if it has a cap table
// (go-capnp reads that), else zero.
func (r *envReader) payloadContent(s rawStruct, i int) (capnp.Ptr, rpccp.Payload, bool) {
	payload, null, ok := r.field(s, i)
	if !ok || null {
		return capnp.Ptr{}, rpccp.Payload{}, false
	}
	c, null, ok := r.field(payload, payloadContentPointer)
	if !ok {
		return capnp.Ptr{}, rpccp.Payload{}, false
	}
	var p rpccp.Payload
	if _, none, _ := payload.ptr(r.data, payloadCapTablePointer); !none {
		p = rpccp.Payload(structAt(r.seg, payload))
	}
	if null {
		return capnp.Ptr{}, p, true
	}
	return structPtr(r.seg, c), p, true
}
