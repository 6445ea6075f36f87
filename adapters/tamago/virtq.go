package tamago

import (
	"encoding/binary"
	"fmt"
	"sync/atomic"
	"unsafe"
)

// Memory allocates memory that a device can reach by address (DMA). On
// TamaGo it is the board's DMA region (tamago's dma package); tests use
// ordinary Go memory and a fake device that maps addresses back to it.
type Memory interface {
	// Alloc returns size zeroed bytes aligned to align (a power of two),
	// and their device address.
	Alloc(size, align int) (addr uint64, buf []byte, err error)
}

// Split virtqueue layout (virtio 1.2, 2.7).
const (
	descSize     = 16
	descFNext    = 1
	descFWrite   = 2
	ringHdr      = 4 // flags, idx
	usedElemSize = 8
)

// virtq is the driver's half of one split virtqueue, with one buffer of
// bufSize bytes per descriptor (no chains). The device sees the
// descriptor table and both rings through their addresses; the ring
// indices it reads or writes are accessed atomically, which orders the
// plain accesses to descriptors and buffers around them.
type virtq struct {
	size                 uint16
	desc, avail, used    []byte
	descA, availA, usedA uint64
	bufs                 [][]byte

	availIdx uint16   // next avail slot, as published
	lastUsed uint16   // used entries consumed
	free     []uint16 // descriptors not owned by the device (tx)
	owned    []bool   // descriptors the device holds
}

func newVirtq(mem Memory, size uint16, bufSize int) (*virtq, error) {
	if size == 0 || size&(size-1) != 0 {
		return nil, fmt.Errorf("virtqueue size %d is not a power of two", size)
	}
	q := &virtq{size: size, owned: make([]bool, size)}
	var err error
	n := int(size)
	if q.descA, q.desc, err = mem.Alloc(descSize*n, 16); err != nil {
		return nil, fmt.Errorf("virtqueue descriptors: %w", err)
	}
	if q.availA, q.avail, err = mem.Alloc(ringHdr+2*n+2, 4); err != nil {
		return nil, fmt.Errorf("virtqueue available ring: %w", err)
	}
	if q.usedA, q.used, err = mem.Alloc(ringHdr+usedElemSize*n+2, 4); err != nil {
		return nil, fmt.Errorf("virtqueue used ring: %w", err)
	}
	addr, all, err := mem.Alloc(bufSize*n, 16)
	if err != nil {
		return nil, fmt.Errorf("virtqueue buffers: %w", err)
	}
	for i := range n {
		q.bufs = append(q.bufs, all[i*bufSize:(i+1)*bufSize:(i+1)*bufSize])
		d := q.desc[i*descSize:]
		binary.LittleEndian.PutUint64(d[0:], addr+uint64(i*bufSize))
		binary.LittleEndian.PutUint32(d[8:], uint32(bufSize))
		q.free = append(q.free, uint16(i))
	}
	return q, nil
}

// word returns the 32-bit word at off of b for atomic access. Rings are
// allocated 4-aligned and off is a multiple of 4.
func word(b []byte, off int) *uint32 { return (*uint32)(unsafe.Pointer(&b[off])) }

// offer hands descriptor id, holding n bytes (flags says who writes), to
// the device: it fills the slot, then publishes the new index.
func (q *virtq) offer(id uint16, n int, flags uint16) {
	d := q.desc[int(id)*descSize:]
	binary.LittleEndian.PutUint32(d[8:], uint32(n))
	binary.LittleEndian.PutUint16(d[12:], flags)
	binary.LittleEndian.PutUint16(d[14:], 0)
	binary.LittleEndian.PutUint16(q.avail[ringHdr+2*int(q.availIdx%q.size):], id)
	q.owned[id] = true
	q.availIdx++
	// flags (0: we want interrupts; we poll anyway) and idx in one store.
	atomic.StoreUint32(word(q.avail, 0), uint32(q.availIdx)<<16)
}

// take returns the next used descriptor and the length the device wrote,
// or ok false when the device has returned nothing new.
func (q *virtq) take() (id uint16, n uint32, ok bool, err error) {
	usedIdx := uint16(atomic.LoadUint32(word(q.used, 0)) >> 16)
	if usedIdx == q.lastUsed {
		return 0, 0, false, nil
	}
	if usedIdx-q.lastUsed > q.size {
		return 0, 0, false, fmt.Errorf("virtqueue: device used index %d is %d ahead of %d (size %d)", usedIdx, usedIdx-q.lastUsed, q.lastUsed, q.size)
	}
	e := q.used[ringHdr+usedElemSize*int(q.lastUsed%q.size):]
	q.lastUsed++
	id32 := binary.LittleEndian.Uint32(e[0:])
	n = binary.LittleEndian.Uint32(e[4:])
	if id32 >= uint32(q.size) || !q.owned[id32] {
		return 0, 0, false, fmt.Errorf("virtqueue: device returned descriptor %d, which it does not hold (size %d)", id32, q.size)
	}
	q.owned[id32] = false
	return uint16(id32), n, true, nil
}
