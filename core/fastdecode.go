package core

import (
	"encoding/binary"
	"reflect"
	"unsafe"

	"capnproto.org/go/capnp/v3"
)

// The inbound fast path. go-capnp reads every pointer on the way from a
// message's root to a Call's parameters or a Return's results through
// its traversal checks (about 500 ns for the four of an echo's Return, a
// tenth of a call's CPU with calls in flight); the envelope's layout is
// fixed by rpc.capnp, so the commonest cases, in one-segment messages, a
// Call to an export and a Return of results, both without capabilities,
// are read here directly, with bounds checks of their own, and only the
// parameters or results are handed to go-capnp, as the capnp.Ptr its own
// reads would have produced. Anything else, or anything unexpected,
// takes go-capnp's path.

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

var fastPtrOK = sameLayout(reflect.TypeFor[capnp.Ptr](), reflect.TypeFor[ptrLayout]())

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

// structPtr returns the capnp.Ptr go-capnp's readPtr returns for a
// struct at word off of seg, read at nesting depth limit depthLimit.
func structPtr(seg *capnp.Segment, off uint32, size capnp.ObjectSize, depthLimit uint) capnp.Ptr {
	l := ptrLayout{seg: seg, off: off, size: size, depthLimit: depthLimit} // flags 0: a struct pointer
	return *(*capnp.Ptr)(unsafe.Pointer(&l))
}

// rawStruct is a struct found by readStructPtr: its data section and
// pointer section, in words from the segment's start.
type rawStruct struct {
	at, dataWords, ptrs int
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
	messageWhichCall         = 2
	messageWhichReturn       = 3
	messageWhichFinish       = 4
	messageWhichRelease      = 6
	finishQuestionIDOffset   = 0
	finishNoReleaseBit       = 32 // releaseResultCaps, stored inverted (default true)
	releaseIDOffset          = 0
	releaseCountOffset       = 4
	callQuestionIDOffset     = 0
	callMethodIDOffset       = 4
	callSendResultsToOffset  = 6 // union tag; 0 is caller
	callInterfaceIDOffset    = 8
	callTargetPointer        = 0
	callParamsPointer        = 1
	targetImportedCapOffset  = 0
	targetWhichOffset        = 4 // union tag; 0 is importedCap
	returnAnswerIDOffset     = 0
	returnWhichOffset        = 6  // union tag; 0 is results
	returnNoReleaseBit       = 32 // releaseParamCaps, stored inverted (default true)
	returnNoFinishNeededBit  = 33
	returnResultsPointer     = 0
	payloadContentPointer    = 0
	payloadCapTablePointer   = 1
	goCapnpDefaultDepthLimit = 64
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

// fastCall is a Call decodeFast read.
type fastCall struct {
	qid, importedCap uint32
	method           capnp.Method
	content          capnp.Ptr
}

// fastMsg is what decodeFast read: a call; a Return's fields and
// results; a Finish's question and releaseResultCaps (flag); a Release's
// export and count.
type fastMsg struct {
	kind      fastKind
	call      fastCall
	ret       returnFields
	content   capnp.Ptr // a Return's results
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
	data := seg.Data()
	root, null, ok := readStructPtr(data, 0)
	if !ok || null {
		return fastMsg{}
	}
	switch root.u16(data, 0) {
	case messageWhichCall:
		call, null, ok := root.ptr(data, 0)
		if !ok || null || call.u16(data, callSendResultsToOffset) != 0 {
			return fastMsg{}
		}
		target, null, ok := call.ptr(data, callTargetPointer)
		if !ok || null || target.u16(data, targetWhichOffset) != 0 {
			return fastMsg{}
		}
		content, ok := payloadContent(msg, seg, call, callParamsPointer)
		if !ok {
			return fastMsg{}
		}
		return fastMsg{kind: fastCallMsg, call: fastCall{
			qid:         call.u32(data, callQuestionIDOffset),
			importedCap: target.u32(data, targetImportedCapOffset),
			method:      capnp.Method{InterfaceID: call.u64(data, callInterfaceIDOffset), MethodID: call.u16(data, callMethodIDOffset)},
			content:     content,
		}}
	case messageWhichReturn:
		ret, null, ok := root.ptr(data, 0)
		if !ok || null || ret.u16(data, returnWhichOffset) != 0 {
			return fastMsg{}
		}
		content, ok := payloadContent(msg, seg, ret, returnResultsPointer)
		if !ok {
			return fastMsg{}
		}
		return fastMsg{kind: fastReturnMsg, content: content, ret: returnFields{
			id:               ret.u32(data, returnAnswerIDOffset),
			releaseParamCaps: !ret.bit(data, returnNoReleaseBit),
			noFinishNeeded:   ret.bit(data, returnNoFinishNeededBit),
		}}
	case messageWhichFinish:
		f, null, ok := root.ptr(data, 0)
		if !ok || null {
			return fastMsg{}
		}
		return fastMsg{kind: fastFinishMsg, id: f.u32(data, finishQuestionIDOffset), flag: !f.bit(data, finishNoReleaseBit)}
	case messageWhichRelease:
		r, null, ok := root.ptr(data, 0)
		if !ok || null {
			return fastMsg{}
		}
		return fastMsg{kind: fastReleaseMsg, id: r.u32(data, releaseIDOffset), count: r.u32(data, releaseCountOffset)}
	}
	return fastMsg{}
}

// payloadContent reads the content of the Payload in pointer field i of
// s (a Call or Return under the root), if the payload is there, has no
// cap table, and holds a struct or null.
func payloadContent(msg *capnp.Message, seg *capnp.Segment, s rawStruct, i int) (capnp.Ptr, bool) {
	data := seg.Data()
	payload, null, ok := s.ptr(data, i)
	if !ok || null {
		return capnp.Ptr{}, false
	}
	if _, null, _ := payload.ptr(data, payloadCapTablePointer); !null {
		return capnp.Ptr{}, false // capabilities: go-capnp's path
	}
	c, null, ok := payload.ptr(data, payloadContentPointer)
	if !ok {
		return capnp.Ptr{}, false
	}
	depth := msg.DepthLimit
	if depth == 0 {
		depth = goCapnpDefaultDepthLimit
	}
	if depth < 5 {
		return capnp.Ptr{}, false // go-capnp reports the limit
	}
	if null {
		return capnp.Ptr{}, true
	}
	// Four reads deep: the root, the Call or Return, the Payload, the
	// content.
	return structPtr(seg, uint32(c.at*8), capnp.ObjectSize{DataSize: capnp.Size(c.dataWords * 8), PointerCount: uint16(c.ptrs)}, depth-4), true
}
