package tamago

import (
	"encoding/binary"
	"fmt"
	"sync"
	"sync/atomic"
	"unsafe"
)

// fakeMemory is Memory in Go memory, with made-up device addresses that
// fakeNet maps back.
type fakeMemory struct {
	mu     sync.Mutex
	next   uint64
	blocks map[uint64][]byte
}

func newFakeMemory() *fakeMemory {
	return &fakeMemory{next: 0x5000_0000, blocks: map[uint64][]byte{}}
}

func (m *fakeMemory) Alloc(size, align int) (uint64, []byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	// uint64 backing makes the slice 8-aligned, as rings need.
	words := make([]uint64, (size+7)/8)
	buf := unsafe.Slice((*byte)(unsafe.Pointer(&words[0])), size)
	a := uint64(align)
	addr := (m.next + a - 1) &^ (a - 1)
	m.blocks[addr] = buf
	m.next = addr + uint64(size) + 64
	return addr, buf, nil
}

// resolve returns the n bytes at device address addr.
func (m *fakeMemory) resolve(addr uint64, n uint32) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for a, b := range m.blocks {
		if addr >= a && addr+uint64(n) <= a+uint64(len(b)) {
			return b[addr-a : addr-a+uint64(n)], nil
		}
	}
	return nil, fmt.Errorf("fake device: address %#x+%d maps to no allocation", addr, n)
}

type fakeQueue struct {
	size               uint16
	desc, avail, used  []byte
	lastAvail, usedIdx uint16
	ready              bool
}

// fakeNet is a virtio-net device (the device's side of the split queues)
// for tests: frames the driver transmits go to out; inject delivers
// frames into the driver's receive buffers.
//
// Like QEMU's virtio-net, it does not drop a frame that finds no receive
// buffer: it holds it (QEMU keeps it in its net queue, or stops reading
// the backend) until the driver posts buffers and notifies the receive
// queue, which flushes the held frames in order (virtio_net_handle_rx).
// A frame beyond maxHeld held ones is dropped, as QEMU's net queue drops
// beyond 10000 packets.
type fakeNet struct {
	mem *fakeMemory

	mu       sync.Mutex
	features uint64 // offered
	driver   uint64
	status   uint32
	refuse   bool // clear FEATURES_OK
	mac      [6]byte
	queues   [2]fakeQueue
	maxQueue int
	stallTx  bool // leave transmitted buffers unused
	out      func(frame []byte)
	errs     []error
	notifies int
	held     [][]byte // frames waiting for a receive buffer, oldest first
	maxHeld  int
	dropped  int // injected frames beyond maxHeld
	hdrs     [][]byte
}

func newFakeNet(mem *fakeMemory) *fakeNet {
	return &fakeNet{mem: mem, features: featVersion1 | featNetMAC | featNetStatus, maxQueue: 256, maxHeld: 10000,
		mac: [6]byte{0x52, 0x54, 0, 0x12, 0x34, 0x56}}
}

func (d *fakeNet) DeviceID() uint32 { return deviceIDNet }

func (d *fakeNet) DeviceFeatures() uint64 { return d.features }

func (d *fakeNet) SetDriverFeatures(f uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.driver = f
}

func (d *fakeNet) Status() uint32 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.status
}

func (d *fakeNet) SetStatus(s uint32) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if s == 0 {
		d.queues = [2]fakeQueue{}
		d.held = nil
	}
	if s&statusFeaturesOK != 0 && (d.refuse || d.driver&^d.features != 0) {
		s &^= statusFeaturesOK
	}
	d.status = s
}

func (d *fakeNet) ReadConfig(off int, p []byte) { copy(p, d.mac[off:]) }

func (d *fakeNet) MaxQueueSize(q int) int {
	if q > 1 {
		return 0
	}
	return d.maxQueue
}

func (d *fakeNet) SetupQueue(q int, size uint16, desc, avail, used uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	fq := &d.queues[q]
	fq.size = size
	var err error
	if fq.desc, err = d.mem.resolve(desc, uint32(size)*descSize); err == nil {
		if fq.avail, err = d.mem.resolve(avail, ringHdr+2*uint32(size)); err == nil {
			fq.used, err = d.mem.resolve(used, ringHdr+usedElemSize*uint32(size))
		}
	}
	if err != nil {
		d.errs = append(d.errs, err)
		return
	}
	fq.ready = true
}

// next takes the next available descriptor of q: its id and buffer.
func (d *fakeNet) next(q *fakeQueue, wantWrite bool) (uint16, []byte, bool) {
	availIdx := uint16(atomic.LoadUint32(word(q.avail, 0)) >> 16)
	if !q.ready || availIdx == q.lastAvail {
		return 0, nil, false
	}
	id := binary.LittleEndian.Uint16(q.avail[ringHdr+2*int(q.lastAvail%q.size):])
	q.lastAvail++
	desc := q.desc[int(id)*descSize:]
	addr := binary.LittleEndian.Uint64(desc)
	n := binary.LittleEndian.Uint32(desc[8:])
	flags := binary.LittleEndian.Uint16(desc[12:])
	if (flags&descFWrite != 0) != wantWrite {
		d.errs = append(d.errs, fmt.Errorf("fake device: descriptor %d has flags %#x", id, flags))
	}
	buf, err := d.mem.resolve(addr, n)
	if err != nil {
		d.errs = append(d.errs, err)
		return 0, nil, false
	}
	return id, buf, true
}

