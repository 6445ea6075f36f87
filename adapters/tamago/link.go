package tamago

import (
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/captp-go/captp/internal/ether"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// FrameDevice is an Ethernet card that Link drives by polling. NIC
// implements it.
type FrameDevice interface {
	// Transmit sends one frame, or returns ErrTxFull when the card has no
	// room right now.
	Transmit(frame []byte) error
	// Receive copies the next frame into p, or reports ok false when none
	// is waiting.
	Receive(p []byte) (n int, ok bool, err error)
}

// LinkOptions configure a Link. The zero value is valid.
type LinkOptions struct {
	// MinSleep and MaxSleep bound the receive loop's sleep while no
	// frame arrives: it doubles after each empty poll from MinSleep to
	// MaxSleep and returns to MinSleep when a frame arrives. Zero means
	// 50µs and 2ms.
	MinSleep, MaxSleep time.Duration
	// Logger receives diagnostics; nil discards them.
	Logger *slog.Logger
}

// minFrame is the shortest Ethernet frame without FCS; shorter ones (ARP)
// are padded as hardware does.
const minFrame = 60

// A Link is a gVisor link endpoint (Ethernet, MTU 1500) on a polled
// FrameDevice: give it to adapters/netstack.New for a TCP/IP stack on a
// virtio-net card.
//
// A goroutine started by the first Attach polls the device and delivers
// frames; with nothing arriving it sleeps between polls as LinkOptions
// say (a polled card has no interrupt to wait for). It ends on Close or
// on Wait, which gVisor calls when its stack is torn down. Transmitting
// waits, with the same back-off, up to one second for a free buffer and
// then drops the frame (TCP retransmits).
type Link struct {
	dev  FrameDevice
	mac  tcpip.LinkAddress
	opts LinkOptions
	log  *slog.Logger

	mu         sync.RWMutex
	dispatcher stack.NetworkDispatcher
	mtu        uint32

	txMu  sync.Mutex
	txBuf []byte

	state    sync.Mutex
	started  bool
	stopOnce sync.Once
	stop     chan struct{}
	done     chan struct{}
}

// NewLink returns a link on dev whose Ethernet address is mac; opts may
// be nil.
func NewLink(dev FrameDevice, mac []byte, opts *LinkOptions) *Link {
	l := &Link{dev: dev, mac: tcpip.LinkAddress(mac), mtu: MaxFrame - header.EthernetMinimumSize,
		stop: make(chan struct{}), done: make(chan struct{}), txBuf: make([]byte, 0, MaxFrame)}
	if opts != nil {
		l.opts = *opts
	}
	if l.opts.MinSleep <= 0 {
		l.opts.MinSleep = 50 * time.Microsecond
	}
	if l.opts.MaxSleep < l.opts.MinSleep {
		l.opts.MaxSleep = max(2*time.Millisecond, l.opts.MinSleep)
	}
	l.log = l.opts.Logger
	if l.log == nil {
		l.log = slog.New(slog.DiscardHandler)
	}
	return l
}

// MTU implements stack.LinkEndpoint.
func (l *Link) MTU() uint32 {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.mtu
}

// SetMTU implements stack.LinkEndpoint; the MTU stays within 68-1500.
func (l *Link) SetMTU(mtu uint32) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.mtu = min(max(mtu, 68), MaxFrame-header.EthernetMinimumSize)
}

// MaxHeaderLength implements stack.LinkEndpoint.
func (*Link) MaxHeaderLength() uint16 { return header.EthernetMinimumSize }

// LinkAddress implements stack.LinkEndpoint.
func (l *Link) LinkAddress() tcpip.LinkAddress {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.mac
}

// SetLinkAddress implements stack.LinkEndpoint.
func (l *Link) SetLinkAddress(mac tcpip.LinkAddress) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.mac = mac
}

// Capabilities implements stack.LinkEndpoint: ARP is needed, and the
// stack computes checksums (no offloads are negotiated).
func (*Link) Capabilities() stack.LinkEndpointCapabilities {
	return stack.CapabilityResolutionRequired
}

// ARPHardwareType implements stack.LinkEndpoint.
func (*Link) ARPHardwareType() header.ARPHardwareType { return header.ARPHardwareEther }

// AddHeader implements stack.LinkEndpoint.
func (*Link) AddHeader(pkt *stack.PacketBuffer) { ether.AddHeader(pkt) }

// ParseHeader implements stack.LinkEndpoint.
func (*Link) ParseHeader(pkt *stack.PacketBuffer) bool { return ether.ParseHeader(pkt) }

// SetOnCloseAction implements stack.LinkEndpoint. The link never closes
// by itself (a card does not go away), so the action is never needed.
func (*Link) SetOnCloseAction(func()) {}

