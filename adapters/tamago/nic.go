package tamago

import (
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"sync"
)

// Transport is the register interface of a virtio device (virtio 1.2,
// 4.2 for MMIO): what a driver reads and writes, independent of how.
// NewMMIO implements it for virtio-mmio under TamaGo.
type Transport interface {
	DeviceID() uint32
	DeviceFeatures() uint64
	SetDriverFeatures(f uint64)
	Status() uint32
	// SetStatus writes the status register; 0 resets the device.
	SetStatus(s uint32)
	// ReadConfig copies the device-specific configuration from offset off.
	ReadConfig(off int, p []byte)
	MaxQueueSize(q int) int
	// SetupQueue sets queue q's size and ring addresses and marks it
	// ready.
	SetupQueue(q int, size uint16, desc, avail, used uint64)
	// Notify tells the device that queue q has new buffers.
	Notify(q int)
}

// Device status bits and feature bits used by NIC.
const (
	statusAcknowledge = 1
	statusDriver      = 2
	statusDriverOK    = 4
	statusFeaturesOK  = 8
	statusFailed      = 128

	featNetMAC    = 1 << 5
	featNetStatus = 1 << 16
	featVersion1  = 1 << 32

	deviceIDNet = 1
	rxQueue     = 0
	txQueue     = 1
	// netHdrLen is struct virtio_net_hdr with VIRTIO_F_VERSION_1 (num_buffers
	// included).
	netHdrLen = 12
	// frameBuf holds one header and one Ethernet frame of 1514 bytes.
	frameBuf = 2048
	// MaxFrame is the largest Ethernet frame (without FCS) a NIC sends
	// or receives: an IP MTU of 1500.
	MaxFrame = 1514
)

// ErrTxFull is returned by NIC.Transmit when every transmit buffer is
// still held by the device.
var ErrTxFull = errors.New("virtio-net: transmit queue full")

// NICOptions configure a NIC. The zero value is valid.
type NICOptions struct {
	// QueueSize is the number of buffers per queue (a power of two,
	// capped by the device). Zero means 64.
	QueueSize uint16
}

// A NIC is a virtio-net driver: Ethernet frames out through the transmit
// queue and in from the receive queue, one 2 KiB buffer per frame (no
// offloads, no mergeable buffers, MTU 1500). It negotiates
// VIRTIO_F_VERSION_1 (required) and the MAC address feature. It polls:
// Receive returns at once, and NewLink runs the receive loop.
//
// Transmit and Receive may be called concurrently with each other, each
// from one goroutine at a time.
type NIC struct {
	t   Transport
	mac net.HardwareAddr

	txMu sync.Mutex
	tx   *virtq
	rxMu sync.Mutex
	rx   *virtq
}

// NewNIC resets the device behind t and sets it up as a network card
// with its queues in mem; opts may be nil.
func NewNIC(t Transport, mem Memory, opts *NICOptions) (*NIC, error) {
	var o NICOptions
	if opts != nil {
		o = *opts
	}
	if o.QueueSize == 0 {
		o.QueueSize = 64
	}
	if id := t.DeviceID(); id != deviceIDNet {
		return nil, fmt.Errorf("virtio-net: device ID %d is not a network card", id)
	}
	n := &NIC{t: t}
	if err := n.init(mem, o); err != nil {
		t.SetStatus(t.Status() | statusFailed)
		return nil, fmt.Errorf("virtio-net: %w", err)
	}
	return n, nil
}

