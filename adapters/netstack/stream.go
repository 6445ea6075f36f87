package netstack

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// DefaultStreamMTU is a StreamLink's IP MTU unless StreamLinkOptions.MTU
// says otherwise: that of a QEMU guest's NIC.
const DefaultStreamMTU = 1500

// maxStreamFrame bounds an inbound frame: the largest IP packet plus an
// Ethernet header with a VLAN tag. A longer length prefix means the
// stream is not QEMU framing (or is out of step), and ends the link.
const maxStreamFrame = maxIPMTU + header.EthernetMinimumSize + 4

// StreamLinkOptions configure a StreamLink. The zero value is valid.
type StreamLinkOptions struct {
	// MTU is the IP MTU. Zero means DefaultStreamMTU. It must match the
	// guest's (frames up to 65,535 bytes of IP are accepted regardless).
	MTU uint32

	// Logger receives diagnostics; nil discards them.
	Logger *slog.Logger
}

// A StreamLink is a gVisor link endpoint that carries Ethernet frames
// over a byte stream in QEMU's -netdev stream framing: each frame is
// preceded by its length as a 4-byte big-endian number. Given the Unix
// socket of a QEMU guest's virtual NIC, it makes a Stack (see New) a
// host on the guest's Ethernet, ARP included, without root:
//
//	qemu-system-x86_64 ... -netdev stream,id=n0,server=on,addr.type=unix,addr.path=/tmp/guest.sock \
//	    -device virtio-net-pci,netdev=n0
//
//	c, _ := net.Dial("unix", "/tmp/guest.sock")
//	host, _ := netstack.New(netstack.NewStreamLink(c, nil), netstack.Config{
//		Addrs: []netip.Prefix{netip.MustParsePrefix("10.0.2.1/24")},
//	})
//	conn, _ := host.Dial(ctx, "10.0.2.15:4000", nil) // the guest's vat
//
// With server=off QEMU dials instead; accept its connection and pass that.
//
// Writing a frame blocks until the stream has taken it (the sending
// goroutine waits for the socket, which is the backpressure); nothing is
// queued in the link and nothing is dropped for lack of room. A reader
// goroutine, started when the stack attaches, delivers inbound frames;
// it ends when the stream fails or the link is closed, and Wait waits
// for it. When the stream fails (the guest went away) the link is down
// for good: Done is closed and Err says why.
//
// The reader waits too when the stack answers a frame on the spot (an
// ARP reply, a TCP reset) while the stream is full. QEMU keeps reading
// its socket, so that wait is short; two StreamLinks wired back to back,
// both saturated in both directions, could in principle wait on each
// other (TCP's own traffic is sent by other goroutines, so this needs an
// ARP or reset exchange at that very moment).
//
// A StreamLink computes checksums (the guest checks them). Frames shorter
// than 60 bytes are padded, as a hardware NIC does.
type StreamLink struct {
	ethEndpoint
	rwc io.ReadWriteCloser
	log *slog.Logger

	wmu  sync.Mutex  // one frame (batch) on the stream at a time
	bufs net.Buffers // scratch for WritePackets, under wmu
	hdrs []byte      // scratch length prefixes, under wmu

	state     sync.Mutex
	started   bool  // the reader goroutine was started
	closing   bool  // Close was called
	err       error // why the link went down
	done      chan struct{}
	closeOnce sync.Once
}

var _ stack.LinkEndpoint = (*StreamLink)(nil)