// Attach implements stack.LinkEndpoint; the first attach starts the
// receive loop.
func (l *Link) Attach(d stack.NetworkDispatcher) {
	l.mu.Lock()
	l.dispatcher = d
	l.mu.Unlock()
	if d == nil {
		return
	}
	l.state.Lock()
	defer l.state.Unlock()
	if l.started {
		return
	}
	l.started = true
	select {
	case <-l.stop:
		close(l.done)
	default:
		go l.receiveLoop()
	}
}

// IsAttached implements stack.LinkEndpoint.
func (l *Link) IsAttached() bool {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.dispatcher != nil
}

// Close implements stack.LinkEndpoint: it stops the receive loop.
func (l *Link) Close() {
	l.stopOnce.Do(func() { close(l.stop) })
}

// Stop ends the receive loop, like Close, and marks the Link as a
// netstack.Stopper: netstack's Stack.Close then stops it and waits for
// the packet it may be delivering before gVisor's Wait, which holds the
// stack's lock that the delivery needs.
func (l *Link) Stop() { l.Close() }

// Wait implements stack.LinkEndpoint. gVisor calls it when its stack is
// torn down, before Close, so it stops the receive loop too and waits for
// it.
func (l *Link) Wait() {
	l.Close()
	l.state.Lock()
	started := l.started
	l.state.Unlock()
	if started {
		<-l.done
	}
}

func (l *Link) receiveLoop() {
	defer close(l.done)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	sleep := l.opts.MinSleep
	rxErrors := 0
	for {
		select {
		case <-l.stop:
			return
		default:
		}
		v := buffer.NewViewSize(MaxFrame)
		n, ok, err := l.dev.Receive(v.AsSlice())
		if err != nil {
			// A confused device: poll on, and log the first error and
			// then one in a thousand.
			if rxErrors%1000 == 0 {
				l.log.Warn("tamago: link: receive", "err", err, "errors", rxErrors+1)
			}
			rxErrors++
		}
		if err != nil || !ok {
			v.Release()
			timer.Reset(sleep)
			select {
			case <-l.stop:
				return
			case <-timer.C:
			}
			sleep = min(2*sleep, l.opts.MaxSleep)
			continue
		}
		sleep = l.opts.MinSleep
		if n < header.EthernetMinimumSize {
			v.Release()
			continue
		}
		v.CapLength(n)
		l.deliver(buffer.MakeWithView(v))
	}
}

// deliver hands one frame to the attached stack, which takes it.
func (l *Link) deliver(frame buffer.Buffer) {
	l.mu.RLock()
	d, mac := l.dispatcher, l.mac
	l.mu.RUnlock()
	if d == nil {
		frame.Release()
		return
	}
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: frame})
	defer pkt.DecRef()
	hdr, ok := pkt.LinkHeader().Consume(header.EthernetMinimumSize)
	if !ok {
		return
	}
	eth := header.Ethernet(hdr)
	switch dst := eth.DestinationAddress(); {
	case dst == header.EthernetBroadcastAddress:
		pkt.PktType = tcpip.PacketBroadcast
	case header.IsMulticastEthernetAddress(dst):
		pkt.PktType = tcpip.PacketMulticast
	case dst == mac:
		pkt.PktType = tcpip.PacketHost
	default:
		pkt.PktType = tcpip.PacketOtherHost
	}
	d.DeliverNetworkPacket(eth.Type(), pkt)
}

// WritePackets implements stack.LinkEndpoint: each packet becomes one
// frame, padded to 60 bytes.
func (l *Link) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	l.txMu.Lock()
	defer l.txMu.Unlock()
	sent := 0
	for _, pkt := range pkts.AsSlice() {
		select {
		case <-l.stop:
			return sent, &tcpip.ErrClosedForSend{}
		default:
		}
		f := l.txBuf[:0]
		for _, s := range pkt.AsSlices() {
			f = append(f, s...)
		}
		if len(f) > MaxFrame {
			l.log.Warn("tamago: link: oversized frame dropped", "len", len(f))
			sent++
			continue
		}
		for len(f) < minFrame {
			f = append(f, 0)
		}
		if err := l.transmit(f); err != nil {
			if errors.Is(err, errStopped) {
				return sent, &tcpip.ErrClosedForSend{}
			}
			l.log.Warn("tamago: link: frame dropped", "err", err)
		}
		sent++
	}
	return sent, nil
}

var errStopped = errors.New("tamago: link closed")

// txRetry bounds how long Link waits for a transmit buffer.
const txRetry = time.Second

// transmit sends f, waiting with back-off while the card is full.
func (l *Link) transmit(f []byte) error {
	sleep, waited := l.opts.MinSleep, time.Duration(0)
	for {
		err := l.dev.Transmit(f)
		if !errors.Is(err, ErrTxFull) {
			return err
		}
		if waited >= txRetry {
			return err
		}
		t := time.NewTimer(sleep)
		select {
		case <-l.stop:
			t.Stop()
			return errStopped
		case <-t.C:
		}
		waited += sleep
		sleep = min(2*sleep, l.opts.MaxSleep)
	}
}