func (n *NIC) init(mem Memory, o NICOptions) error {
	t := n.t
	t.SetStatus(0)
	t.SetStatus(statusAcknowledge)
	t.SetStatus(statusAcknowledge | statusDriver)
	dev := t.DeviceFeatures()
	if dev&featVersion1 == 0 {
		return fmt.Errorf("device does not offer VIRTIO_F_VERSION_1 (legacy devices are not supported; QEMU: -global virtio-mmio.force-legacy=false)")
	}
	want := featVersion1 | dev&(featNetMAC|featNetStatus)
	t.SetDriverFeatures(want)
	t.SetStatus(statusAcknowledge | statusDriver | statusFeaturesOK)
	if t.Status()&statusFeaturesOK == 0 {
		return fmt.Errorf("device refused features %#x", want)
	}
	if want&featNetMAC != 0 {
		mac := make([]byte, 6)
		t.ReadConfig(0, mac)
		n.mac = mac
	} else {
		n.mac = localMAC()
	}
	var err error
	for _, qi := range []int{rxQueue, txQueue} {
		size := o.QueueSize
		if m := t.MaxQueueSize(qi); m <= 0 {
			return fmt.Errorf("queue %d is not available", qi)
		} else if int(size) > m {
			size = uint16(1) << (bitLen(uint(m)) - 1)
		}
		q, e := newVirtq(mem, size, frameBuf)
		if e != nil {
			return fmt.Errorf("queue %d: %w", qi, e)
		}
		t.SetupQueue(qi, q.size, q.descA, q.availA, q.usedA)
		if qi == rxQueue {
			n.rx = q
		} else {
			n.tx = q
		}
	}
	// Every receive buffer goes to the device at once.
	for len(n.rx.free) > 0 {
		id := n.rx.free[len(n.rx.free)-1]
		n.rx.free = n.rx.free[:len(n.rx.free)-1]
		n.rx.offer(id, frameBuf, descFWrite)
	}
	t.SetStatus(statusAcknowledge | statusDriver | statusFeaturesOK | statusDriverOK)
	t.Notify(rxQueue)
	return err
}

func bitLen(x uint) int {
	n := 0
	for ; x != 0; x >>= 1 {
		n++
	}
	return n
}

// localMAC returns a random locally administered unicast address.
func localMAC() net.HardwareAddr {
	b := make([]byte, 6)
	rand.Read(b)
	b[0] = b[0]&^0x01 | 0x02
	return b
}

// MAC returns the card's Ethernet address: the device's, or a random
// locally administered one when the device has none.
func (n *NIC) MAC() net.HardwareAddr { return n.mac }

// Transmit sends one Ethernet frame (at most MaxFrame bytes). It returns
// ErrTxFull, sending nothing, when the device still holds every transmit
// buffer.
func (n *NIC) Transmit(frame []byte) error {
	if len(frame) > MaxFrame {
		return fmt.Errorf("virtio-net: frame of %d bytes exceeds %d", len(frame), MaxFrame)
	}
	n.txMu.Lock()
	defer n.txMu.Unlock()
	q := n.tx
	for {
		id, _, ok, err := q.take()
		if err != nil {
			return fmt.Errorf("virtio-net: transmit: %w", err)
		}
		if !ok {
			break
		}
		q.free = append(q.free, id)
	}
	if len(q.free) == 0 {
		return ErrTxFull
	}
	id := q.free[len(q.free)-1]
	q.free = q.free[:len(q.free)-1]
	buf := q.bufs[id]
	clear(buf[:netHdrLen])
	copy(buf[netHdrLen:], frame)
	q.offer(id, netHdrLen+len(frame), 0)
	n.t.Notify(txQueue)
	return nil
}

// Receive copies the next received frame into p (which should hold
// MaxFrame bytes; a longer frame is truncated) and returns its length, or
// ok false when none is waiting. A frame too short to carry the virtio
// header is dropped and reported as an error.
func (n *NIC) Receive(p []byte) (int, bool, error) {
	n.rxMu.Lock()
	defer n.rxMu.Unlock()
	q := n.rx
	id, length, ok, err := q.take()
	if err != nil {
		return 0, false, fmt.Errorf("virtio-net: receive: %w", err)
	}
	if !ok {
		return 0, false, nil
	}
	// The buffer goes back, then the notification: a device with no
	// buffer left holds arriving frames (QEMU's virtio-net queues them)
	// until the driver notifies the receive queue, and delivers them then
	// into the buffers it finds posted.
	defer func() {
		q.offer(id, frameBuf, descFWrite)
		n.t.Notify(rxQueue)
	}()
	if length < netHdrLen || length > frameBuf {
		return 0, false, fmt.Errorf("virtio-net: receive: device wrote %d bytes into a %d-byte buffer with a %d-byte header", length, frameBuf, netHdrLen)
	}
	return copy(p, q.bufs[id][netHdrLen:length]), true, nil
}
