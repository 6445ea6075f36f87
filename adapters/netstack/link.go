package netstack

import (
	"crypto/rand"
	"net"
	"sync"

	"github.com/captp-go/captp/internal/ether"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

const (
	// maxIPMTU is the largest MTU an IPv4 packet can use (its total
	// length field is 16 bits).
	maxIPMTU = 65535
	// minIPMTU is the smallest MTU IPv4 allows (RFC 791); IPv6 needs 1280
	// and gVisor disables IPv6 on smaller links by itself.
	minIPMTU = 68
	// minFrameSize is the smallest Ethernet frame without its FCS; shorter
	// frames (an ARP packet is 42 bytes) are padded, as real NICs do.
	minFrameSize = 60
)

// ethEndpoint is the Ethernet half shared by this package's link
// endpoints (switch ports and stream links): addressing, header handling
// and delivery into the attached stack. The embedding type moves frames.
type ethEndpoint struct {
	mu         sync.RWMutex
	dispatcher stack.NetworkDispatcher
	mac        tcpip.LinkAddress
	mtu        uint32 // IP MTU: what the stack may put in one frame's payload
	caps       stack.LinkEndpointCapabilities
	onClose    func()
}

func (e *ethEndpoint) init(mac tcpip.LinkAddress, mtu uint32, caps stack.LinkEndpointCapabilities) {
	e.mac = mac
	e.mtu = clampMTU(mtu)
	e.caps = caps | stack.CapabilityResolutionRequired // ARP and NDP
}

func clampMTU(mtu uint32) uint32 { return min(max(mtu, minIPMTU), maxIPMTU) }

// MTU implements stack.LinkEndpoint. It is the IP MTU, Ethernet header
// excluded.
func (e *ethEndpoint) MTU() uint32 {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.mtu
}

// SetMTU implements stack.LinkEndpoint; the MTU is clamped to 68-65535.
func (e *ethEndpoint) SetMTU(mtu uint32) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.mtu = clampMTU(mtu)
}

// MaxHeaderLength implements stack.LinkEndpoint.
func (*ethEndpoint) MaxHeaderLength() uint16 { return header.EthernetMinimumSize }

// LinkAddress implements stack.LinkEndpoint.
func (e *ethEndpoint) LinkAddress() tcpip.LinkAddress {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.mac
}

// SetLinkAddress implements stack.LinkEndpoint.
func (e *ethEndpoint) SetLinkAddress(mac tcpip.LinkAddress) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.mac = mac
}

// Capabilities implements stack.LinkEndpoint.
func (e *ethEndpoint) Capabilities() stack.LinkEndpointCapabilities { return e.caps }

// Attach implements stack.LinkEndpoint. A nil dispatcher detaches.
func (e *ethEndpoint) Attach(d stack.NetworkDispatcher) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.dispatcher = d
}

// IsAttached implements stack.LinkEndpoint.
func (e *ethEndpoint) IsAttached() bool {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.dispatcher != nil
}

// ARPHardwareType implements stack.LinkEndpoint.
func (*ethEndpoint) ARPHardwareType() header.ARPHardwareType { return header.ARPHardwareEther }

// AddHeader implements stack.LinkEndpoint.
func (*ethEndpoint) AddHeader(pkt *stack.PacketBuffer) { ether.AddHeader(pkt) }

// ParseHeader implements stack.LinkEndpoint.
func (*ethEndpoint) ParseHeader(pkt *stack.PacketBuffer) bool { return ether.ParseHeader(pkt) }

// SetOnCloseAction implements stack.LinkEndpoint.
func (e *ethEndpoint) SetOnCloseAction(f func()) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.onClose = f
}

// runOnClose runs the action set by SetOnCloseAction, once.
func (e *ethEndpoint) runOnClose() {
	e.mu.Lock()
	f := e.onClose
	e.onClose = nil
	e.mu.Unlock()
	if f != nil {
		f()
	}
}

// deliver hands one received Ethernet frame to the attached stack, which
// takes ownership of frame. It reports false if no stack is attached or
// the frame is shorter than an Ethernet header.
func (e *ethEndpoint) deliver(frame buffer.Buffer) bool {
	e.mu.RLock()
	d, mac := e.dispatcher, e.mac
	e.mu.RUnlock()
	if d == nil {
		frame.Release()
		return false
	}
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: frame})
	defer pkt.DecRef()
	hdr, ok := pkt.LinkHeader().Consume(header.EthernetMinimumSize)
	if !ok {
		return false
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
	return true
}

// randomMAC returns a random locally administered unicast MAC address.
func randomMAC() tcpip.LinkAddress {
	var b [6]byte
	rand.Read(b[:]) // never fails (crypto/rand panics instead)
	b[0] = b[0]&^0x01 | 0x02
	return tcpip.LinkAddress(b[:])
}

// macString formats a link address like net.HardwareAddr.
func macString(a tcpip.LinkAddress) string { return net.HardwareAddr(a).String() }
