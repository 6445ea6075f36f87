package tamago

import (
	"bytes"
	"encoding/binary"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

func newTestNIC(t *testing.T, dev *fakeNet, opts *NICOptions) *NIC {
	t.Helper()
	n, err := NewNIC(dev, dev.mem, opts)
	if err != nil {
		t.Fatalf("NewNIC: %v", err)
	}
	return n
}

func TestNICInit(t *testing.T) {
	dev := newFakeNet(newFakeMemory())
	n := newTestNIC(t, dev, nil)
	if got, want := n.MAC().String(), "52:54:00:12:34:56"; got != want {
		t.Errorf("MAC = %s, want %s (from the device's configuration)", got, want)
	}
	if want := uint32(statusAcknowledge | statusDriver | statusFeaturesOK | statusDriverOK); dev.Status() != want {
		t.Errorf("status = %#x, want %#x", dev.Status(), want)
	}
	if dev.driver != featVersion1|featNetMAC|featNetStatus {
		t.Errorf("driver features = %#x", dev.driver)
	}
	for i, q := range dev.queues {
		if !q.ready || q.size != 64 {
			t.Errorf("queue %d: ready %v size %d, want ready, 64", i, q.ready, q.size)
		}
	}
	// Every receive buffer is offered at once: 64 frames land, and the
	// device holds the 65th.
	for range 64 {
		dev.inject([]byte("0123456789abcdef"))
	}
	dev.inject([]byte("one too many"))
	if held, dropped := dev.counts(); held != 1 || dropped != 0 {
		t.Errorf("device holds %d frames and dropped %d with 64 receive buffers for 65, want 1 held, none dropped", held, dropped)
	}
	if errs := dev.errors(); len(errs) > 0 {
		t.Errorf("device errors: %v", errs)
	}
}

func TestNICInitFailures(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup func(d *fakeNet)
		want  string
	}{
		{"legacy", func(d *fakeNet) { d.features &^= featVersion1 }, "VIRTIO_F_VERSION_1"},
		{"refused", func(d *fakeNet) { d.refuse = true }, "refused features"},
		{"no queues", func(d *fakeNet) { d.maxQueue = 0 }, "queue 0 is not available"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev := newFakeNet(newFakeMemory())
			tc.setup(dev)
			_, err := NewNIC(dev, dev.mem, nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("NewNIC: %v, want an error about %q", err, tc.want)
			}
			if dev.Status()&statusFailed == 0 {
				t.Errorf("status %#x: FAILED not set", dev.Status())
			}
		})
	}
}

func TestNICNoMACAndSmallQueues(t *testing.T) {
	dev := newFakeNet(newFakeMemory())
	dev.features &^= featNetMAC
	dev.maxQueue = 48 // not a power of two: the driver rounds down
	n := newTestNIC(t, dev, nil)
	if mac := n.MAC(); len(mac) != 6 || mac[0]&0x02 == 0 || mac[0]&0x01 != 0 {
		t.Errorf("MAC %s: want a locally administered unicast address", mac)
	}
	if dev.queues[0].size != 32 {
		t.Errorf("queue size %d, want 32", dev.queues[0].size)
	}
}

func TestNICTransmitReceive(t *testing.T) {
	dev := newFakeNet(newFakeMemory())
	var mu sync.Mutex
	var sent [][]byte
	dev.out = func(f []byte) {
		mu.Lock()
		sent = append(sent, f)
		mu.Unlock()
	}
	n := newTestNIC(t, dev, &NICOptions{QueueSize: 8})
	// More frames than buffers: descriptors are recycled.
	for i := range 40 {
		f := bytes.Repeat([]byte{byte(i)}, 60+i)
		if err := n.Transmit(f); err != nil {
			t.Fatalf("Transmit %d: %v", i, err)
		}
	}
	if len(sent) != 40 {
		t.Fatalf("device got %d frames, want 40", len(sent))
	}
	for i, f := range sent {
		if len(f) != 60+i || f[0] != byte(i) {
			t.Errorf("frame %d: %d bytes starting %d", i, len(f), f[0])
		}
	}
	for _, h := range dev.hdrs {
		if !bytes.Equal(h, make([]byte, netHdrLen)) {
			t.Errorf("virtio-net header %x, want zeros (no offloads)", h)
		}
	}
	if err := n.Transmit(make([]byte, MaxFrame+1)); err == nil {
		t.Error("Transmit accepted an oversized frame")
	}

	buf := make([]byte, MaxFrame)
	if _, ok, err := n.Receive(buf); ok || err != nil {
		t.Fatalf("Receive on an empty queue: %v, %v", ok, err)
	}
	for i := range 20 { // more than the 8 receive buffers: they are re-offered
		want := bytes.Repeat([]byte{byte(i)}, 100+i)
		dev.inject(want)
		m, ok, err := n.Receive(buf)
		if !ok || err != nil || !bytes.Equal(buf[:m], want) {
			t.Fatalf("Receive %d: %d bytes, %v, %v", i, m, ok, err)
		}
	}
	if dev.dropped != 0 {
		t.Errorf("device dropped %d frames", dev.dropped)
	}
	if errs := dev.errors(); len(errs) > 0 {
		t.Errorf("device errors: %v", errs)
	}
}

