package netstack

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// DefaultNetworkMTU is the IP MTU of a Network's links unless
// NetworkOptions.MTU says otherwise: the largest an IPv4 packet can be.
// In-process links cost per packet, not per byte, so large packets are
// much faster (about 10× over 1,500 bytes for bulk transfers).
const DefaultNetworkMTU = maxIPMTU

// DefaultNetworkPrefix is the subnet from which Network.NewStack assigns
// addresses when NetworkOptions.Prefix is not set.
var DefaultNetworkPrefix = netip.MustParsePrefix("10.0.0.0/16")

// ErrClosed is wrapped by the errors of operations on a closed Network or
// Stack.
var ErrClosed = errors.New("closed")

// NetworkOptions configure a Network. The zero value is valid.
type NetworkOptions struct {
	// MTU is the IP MTU of every link on the network. Zero means
	// DefaultNetworkMTU.
	MTU uint32

	// Prefix is the IPv4 or IPv6 subnet that NewStack assigns addresses
	// from (host 1, 2, 3, ...) to stacks configured without any. Zero
	// means DefaultNetworkPrefix.
	Prefix netip.Prefix

	// Logger receives diagnostics; nil discards them. Stacks made by
	// NewStack use it unless their Config has a Logger.
	Logger *slog.Logger
}

// A Network is an in-process virtual Ethernet switch: every Stack made by
// NewStack (or stack built on a link from NewLink) gets a port with its own
// MAC address, and frames go from port to port without leaving the
// process. It is meant for tests, demos and groups of vats in one process.
//
// A frame is delivered synchronously, by the goroutine that sends it, into
// the receiving stack (which queues it for its TCP processor and returns).
// There is no queue in the switch, so no frame is ever dropped for lack of
// room: a fast sender is slowed down by doing the receiver's inbound work,
// and TCP's windows bound the rest. Frames for a MAC address that no port
// has are dropped and counted in NetworkStats.Undeliverable.
//
// Links skip checksums (offloaded, in gVisor's terms): frames cannot be
// corrupted in memory.
//
// A Network has no goroutines of its own. Close closes every Stack made by
// NewStack.
type Network struct {
	mtu    uint32
	prefix netip.Prefix
	log    *slog.Logger

	mu       sync.RWMutex
	closed   bool
	ports    []*port                     // in creation order; broadcast goes to all
	byMAC    map[tcpip.LinkAddress]*port // unicast forwarding table
	stacks   map[*Stack]struct{}         // made by NewStack, closed by Close
	nextPort uint32                      // numbers ports, and their default MACs
	nextHost netip.Addr                  // next address NewStack assigns

	frames, bytes, broadcasts, undeliverable atomic.Uint64
}

// NetworkStats counts the frames a Network has switched.
type NetworkStats struct {
	// Frames and Bytes count frames sent into the switch and their bytes
	// (Ethernet header included).
	Frames, Bytes uint64
	// Broadcasts counts broadcast and multicast frames (ARP requests,
	// IPv6 neighbor discovery), delivered to every other port.
	Broadcasts uint64
	// Undeliverable counts unicast frames for a MAC address no port has,
	// or for a port whose stack is gone: the only frames a Network drops.
	Undeliverable uint64
}

// NewNetwork returns an empty network. opts may be nil.
func NewNetwork(opts *NetworkOptions) *Network {
	var o NetworkOptions
	if opts != nil {
		o = *opts
	}
	if o.MTU == 0 {
		o.MTU = DefaultNetworkMTU
	}
	if !o.Prefix.IsValid() {
		o.Prefix = DefaultNetworkPrefix
	}
	o.Prefix = o.Prefix.Masked()
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return &Network{
		mtu:      clampMTU(o.MTU),
		prefix:   o.Prefix,
		log:      o.Logger,
		byMAC:    make(map[tcpip.LinkAddress]*port),
		stacks:   make(map[*Stack]struct{}),
		nextHost: o.Prefix.Addr().Next(),
	}
}

// NewStack creates a Stack with a new port on the network.
//
// Zero fields of cfg take network defaults: MAC a locally administered
// address numbered after the port (02:ca:70:00:00:01, ...), Addrs the
// next free address of NetworkOptions.Prefix, MTU the network's, Logger
// the network's. Explicit addresses are not checked against the ones
// NewStack assigns; do not mix both in one prefix.
func (n *Network) NewStack(cfg Config) (*Stack, error) {
	if cfg.MAC != nil && len(cfg.MAC) != 6 {
		return nil, fmt.Errorf("netstack: new stack: MAC %v is not 6 bytes long", cfg.MAC)
	}
	p, err := n.newPort(tcpip.LinkAddress(cfg.MAC))
	if err != nil {
		return nil, fmt.Errorf("netstack: new stack: %w", err)
	}
	if len(cfg.Addrs) == 0 {
		n.mu.Lock()
		a := n.nextHost
		if !n.prefix.Contains(a) || (a.Is4() && !n.prefix.Contains(a.Next())) {
			n.mu.Unlock()
			p.Close()
			return nil, fmt.Errorf("netstack: new stack: no free address left in %v", n.prefix)
		}
		n.nextHost = a.Next()
		n.mu.Unlock()
		cfg.Addrs = []netip.Prefix{netip.PrefixFrom(a, n.prefix.Bits())}
	}
	if cfg.Logger == nil {
		cfg.Logger = n.log
	}
	s, err := New(p, cfg)
	if err != nil {
		return nil, err // New closed p
	}
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		s.Close()
		return nil, fmt.Errorf("netstack: new stack: network %w", ErrClosed)
	}
	n.stacks[s] = struct{}{}
	n.mu.Unlock()
	s.mu.Lock()
	s.onClose = func() {
		n.mu.Lock()
		delete(n.stacks, s)
		n.mu.Unlock()
	}
	s.mu.Unlock()
	return s, nil
}