// NewStreamLink returns a link endpoint on rwc, which it owns: closing
// the link (or the Stack it is attached to) closes rwc, and rwc.Close
// must unblock a pending Read and Write (as net.Conn's does). Its MAC
// address is random and locally administered unless Config.MAC sets one.
// opts may be nil.
func NewStreamLink(rwc io.ReadWriteCloser, opts *StreamLinkOptions) *StreamLink {
	var o StreamLinkOptions
	if opts != nil {
		o = *opts
	}
	if o.MTU == 0 {
		o.MTU = DefaultStreamMTU
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	l := &StreamLink{rwc: rwc, log: o.Logger, done: make(chan struct{})}
	l.init(randomMAC(), o.MTU, 0)
	return l
}

// Attach implements stack.LinkEndpoint; the first attach starts the
// reader goroutine.
func (l *StreamLink) Attach(d stack.NetworkDispatcher) {
	l.ethEndpoint.Attach(d)
	if d == nil {
		return
	}
	l.state.Lock()
	defer l.state.Unlock()
	if l.started || l.closing {
		return
	}
	l.started = true
	go l.readLoop()
}

// readLoop delivers inbound frames until the stream fails.
func (l *StreamLink) readLoop() {
	// A frame is at most 64 KiB, so one buffer holds a whole frame and
	// reads stay large.
	r := bufio.NewReaderSize(l.rwc, 128<<10)
	var lenBuf [4]byte
	var err error
	for {
		if _, err = io.ReadFull(r, lenBuf[:]); err != nil {
			break
		}
		n := binary.BigEndian.Uint32(lenBuf[:])
		if n > maxStreamFrame {
			err = fmt.Errorf("frame length %d exceeds %d: not QEMU stream framing, or out of step", n, maxStreamFrame)
			break
		}
		if n == 0 {
			continue
		}
		v := buffer.NewViewSize(int(n))
		if _, err = io.ReadFull(r, v.AsSlice()); err != nil {
			v.Release()
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			break
		}
		if n < header.EthernetMinimumSize {
			v.Release()
			l.log.Debug("netstack: stream link: runt frame dropped", "len", n)
			continue
		}
		l.deliver(buffer.MakeWithView(v))
	}
	l.down(fmt.Errorf("netstack: stream link: reading: %w", err))
	close(l.done)
}

// down records why the link failed (the first reason wins) and closes
// the stream so that writers fail fast.
func (l *StreamLink) down(err error) {
	l.state.Lock()
	closing := l.closing
	if l.err == nil {
		if closing {
			err = fmt.Errorf("netstack: stream link %w", ErrClosed)
		}
		l.err = err
	}
	l.state.Unlock()
	if !closing {
		l.log.Info("netstack: stream link down", "err", err)
	}
	l.rwc.Close()
}

// WritePackets implements stack.LinkEndpoint. It writes all pkts in one
// go (one writev on a socket) and blocks until the stream has taken them.
func (l *StreamLink) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	var pad [minFrameSize]byte
	l.wmu.Lock()
	defer l.wmu.Unlock()
	if l.Err() != nil {
		return 0, &tcpip.ErrClosedForSend{}
	}
	list := pkts.AsSlice()
	if cap(l.hdrs) < 4*len(list) {
		l.hdrs = make([]byte, 4*len(list))
	}
	hdrs := l.hdrs[:4*len(list)]
	bufs := l.bufs[:0]
	for i, pkt := range list {
		size := pkt.Size()
		h := hdrs[4*i : 4*i+4]
		binary.BigEndian.PutUint32(h, uint32(max(size, minFrameSize)))
		bufs = append(bufs, h)
		bufs = append(bufs, pkt.AsSlices()...)
		if size < minFrameSize {
			bufs = append(bufs, pad[:minFrameSize-size])
		}
	}
	l.bufs = bufs // keep the backing array; WriteTo consumes its copy
	_, err := bufs.WriteTo(l.rwc)
	clear(l.bufs[:cap(l.bufs)]) // let the packets' storage go
	if err != nil {
		l.down(fmt.Errorf("netstack: stream link: writing: %w", err))
		return 0, &tcpip.ErrClosedForSend{}
	}
	return len(list), nil
}

// Close implements stack.LinkEndpoint: it closes the stream, which ends
// the reader goroutine.
func (l *StreamLink) Close() {
	l.runOnClose()
	l.stop()
}

// stop closes the stream without the close action: Stack.Close calls it
// before gVisor's Stack.Wait, which waits for the reader.
func (l *StreamLink) stop() {
	l.closeOnce.Do(func() {
		l.state.Lock()
		l.closing = true
		started := l.started
		l.state.Unlock()
		l.down(nil)
		if !started {
			close(l.done)
		}
	})
}

// Wait implements stack.LinkEndpoint: it waits for the reader goroutine
// to end (after Close, or after the stream failed).
func (l *StreamLink) Wait() {
	l.state.Lock()
	started := l.started
	l.state.Unlock()
	if started {
		<-l.done
	}
}

// Done is closed when the link is down: the stream failed or the link
// was closed.
func (l *StreamLink) Done() <-chan struct{} { return l.done }

// Err reports why the link is down (wrapping ErrClosed after Close), or
// nil while it is up.
func (l *StreamLink) Err() error {
	l.state.Lock()
	defer l.state.Unlock()
	return l.err
}