// Frames that arrive while every receive buffer is full wait in the
// device (QEMU's virtio-net holds them in its net queue) until the driver
// posts buffers again and notifies the receive queue: Receive must do
// both, in that order, or the frames stay in the device. With the fake
// device dropping them instead, as it did, TCP over the link lost whole
// bursts and TestLinkCapTP took seconds, or a minute, to recover.
func TestNICReceiveHeldFrames(t *testing.T) {
	dev := newFakeNet(newFakeMemory())
	n := newTestNIC(t, dev, &NICOptions{QueueSize: 8})
	const frames = 30 // eight land in the buffers, the rest wait
	for i := range frames {
		dev.inject(bytes.Repeat([]byte{byte(i)}, 60+i))
	}
	if held, dropped := dev.counts(); held != frames-8 || dropped != 0 {
		t.Fatalf("device holds %d frames and dropped %d, want %d held, none dropped", held, dropped, frames-8)
	}
	buf := make([]byte, MaxFrame)
	for i := range frames {
		m, ok, err := n.Receive(buf)
		if !ok || err != nil {
			held, _ := dev.counts()
			t.Fatalf("Receive %d: ok %v, err %v, with %d frames held in the device (the driver did not post a buffer and notify the receive queue)", i, ok, err, held)
		}
		if m != 60+i || buf[0] != byte(i) {
			t.Fatalf("Receive %d: %d bytes starting %d, want %d bytes of %d (out of order)", i, m, buf[0], 60+i, i)
		}
		// The buffer went straight back, and the notification after it
		// let the device fill it with the next held frame.
		if held, _ := dev.counts(); held != max(0, frames-8-(i+1)) {
			t.Fatalf("after Receive %d the device holds %d frames, want %d (the buffer was not posted before the notification)", i, held, max(0, frames-8-(i+1)))
		}
	}
	if _, ok, err := n.Receive(buf); ok || err != nil {
		t.Errorf("Receive after the last frame: ok %v, err %v", ok, err)
	}

	// Beyond maxHeld held frames the device drops.
	dev.maxHeld = 2
	for range 8 + 3 {
		dev.inject(make([]byte, 60))
	}
	if held, dropped := dev.counts(); held != 2 || dropped != 1 {
		t.Errorf("device holds %d frames and dropped %d, want 2 held, 1 dropped", held, dropped)
	}
	if errs := dev.errors(); len(errs) > 0 {
		t.Errorf("device errors: %v", errs)
	}
}

func TestNICTxFull(t *testing.T) {
	dev := newFakeNet(newFakeMemory())
	dev.stallTx = true
	n := newTestNIC(t, dev, &NICOptions{QueueSize: 4})
	for i := range 4 {
		if err := n.Transmit(make([]byte, 60)); err != nil {
			t.Fatalf("Transmit %d: %v", i, err)
		}
	}
	if err := n.Transmit(make([]byte, 60)); !errors.Is(err, ErrTxFull) {
		t.Fatalf("Transmit with every buffer held: %v, want ErrTxFull", err)
	}
	dev.mu.Lock()
	dev.stallTx = false
	dev.mu.Unlock()
	dev.Notify(txQueue) // the device catches up
	if err := n.Transmit(make([]byte, 60)); err != nil {
		t.Fatalf("Transmit after the device caught up: %v", err)
	}
}

// A device that writes nonsense into the used ring gets errors, not
// panics, and the driver does not touch memory it does not own.
func TestNICHostileDevice(t *testing.T) {
	for _, tc := range []struct {
		name    string
		id, n   uint32
		advance uint16
		want    string
	}{
		{"bad id", 9999, 100, 1, "does not hold"},
		{"index jump", 0, 100, 1000, "ahead"},
		{"short", 0, 3, 1, "header"},
		{"long", 0, 1 << 20, 1, "header"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev := newFakeNet(newFakeMemory())
			n := newTestNIC(t, dev, &NICOptions{QueueSize: 8})
			dev.raw(tc.id, tc.n, tc.advance)
			_, ok, err := n.Receive(make([]byte, MaxFrame))
			if ok || err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Receive: ok %v, err %v; want an error about %q", ok, err, tc.want)
			}
		})
	}
	t.Run("not offered", func(t *testing.T) {
		// A transmit queue with one buffer in flight; the device returns
		// another.
		mem := newFakeMemory()
		q, err := newVirtq(mem, 4, 64)
		if err != nil {
			t.Fatal(err)
		}
		q.offer(1, 10, 0)
		binary.LittleEndian.PutUint32(q.used[ringHdr:], 2)
		atomic.StoreUint32(word(q.used, 0), 1<<16)
		if _, _, _, err := q.take(); err == nil || !strings.Contains(err.Error(), "does not hold") {
			t.Fatalf("take: %v, want an error about a descriptor the device does not hold", err)
		}
	})
}
