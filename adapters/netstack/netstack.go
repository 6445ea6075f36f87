// Package netstack connects captp vats over gVisor's userspace TCP/IP
// stack (gvisor.dev/gvisor/pkg/tcpip), without touching the host network.
//
// It is a thin adapter, like adapters/unix: a Stack turns addresses into
// TCP byte streams and hands each to core.NewConn. All protocol logic
// lives in the core. What it adds is the network underneath:
//
//   - Network, an in-process virtual Ethernet switch: any number of
//     stacks, each vat with its own address, for tests, demos and groups
//     of vats in one process;
//   - StreamLink, a link endpoint speaking QEMU's -netdev stream framing
//     over a byte stream (a Unix socket), so that a host process is a TCP
//     peer of a QEMU guest without root;
//   - Switch, a learning Ethernet switch joining QEMU guests' -netdev
//     stream links and host stacks into one segment (captp host's group
//     of guests), with bounded per-port queues and frame counters;
//   - New, for a stack on any other gVisor link endpoint.
//
// A vat on a virtual network:
//
//	network := netstack.NewNetwork(nil)
//	defer network.Close()
//	server, _ := network.NewStack(netstack.Config{}) // 10.0.0.1/16
//	lis, _ := server.Listen("*:4000")
//	go netstack.Serve(ctx, lis, &core.Options{BootstrapClient: capnp.Client(myCap)})
//
//	client, _ := network.NewStack(netstack.Config{}) // 10.0.0.2/16
//	conn, _ := client.Dial(ctx, "10.0.0.1:4000", nil)
//	boot := conn.Bootstrap(ctx)
//
// Closing a Stack (or the Network) aborts its TCP connections, ends every
// goroutine it started, gVisor's included, and waits for the captp
// connections made by Dial to end.
package netstack

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"

	"github.com/captp-go/captp/core"
)

// stopper is implemented by this package's link endpoints: stop ends
// their goroutines and traffic without the close action gVisor sets (which
// would remove the NIC from under Stack.Close).
type stopper interface{ stop() }

// A Stopper is a link endpoint from another package whose goroutines
// Stop ends early, without closing anything gVisor still uses. Close
// (and New, when it fails) stops such a link and waits for it (its Wait)
// before gVisor's Stack.Wait, which holds the stack's lock while it waits
// for the link: a packet the link is delivering at that moment needs the
// lock, and the two would wait for each other. adapters/tamago's
// virtio-net Link implements it.
type Stopper interface{ Stop() }

// stopLink ends a link's goroutines before gVisor's Wait (see Stopper);
// links that cannot be stopped early are left to Wait.
func stopLink(link stack.LinkEndpoint) {
	switch l := link.(type) {
	case stopper:
		l.stop()
	case Stopper:
		l.Stop()
	default:
		return
	}
	// Let the link's reader finish the packet it may be delivering.
	link.Wait()
}

// nicID is the one NIC of every Stack.
const nicID tcpip.NICID = 1

// Config describes a Stack: one NIC with its addresses and routes.
type Config struct {
	// Name labels the stack's NIC and its log lines. Empty means
	// "netstack".
	Name string

	// MAC is the NIC's Ethernet address (6 bytes). Nil keeps the link's
	// own: a Network numbers its ports, a StreamLink picks a random
	// locally administered address.
	MAC net.HardwareAddr

	// Addrs are the NIC's IPv4 and IPv6 addresses with their subnet
	// lengths, such as 10.0.0.1/24 or fd00::1/64.
	Addrs []netip.Prefix

	// Routes is the routing table. Nil means one on-link route per
	// subnet of Addrs; to reach other subnets add a Route with a Gateway
	// (and then list the on-link routes too).
	Routes []Route

	// MTU is the IP MTU (Ethernet header excluded), passed to the link's
	// SetMTU. Zero keeps the link's: DefaultNetworkMTU on a Network,
	// DefaultStreamMTU on a StreamLink.
	MTU uint32

	// Logger receives diagnostics; nil discards them.
	Logger *slog.Logger
}

// A Route sends packets for Dest to Gateway, or directly to their
// destination on the link if Gateway is the zero netip.Addr.
type Route struct {
	Dest    netip.Prefix
	Gateway netip.Addr
}

