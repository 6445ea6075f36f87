package core

import (
	"bytes"
	"encoding/binary"
	"fmt"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"
)

// frameTemplate is an encoded frame whose only variable parts are uint32
// fields at known offsets: a message sent for every call or capability
// (Finish, Release) is cheaper copied and patched than built.
type frameTemplate struct {
	frame []byte
	at    []int // where each field goes, in the order encode sets them
	err   error
}

// newFrameTemplate encodes with encode, which sets n uint32 fields from
// its values, and finds each field by encoding it alone as all ones.
func newFrameTemplate(what string, n int, encode func(m rpccp.Message, v []uint32) error) frameTemplate {
	build := func(v []uint32) ([]byte, error) {
		msg, seg, err := capnp.NewMessage(capnp.SingleSegment(nil))
		if err != nil {
			return nil, err
		}
		defer msg.Release()
		m, err := rpccp.NewRootMessage(seg)
		if err != nil {
			return nil, err
		}
		if err := encode(m, v); err != nil {
			return nil, err
		}
		return appendFrame(nil, msg)
	}
	zero, err := build(make([]uint32, n))
	if err != nil {
		return frameTemplate{err: fmt.Errorf("%s template: %w", what, err)}
	}
	t := frameTemplate{frame: zero}
	for k := range n {
		v := make([]uint32, n)
		v[k] = 0xffffffff
		one, err := build(v)
		if err != nil || len(one) != len(zero) {
			return frameTemplate{err: fmt.Errorf("%s template: field %d: %v", what, k, err)}
		}
		at := -1
		for i := range zero {
			if zero[i] != one[i] {
				at = i
				break
			}
		}
		// Exactly the four bytes of the field differ.
		if at < 0 || at+4 > len(zero) || !bytes.Equal(zero[at+4:], one[at+4:]) ||
			binary.LittleEndian.Uint32(one[at:]) != 0xffffffff {
			return frameTemplate{err: fmt.Errorf("%s template: field %d not found", what, k)}
		}
		t.at = append(t.at, at)
	}
	return t
}

// sendTemplateLocked queues t's frame with its fields set to v.
func (c *Conn) sendTemplateLocked(t *frameTemplate, v ...uint32) {
	if t.frame == nil || len(v) != len(t.at) {
		c.log.Error("captp: no frame template", "err", t.err)
		return
	}
	n := len(c.out)
	c.out = append(c.out, t.frame...)
	for k, at := range t.at {
		binary.LittleEndian.PutUint32(c.out[n+at:], v[k])
	}
	c.wakeWriter = true
}