// NewLink returns a new port of the network as a gVisor link endpoint,
// for callers that build their own stack.Stack (or pass it to New). mac
// nil means a generated address. The port leaves the network when the
// endpoint is closed (when its NIC is removed from its stack).
func (n *Network) NewLink(mac []byte) (stack.LinkEndpoint, error) {
	if mac != nil && len(mac) != 6 {
		return nil, fmt.Errorf("netstack: new link: MAC %x is not 6 bytes long", mac)
	}
	p, err := n.newPort(tcpip.LinkAddress(mac))
	if err != nil {
		return nil, fmt.Errorf("netstack: new link: %w", err)
	}
	return p, nil
}

func (n *Network) newPort(mac tcpip.LinkAddress) (*port, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return nil, fmt.Errorf("network %w", ErrClosed)
	}
	n.nextPort++
	if mac == "" {
		i := n.nextPort
		mac = tcpip.LinkAddress([]byte{0x02, 0xca, 0x70, byte(i >> 16), byte(i >> 8), byte(i)})
	}
	if _, dup := n.byMAC[mac]; dup {
		return nil, fmt.Errorf("MAC address %s is already on the network", macString(mac))
	}
	p := &port{net: n}
	p.init(mac, n.mtu, stack.CapabilityTXChecksumOffload|stack.CapabilityRXChecksumOffload)
	n.ports = append(n.ports, p)
	n.byMAC[mac] = p
	return p, nil
}

// Close closes every Stack made by NewStack and refuses new ones. Ports
// from NewLink stay until their stacks close them. Close waits for the
// stacks to finish closing; closing twice is harmless.
func (n *Network) Close() error {
	n.mu.Lock()
	n.closed = true
	stacks := make([]*Stack, 0, len(n.stacks))
	for s := range n.stacks {
		stacks = append(stacks, s)
	}
	n.mu.Unlock()
	var errs []error
	for _, s := range stacks {
		if err := s.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Stats returns the network's frame counters.
func (n *Network) Stats() NetworkStats {
	return NetworkStats{
		Frames:        n.frames.Load(),
		Bytes:         n.bytes.Load(),
		Broadcasts:    n.broadcasts.Load(),
		Undeliverable: n.undeliverable.Load(),
	}
}

// forward switches one frame sent by src.
func (n *Network) forward(src *port, pkt *stack.PacketBuffer) {
	n.frames.Add(1)
	n.bytes.Add(uint64(pkt.Size()))
	eth := header.Ethernet(pkt.LinkHeader().Slice())
	if len(eth) < header.EthernetMinimumSize {
		n.undeliverable.Add(1) // never happens: AddHeader pushed it
		return
	}
	dst := eth.DestinationAddress()
	if !header.IsMulticastEthernetAddress(dst) && dst != header.EthernetBroadcastAddress {
		n.mu.RLock()
		p := n.byMAC[dst]
		n.mu.RUnlock()
		// ToBuffer shares the packet's storage (reference counted); the
		// sender's packet and the receiver's are both read-only from here.
		if p == nil || p == src || !p.deliver(pkt.ToBuffer()) {
			n.undeliverable.Add(1)
		}
		return
	}
	n.broadcasts.Add(1)
	n.mu.RLock()
	ports := n.ports
	n.mu.RUnlock()
	for _, p := range ports {
		if p != src {
			p.deliver(pkt.ToBuffer())
		}
	}
}

// remove takes p off the network.
func (n *Network) remove(p *port) {
	mac := p.LinkAddress()
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.byMAC[mac] == p {
		delete(n.byMAC, mac)
	}
	// Copy on write: forward iterates over the old slice without a lock.
	ports := make([]*port, 0, len(n.ports))
	for _, q := range n.ports {
		if q != p {
			ports = append(ports, q)
		}
	}
	n.ports = ports
}

// rename moves p's forwarding entry from old to mac.
func (n *Network) rename(p *port, old, mac tcpip.LinkAddress) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	if q, dup := n.byMAC[mac]; dup && q != p {
		return false
	}
	if n.byMAC[old] == p {
		delete(n.byMAC, old)
	}
	n.byMAC[mac] = p
	return true
}

// port is one switch port: the link endpoint of one stack's NIC.
type port struct {
	ethEndpoint
	net       *Network
	closeOnce sync.Once
	closed    atomic.Bool
}

var _ stack.LinkEndpoint = (*port)(nil)

// SetLinkAddress implements stack.LinkEndpoint. A MAC address already on
// the network is refused (logged, the old one kept): two ports with one
// address would steal each other's frames.
func (p *port) SetLinkAddress(mac tcpip.LinkAddress) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if mac == p.mac {
		return
	}
	if !p.net.rename(p, p.mac, mac) {
		p.net.log.Warn("netstack: MAC address already on the network; keeping the old one",
			"mac", macString(mac), "kept", macString(p.mac))
		return
	}
	p.mac = mac
}

// WritePackets implements stack.LinkEndpoint: it delivers every packet
// before returning.
func (p *port) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	if p.closed.Load() {
		return 0, &tcpip.ErrClosedForSend{}
	}
	for _, pkt := range pkts.AsSlice() {
		p.net.forward(p, pkt)
	}
	return pkts.Len(), nil
}

// Close implements stack.LinkEndpoint: the port leaves the network.
func (p *port) Close() {
	p.runOnClose()
	p.stop()
}

// stop takes the port off the network without the close action.
func (p *port) stop() {
	p.closeOnce.Do(func() {
		p.closed.Store(true)
		p.Attach(nil)
		p.net.remove(p)
	})
}

// Wait implements stack.LinkEndpoint. A port has no goroutines.
func (*port) Wait() {}