// A Stack is a gVisor TCP/IP stack with one NIC, on which vats dial and
// listen. Create it with New or Network.NewStack; it is safe for
// concurrent use.
type Stack struct {
	name  string
	s     *stack.Stack
	link  stack.LinkEndpoint
	addrs []netip.Prefix
	log   *slog.Logger

	mu      sync.Mutex
	closed  bool
	conns   []*core.Conn // made by Dial, waited for by Close
	onClose func()       // set by Network.NewStack

	closeOnce sync.Once
}

// New creates a stack whose NIC is link, which must carry Ethernet frames
// (as StreamLink and Network.NewLink do: ARP and IPv6 neighbor discovery
// run over it). The stack speaks IPv4, IPv6, ARP and TCP.
//
// The Stack owns link: closing the stack closes it, and New closes it if
// it fails. A link of another kind that runs goroutines (such as gVisor's
// fdbased) must be stopped by the caller before Close: gVisor waits for a
// link's goroutines before it closes the link.
func New(link stack.LinkEndpoint, cfg Config) (*Stack, error) {
	if cfg.Name == "" {
		cfg.Name = "netstack"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	fail := func(format string, args ...any) (*Stack, error) {
		link.Close()
		return nil, fmt.Errorf("netstack: new stack %s: "+format, append([]any{cfg.Name}, args...)...)
	}
	if cfg.MAC != nil {
		if len(cfg.MAC) != 6 {
			return fail("MAC %v is not 6 bytes long", cfg.MAC)
		}
		link.SetLinkAddress(tcpip.LinkAddress(cfg.MAC))
		if link.LinkAddress() != tcpip.LinkAddress(cfg.MAC) {
			return fail("link refused MAC %v (already in use?)", cfg.MAC)
		}
	}
	if cfg.MTU != 0 {
		link.SetMTU(cfg.MTU)
	}
	var pas []tcpip.ProtocolAddress
	for _, p := range cfg.Addrs {
		pa, err := protocolAddress(p)
		if err != nil {
			return fail("%w", err)
		}
		pas = append(pas, pa)
	}
	routes := cfg.Routes
	if routes == nil {
		for _, p := range cfg.Addrs {
			routes = append(routes, Route{Dest: p.Masked()})
		}
	}
	table := make([]tcpip.Route, 0, len(routes))
	for _, r := range routes {
		tr, err := tcpipRoute(r)
		if err != nil {
			return fail("%w", err)
		}
		table = append(table, tr)
	}

	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol},
		HandleLocal:        true, // a vat may dial its own stack's addresses
	})
	nicCreated := false
	destroy := func(format string, args ...any) (*Stack, error) {
		if !nicCreated {
			s.Destroy()
			return fail(format, args...)
		}
		// As in Close: the link's goroutines end before Wait.
		s.Close()
		stopLink(link)
		s.Wait() // closes link
		return nil, fmt.Errorf("netstack: new stack %s: "+format, append([]any{cfg.Name}, args...)...)
	}
	sack := tcpip.TCPSACKEnabled(true)
	if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, &sack); err != nil {
		return destroy("enabling TCP SACK: %s", err)
	}
	moderate := tcpip.TCPModerateReceiveBufferOption(true)
	if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, &moderate); err != nil {
		return destroy("enabling receive buffer moderation: %s", err)
	}
	if err := s.CreateNICWithOptions(nicID, link, stack.NICOptions{Name: cfg.Name}); err != nil {
		return destroy("creating NIC: %s", err)
	}
	nicCreated = true
	for _, pa := range pas {
		if err := s.AddProtocolAddress(nicID, pa, stack.AddressProperties{}); err != nil {
			return destroy("adding address %s: %s", pa.AddressWithPrefix, err)
		}
	}
	s.SetRouteTable(table)

	st := &Stack{name: cfg.Name, s: s, link: link, addrs: append([]netip.Prefix(nil), cfg.Addrs...), log: cfg.Logger.With("stack", cfg.Name)}
	st.log.Debug("netstack: stack up", "mac", macString(link.LinkAddress()), "addrs", cfg.Addrs, "mtu", link.MTU())
	return st, nil
}

