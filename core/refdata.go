package core

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"
)

// WithDataReference returns a context for one call whose parameters'
// pointer field number field is data. When the call goes straight to a
// peer over a captp connection, the core writes data to the transport
// from the caller's memory instead of copying it into the message: it
// places the field itself before the call's PlaceArgs runs (so PlaceArgs
// should set the field only when it is not set yet), and the call then
// returns only once data has been handed to the transport or the
// connection failed, so the caller may reuse data afterwards in every
// case. Elsewhere (a local capability, a call redirected after a promise
// resolved, data shorter than 64 KiB or not a whole number of 8-byte
// words) the hint is ignored and PlaceArgs copies data as usual.
//
// core/bytestream's Writer sends its chunks this way: for bulk streams,
// copying every byte into a message and clearing the message buffer for
// reuse cost as much CPU as the socket write itself.
func WithDataReference(ctx context.Context, field uint16, data []byte) context.Context {
	return context.WithValue(ctx, dataRefKey{}, &dataRef{field: field, data: data})
}

type dataRefKey struct{}

// dataRef is one call's hint; taken is set by the first sendCall that uses
// it, so that a call the core forwards elsewhere copies instead.
type dataRef struct {
	field uint16
	data  []byte
	taken bool
}

// refSeg0Bytes is the fixed capacity of the first segment of a message
// that references data: the arena cannot grow, so everything but the data
// must fit in it.
const refSeg0Bytes = 2 << 10

// takeDataRef returns ctx's data hint if this call can use it.
func takeDataRef(ctx context.Context, manual bool) *dataRef {
	ref, _ := ctx.Value(dataRefKey{}).(*dataRef)
	if ref == nil || ref.taken || manual || len(ref.data) < largeFrameBytes || len(ref.data)%8 != 0 || len(ref.data) > maxDataListBytes {
		return nil
	}
	ref.taken = true
	return ref
}

// maxDataListBytes is the longest Data a list pointer can describe.
const maxDataListBytes = 1<<29 - 1

// newRefMessage allocates an outbound message of two segments: a small
// first one for the message itself and, as segment 1, data (a whole
// number of words), which nothing ever writes to. It returns the message
// and a Data list that spans segment 1, for the caller to point a field at
// (go-capnp then writes a double-far pointer, segment 1 having no room for
// a landing pad).
func newRefMessage(data []byte) (*capnp.Message, rpccp.Message, capnp.List, error) {
	return newRefMessageNotify(data, nil)
}

// newRefMessageNotify is newRefMessage with na, if not nil, as the arena
// (wrapping the one it makes): na.released runs once the message is
// released (recycled), when the data it references may be reused.
func newRefMessageNotify(data []byte, na *notifyArena) (*capnp.Message, rpccp.Message, capnp.List, error) {
	fail := func(err error) (*capnp.Message, rpccp.Message, capnp.List, error) {
		return nil, rpccp.Message{}, capnp.List{}, fmt.Errorf("reference data: %w", err)
	}
	// data[:n:n]: with spare capacity go-capnp would put a landing pad
	// into the caller's memory past the end of data.
	var arena capnp.Arena = capnp.MultiSegment([][]byte{make([]byte, 0, refSeg0Bytes), data[:len(data):len(data)]})
	if na != nil {
		na.Arena = arena
		arena = na
	}
	msg := messagePool.Get().(*capnp.Message)
	seg, err := msg.Reset(arena)
	if err != nil {
		return fail(err)
	}
	// The list is reached through the root pointer once: a double-far
	// pointer to a two-word landing pad (far pointer to segment 1 word 0,
	// then the list's tag), since go-capnp offers no other way to name
	// memory that is already in a segment.
	if _, err := capnp.NewStruct(seg, capnp.ObjectSize{DataSize: 16}); err != nil {
		msg.Reset(nil)
		messagePool.Put(msg)
		return fail(err)
	}
	raw := seg.Data()
	if len(raw) != 24 {
		msg.Reset(nil)
		messagePool.Put(msg)
		return fail(errors.New("unexpected first segment layout"))
	}
	const (
		farPointer    = 2
		doubleFar     = 1 << 2
		listPointer   = 1
		byteElements  = 2 << 32
		padWordOffset = 1
	)
	binary.LittleEndian.PutUint64(raw[8:], farPointer|1<<32)                                // segment 1, word 0
	binary.LittleEndian.PutUint64(raw[16:], listPointer|byteElements|uint64(len(data))<<35) // Data of len(data) bytes
	binary.LittleEndian.PutUint64(raw[0:], farPointer|doubleFar|padWordOffset<<3)           // segment 0, word 1
	msg.ResetReadLimit(1<<63 - 1)
	root, err := msg.Root()
	if err != nil || root.List().Len() != len(data) {
		msg.Reset(nil)
		messagePool.Put(msg)
		if err == nil {
			err = errors.New("landing pad does not resolve to the data")
		}
		return fail(err)
	}
	m, err := rpccp.NewRootMessage(seg)
	if err != nil {
		msg.Reset(nil)
		messagePool.Put(msg)
		return fail(err)
	}
	return msg, m, root.List(), nil
}

// notifyArena tells its owner when the message using it is released.
type notifyArena struct {
	capnp.Arena
	released func()
}

func (a *notifyArena) Release() {
	a.Arena.Release()
	if f := a.released; f != nil {
		a.released = nil
		f()
	}
}