// use returns descriptor id with n bytes written to the driver.
func (d *fakeNet) use(q *fakeQueue, id uint16, n uint32) {
	e := q.used[ringHdr+usedElemSize*int(q.usedIdx%q.size):]
	binary.LittleEndian.PutUint32(e, uint32(id))
	binary.LittleEndian.PutUint32(e[4:], n)
	q.usedIdx++
	atomic.StoreUint32(word(q.used, 0), uint32(q.usedIdx)<<16)
}

// Notify on the receive queue delivers the frames held for want of a
// buffer into the buffers the driver has posted; on the transmit queue it
// sends every frame the driver has posted.
func (d *fakeNet) Notify(q int) {
	d.mu.Lock()
	d.notifies++
	if q == rxQueue {
		d.flushHeld()
	}
	if q != txQueue || d.stallTx {
		d.mu.Unlock()
		return
	}
	var frames [][]byte
	tq := &d.queues[txQueue]
	for {
		id, buf, ok := d.next(tq, false)
		if !ok {
			break
		}
		if len(buf) < netHdrLen {
			d.errs = append(d.errs, fmt.Errorf("fake device: %d-byte transmit buffer", len(buf)))
		} else {
			d.hdrs = append(d.hdrs, append([]byte(nil), buf[:netHdrLen]...))
			frames = append(frames, append([]byte(nil), buf[netHdrLen:]...))
		}
		d.use(tq, id, 0)
	}
	out := d.out
	d.mu.Unlock()
	for _, f := range frames {
		if out != nil {
			out(f)
		}
	}
}

// inject delivers frame to the driver. When the driver has posted no
// buffer, or frames are already held, the frame is held until the driver
// notifies the receive queue (dropped beyond maxHeld held frames).
func (d *fakeNet) inject(frame []byte) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.held) == 0 && d.receive(frame) {
		return
	}
	if len(d.held) >= d.maxHeld {
		d.dropped++
		return
	}
	d.held = append(d.held, append([]byte(nil), frame...))
}

// flushHeld delivers held frames, oldest first, while the driver has
// buffers posted.
func (d *fakeNet) flushHeld() {
	for len(d.held) > 0 && d.receive(d.held[0]) {
		d.held[0] = nil
		d.held = d.held[1:]
	}
}

// receive writes frame into the next posted receive buffer, or reports
// false when there is none.
func (d *fakeNet) receive(frame []byte) bool {
	rq := &d.queues[rxQueue]
	id, buf, ok := d.next(rq, true)
	if !ok {
		return false
	}
	clear(buf[:netHdrLen])
	binary.LittleEndian.PutUint16(buf[10:], 1) // num_buffers
	n := copy(buf[netHdrLen:], frame)
	d.use(rq, id, uint32(netHdrLen+n))
	return true
}

// counts returns how many frames the device holds and has dropped.
func (d *fakeNet) counts() (held, dropped int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.held), d.dropped
}

// raw writes a used entry for the receive queue as a hostile device
// would.
func (d *fakeNet) raw(id uint32, n uint32, advance uint16) {
	d.mu.Lock()
	defer d.mu.Unlock()
	rq := &d.queues[rxQueue]
	e := rq.used[ringHdr+usedElemSize*int(rq.usedIdx%rq.size):]
	binary.LittleEndian.PutUint32(e, id)
	binary.LittleEndian.PutUint32(e[4:], n)
	rq.usedIdx += advance
	atomic.StoreUint32(word(rq.used, 0), uint32(rq.usedIdx)<<16)
}

func (d *fakeNet) errors() []error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]error(nil), d.errs...)
}

// fakeUART is one end of a serial line: Rx takes bytes the other end
// sent, up to a 16-byte FIFO's worth becoming visible at a time.
type fakeUART struct {
	in, out *fakeWire
	rxCalls atomic.Int64
}

type fakeWire struct {
	mu  sync.Mutex
	buf []byte
}

func newFakeLine() (a, b *fakeUART) {
	w1, w2 := &fakeWire{}, &fakeWire{}
	return &fakeUART{in: w1, out: w2}, &fakeUART{in: w2, out: w1}
}

func (u *fakeUART) Tx(c byte) {
	u.out.mu.Lock()
	u.out.buf = append(u.out.buf, c)
	u.out.mu.Unlock()
}

func (u *fakeUART) Rx() (byte, bool) {
	u.rxCalls.Add(1)
	u.in.mu.Lock()
	defer u.in.mu.Unlock()
	if len(u.in.buf) == 0 {
		return 0, false
	}
	c := u.in.buf[0]
	u.in.buf = u.in.buf[1:]
	return c, true
}