func protocolAddress(p netip.Prefix) (tcpip.ProtocolAddress, error) {
	if !p.IsValid() || p.Addr().Zone() != "" {
		return tcpip.ProtocolAddress{}, fmt.Errorf("bad address %v", p)
	}
	a := p.Addr().Unmap()
	proto := ipv4.ProtocolNumber
	bits := p.Bits()
	if a.Is6() {
		proto = ipv6.ProtocolNumber
	} else if p.Addr().Is4In6() {
		bits -= 96
	}
	return tcpip.ProtocolAddress{
		Protocol:          proto,
		AddressWithPrefix: tcpip.AddressWithPrefix{Address: tcpip.AddrFromSlice(a.AsSlice()), PrefixLen: bits},
	}, nil
}

func tcpipRoute(r Route) (tcpip.Route, error) {
	dest, err := protocolAddress(r.Dest)
	if err != nil {
		return tcpip.Route{}, fmt.Errorf("route: %w", err)
	}
	tr := tcpip.Route{Destination: dest.AddressWithPrefix.Subnet(), NIC: nicID}
	if r.Gateway.IsValid() {
		gw := r.Gateway.Unmap()
		if gw.Is4() != (dest.Protocol == ipv4.ProtocolNumber) {
			return tcpip.Route{}, fmt.Errorf("route to %v: gateway %v is of the other IP version", r.Dest, r.Gateway)
		}
		tr.Gateway = tcpip.AddrFromSlice(gw.AsSlice())
	}
	return tr, nil
}

// Name returns the stack's name (Config.Name).
func (s *Stack) Name() string { return s.name }

// Addrs returns the stack's addresses (Config.Addrs, or the ones its
// Network assigned).
func (s *Stack) Addrs() []netip.Prefix { return append([]netip.Prefix(nil), s.addrs...) }

// Addr returns the stack's first address, or the zero Addr if it has none.
func (s *Stack) Addr() netip.Addr {
	if len(s.addrs) == 0 {
		return netip.Addr{}
	}
	return s.addrs[0].Addr()
}

// GVisor returns the underlying gVisor stack, for what this package does
// not cover (UDP, statistics, packet capture). Close still owns it.
func (s *Stack) GVisor() *stack.Stack { return s.s }

// DialTCP opens a TCP connection to addr (see ParseAddr): a plain byte
// stream, for callers that do not want a captp connection on it.
func (s *Stack) DialTCP(ctx context.Context, addr string) (net.Conn, error) {
	ap, err := ParseAddr(addr)
	if err != nil {
		return nil, fmt.Errorf("netstack: dial: %w", err)
	}
	if !ap.Addr().IsValid() {
		return nil, fmt.Errorf("netstack: dial %s: %w: '*' is for listening; dial an IP address", addr, ErrBadAddress)
	}
	if err := s.checkOpen(); err != nil {
		return nil, fmt.Errorf("netstack: dial %s: %w", addr, err)
	}
	fa, proto := fullAddress(ap)
	c, err := gonet.DialContextTCP(ctx, s.s, fa, proto)
	if err != nil {
		return nil, fmt.Errorf("netstack: %s: dial %s: %w", s.name, addr, err)
	}
	return c, nil
}

// Dial connects to addr (see ParseAddr) and starts a Cap'n Proto RPC
// connection over it with opts, which may be nil. ctx bounds only the
// connection attempt, not the life of the returned Conn. As with
// core.NewConn, the Conn takes ownership of opts.BootstrapClient, also
// when Dial fails (it is then released).
//
// Closing the Stack ends the Conn and waits until it is done.
func (s *Stack) Dial(ctx context.Context, addr string, opts *core.Options) (*core.Conn, error) {
	c, err := s.DialTCP(ctx, addr)
	if err != nil {
		if opts != nil {
			opts.BootstrapClient.Release()
		}
		return nil, err
	}
	conn := core.NewConn(c, opts)
	s.mu.Lock()
	if s.closed {
		// Close ran while we dialed; it may not have seen c's endpoint.
		s.mu.Unlock()
		conn.Close()
		return nil, fmt.Errorf("netstack: dial %s: stack %s %w", addr, s.name, ErrClosed)
	}
	// Forget connections that already ended, so the list stays as short
	// as the live ones.
	live := s.conns[:0]
	for _, old := range s.conns {
		select {
		case <-old.Done():
		default:
			live = append(live, old)
		}
	}
	clear(s.conns[len(live):])
	s.conns = append(live, conn)
	s.mu.Unlock()
	return conn, nil
}

