//go:build tamago && amd64

package tamago

import (
	"fmt"

	"github.com/usbarmory/tamago/dma"
	"github.com/usbarmory/tamago/kvm/virtio"
)

// MMIO is the virtio-mmio transport (virtio 1.2, 4.2.2) of a device at a
// physical address, as on QEMU's microvm. Register offsets come from
// tamago's kvm/virtio; the queue set-up is ours because tamago's
// VirtualQueue is tied to its own ring bookkeeping.
type MMIO struct {
	base uintptr
}

// NewMMIO returns the transport of the virtio-mmio device at base, or an
// error if no modern (version 2) device answers there.
func NewMMIO(base uintptr) (*MMIO, error) {
	m := &MMIO{base: base}
	if v := m.read(virtio.Magic); v != virtio.MAGIC {
		return nil, fmt.Errorf("virtio-mmio at %#x: magic %#x", base, v)
	}
	if v := m.read(virtio.Version); v != virtio.VERSION {
		return nil, fmt.Errorf("virtio-mmio at %#x: version %d, want 2 (QEMU: -global virtio-mmio.force-legacy=false)", base, v)
	}
	return m, nil
}

// defined in mmio_amd64.s
func mmioRead32(addr uintptr) uint32
func mmioWrite32(addr uintptr, val uint32)
func mmioRead8(addr uintptr) uint8

func (m *MMIO) read(off uintptr) uint32     { return mmioRead32(m.base + off) }
func (m *MMIO) write(off uintptr, v uint32) { mmioWrite32(m.base+off, v) }

// DeviceID implements Transport; 0 means an empty slot.
func (m *MMIO) DeviceID() uint32 { return m.read(virtio.DeviceID) }

// DeviceFeatures implements Transport.
func (m *MMIO) DeviceFeatures() (f uint64) {
	for i := range uint32(2) {
		m.write(virtio.DeviceFeaturesSel, i)
		f |= uint64(m.read(virtio.DeviceFeatures)) << (32 * i)
	}
	return f
}

// SetDriverFeatures implements Transport.
func (m *MMIO) SetDriverFeatures(f uint64) {
	for i := range uint32(2) {
		m.write(virtio.DriverFeaturesSel, i)
		m.write(virtio.DriverFeatures, uint32(f>>(32*i)))
	}
}

// Status implements Transport.
func (m *MMIO) Status() uint32 { return m.read(virtio.Status) }

// SetStatus implements Transport.
func (m *MMIO) SetStatus(s uint32) { m.write(virtio.Status, s) }

// ReadConfig implements Transport, a byte at a time (the configuration
// space is little-endian and byte-addressable on virtio-mmio).
func (m *MMIO) ReadConfig(off int, p []byte) {
	for i := range p {
		p[i] = mmioRead8(m.base + virtio.Config + uintptr(off+i))
	}
}

// MaxQueueSize implements Transport.
func (m *MMIO) MaxQueueSize(q int) int {
	m.write(virtio.QueueSel, uint32(q))
	return int(m.read(virtio.QueueNumMax))
}

// SetupQueue implements Transport.
func (m *MMIO) SetupQueue(q int, size uint16, desc, avail, used uint64) {
	m.write(virtio.QueueSel, uint32(q))
	m.write(virtio.QueueNum, uint32(size))
	for _, r := range []struct {
		off  uintptr
		addr uint64
	}{{virtio.QueueDesc, desc}, {virtio.QueueDriver, avail}, {virtio.QueueDevice, used}} {
		m.write(r.off, uint32(r.addr))
		m.write(r.off+4, uint32(r.addr>>32))
	}
	m.write(virtio.QueueReady, 1)
}

// Notify implements Transport.
func (m *MMIO) Notify(q int) { m.write(virtio.QueueNotify, uint32(q)) }

// DMA is a Memory in the board's DMA region (tamago's dma package, set up
// by the board with dma.Init). The region is identity-mapped and
// coherent on amd64.
type DMA struct{}

// Alloc implements Memory. The memory is never released: queues live as
// long as the machine.
func (DMA) Alloc(size, align int) (uint64, []byte, error) {
	addr, buf := dma.Reserve(size, align)
	if buf == nil {
		return 0, nil, fmt.Errorf("dma: cannot reserve %d bytes", size)
	}
	clear(buf)
	return uint64(addr), buf, nil
}