// Listen announces on addr (see ParseAddr); *:port listens on every
// address of the stack, IPv4 and IPv6. The listener's Accept returns
// byte streams; Serve runs captp on them.
func (s *Stack) Listen(addr string) (net.Listener, error) {
	ap, err := ParseAddr(addr)
	if err != nil {
		return nil, fmt.Errorf("netstack: listen: %w", err)
	}
	if err := s.checkOpen(); err != nil {
		return nil, fmt.Errorf("netstack: listen %s: %w", addr, err)
	}
	fa, proto := fullAddress(ap)
	if !ap.Addr().IsValid() {
		proto = ipv6.ProtocolNumber // a dual-stack endpoint: IPv4 arrives v4-mapped
	}
	l, err := gonet.ListenTCP(s.s, fa, proto)
	if err != nil {
		return nil, fmt.Errorf("netstack: %s: listen %s: %w", s.name, addr, err)
	}
	return &listener{TCPListener: l, stack: s, closed: make(chan struct{})}, nil
}

func (s *Stack) checkOpen() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return fmt.Errorf("stack %s %w", s.name, ErrClosed)
	}
	return nil
}

func fullAddress(ap netip.AddrPort) (tcpip.FullAddress, tcpip.NetworkProtocolNumber) {
	fa := tcpip.FullAddress{Port: ap.Port()}
	a := ap.Addr()
	if !a.IsValid() {
		return fa, ipv4.ProtocolNumber
	}
	fa.Addr = tcpip.AddrFromSlice(a.AsSlice())
	if a.Is4() {
		return fa, ipv4.ProtocolNumber
	}
	return fa, ipv6.ProtocolNumber
}

// Close tears the stack down: it aborts every TCP connection and
// listener (peers see a reset), stops gVisor's goroutines and the link's,
// closes the link, and waits until every captp connection made by Dial
// has ended. Connections accepted by Serve end too; Serve returns. Close
// is idempotent and always returns nil.
func (s *Stack) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		conns := s.conns
		s.conns = nil
		onClose := s.onClose
		s.mu.Unlock()

		// This is stack.Destroy with the link closed in the middle:
		// aborting the endpoints first sends peers their resets (and
		// fails blocked reads and writes); the link must stop before
		// Wait, which waits for its goroutines before closing it.
		s.s.Close()
		stopLink(s.link)
		s.s.Wait()
		for _, c := range conns {
			<-c.Done()
		}
		if onClose != nil {
			onClose()
		}
		s.log.Debug("netstack: stack closed")
	})
	return nil
}

// listener is a gonet listener whose Close also wakes a blocked Accept
// (gonet's Close alone does not) and whose Accept then reports
// net.ErrClosed, like the net package's listeners, or ErrClosed once its
// stack is closed.
type listener struct {
	*gonet.TCPListener
	stack     *Stack
	closeOnce sync.Once
	closed    chan struct{}
}

// Accept implements net.Listener.
func (l *listener) Accept() (net.Conn, error) {
	c, err := l.TCPListener.Accept()
	if err != nil {
		select {
		case <-l.closed:
			return nil, &net.OpError{Op: "accept", Net: "tcp", Addr: l.Addr(), Err: net.ErrClosed}
		default:
		}
		if cerr := l.stack.checkOpen(); cerr != nil {
			return nil, &net.OpError{Op: "accept", Net: "tcp", Addr: l.Addr(), Err: cerr}
		}
		return nil, err
	}
	return c, nil
}

// Close implements net.Listener.
func (l *listener) Close() error {
	l.closeOnce.Do(func() {
		close(l.closed)
		l.TCPListener.Shutdown()
		l.TCPListener.Close()
	})
	return nil
}
