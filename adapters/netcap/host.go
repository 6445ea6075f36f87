package netcap

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/captp-go/captp/core/bytestream"
	"github.com/captp-go/captp/core/flow"
)

// A Backend opens the host's sockets: the kernel's (KernelBackend) or a
// userspace stack's (StackBackend). The Server has already checked the
// policy; addresses are literal.
type Backend interface {
	// Dial connects to addr; network is "tcp", "tcp4" or "tcp6".
	Dial(ctx context.Context, network string, addr netip.AddrPort) (net.Conn, error)
	// Listen listens on addr; an unspecified address (0.0.0.0, ::) means
	// every address.
	Listen(ctx context.Context, network string, addr netip.AddrPort) (net.Listener, error)
	// LookupHost resolves a host name to addresses of network's families.
	LookupHost(ctx context.Context, network, host string) ([]netip.Addr, error)
}

// KernelBackend opens sockets with the host's kernel. The zero value is
// ready to use.
type KernelBackend struct {
	Dialer       net.Dialer
	ListenConfig net.ListenConfig
	// Resolver resolves names; nil means net.DefaultResolver.
	Resolver *net.Resolver
}

// Dial implements Backend.
func (k *KernelBackend) Dial(ctx context.Context, network string, addr netip.AddrPort) (net.Conn, error) {
	return k.Dialer.DialContext(ctx, network, addr.String())
}

// Listen implements Backend.
func (k *KernelBackend) Listen(ctx context.Context, network string, addr netip.AddrPort) (net.Listener, error) {
	return k.ListenConfig.Listen(ctx, network, addr.String())
}

// LookupHost implements Backend.
func (k *KernelBackend) LookupHost(ctx context.Context, network, host string) ([]netip.Addr, error) {
	r := k.Resolver
	if r == nil {
		r = net.DefaultResolver
	}
	return r.LookupNetIP(ctx, "ip"+strings.TrimPrefix(network, "tcp"), host)
}

// A Stack is a userspace TCP/IP stack, such as an adapters/netstack
// Stack.
type Stack interface {
	DialTCP(ctx context.Context, addr string) (net.Conn, error)
	Listen(addr string) (net.Listener, error)
}

// StackBackend opens sockets on a userspace stack (an adapters/netstack
// Stack): the guest's streams then never touch the host's kernel
// network.
type StackBackend struct {
	Stack Stack
	// Lookup resolves names; nil means names are unreachable (a netstack
	// has no resolver).
	Lookup func(ctx context.Context, network, host string) ([]netip.Addr, error)
}

// Dial implements Backend.
func (b *StackBackend) Dial(ctx context.Context, network string, addr netip.AddrPort) (net.Conn, error) {
	return b.Stack.DialTCP(ctx, addr.String())
}

// Listen implements Backend.
func (b *StackBackend) Listen(ctx context.Context, network string, addr netip.AddrPort) (net.Listener, error) {
	s := addr.String()
	if addr.Addr().IsUnspecified() {
		s = "*:" + strconv.Itoa(int(addr.Port())) // netstack's every-address form
	}
	return b.Stack.Listen(s)
}

// LookupHost implements Backend.
func (b *StackBackend) LookupHost(ctx context.Context, network, host string) ([]netip.Addr, error) {
	if b.Lookup == nil {
		return nil, newError(KindUnreachable, "%s: no name resolver on this stack", host)
	}
	return b.Lookup(ctx, network, host)
}

// Options configures a Server. The zero value (or nil) is valid.
type Options struct {
	// Logger receives denials and failures at debug level. Nil discards.
	Logger *slog.Logger
	// DialTimeout bounds a connect, resolution included; zero means 30s.
	DialTimeout time.Duration
	// ReadSize is the most bytes read from a socket at once and sent in
	// one write call; zero means 64 KiB.
	ReadSize int
	// Flow is the flow control of the bytes sent to a guest's down
	// ByteStream when it is not imported over a captp connection (which
	// has its own): see bytestream.WriterOptions. Zero fields take
	// flow.Defaults.
	Flow flow.Config
	// Linger bounds a graceful close: when the guest closes a stream
	// after ending its direction, the host has already sent the remote
	// its bytes and FIN, and keeps reading and discarding the remote's
	// bytes until the remote's end of stream, for at most Linger, before
	// closing the socket. Closing a socket with unread bytes would send a
	// reset, and the remote's kernel would drop what the remote had not
	// read yet. A lingering stream keeps its slot (MaxStreams). Zero
	// means 2s; negative closes at once.
	Linger time.Duration
}

// defaultLinger is Options.Linger's default.
const defaultLinger = 2 * time.Second

// maxAddressLen bounds an address a guest sends.
const maxAddressLen = 1024

// Server is the host's side of a Network capability: it checks each
// request against its Policy and opens the sockets through its Backend.
// Every socket it opens is closed when the Network's last reference is
// released (the guest drops it or its connection ends) or Close is
// called.
type Server struct {
	policy  Policy
	backend Backend
	log     *slog.Logger
	timeout time.Duration
	readSz  int
	flow    flow.Config
	linger  time.Duration

	mu        sync.Mutex
	closed    bool
	streams   map[*hostStream]struct{}
	slots     int // streams open or being opened
	listeners map[*hostListener]struct{}
	lslots    int
	denied    uint64
	wg        sync.WaitGroup // socket readers and acceptors
}

// Stats counts what a Server holds.
type Stats struct {
	Streams   int    // streams open
	Listeners int    // listeners open
	Denied    uint64 // requests the policy denied
}

// NewServer returns a Server for policy (copied) and backend, and the
// Network capability that calls it. The caller owns the capability; when
// every reference to it is released, the Server closes.
func NewServer(policy *Policy, backend Backend, opts *Options) (*Server, Network) {
	if opts == nil {
		opts = &Options{}
	}
	s := &Server{
		backend:   backend,
		log:       opts.Logger,
		timeout:   opts.DialTimeout,
		readSz:    opts.ReadSize,
		flow:      opts.Flow,
		linger:    opts.Linger,
		streams:   make(map[*hostStream]struct{}),
		listeners: make(map[*hostListener]struct{}),
	}
	if policy != nil {
		s.policy = *policy
		s.policy.Connect = append(Rules(nil), policy.Connect...)
		s.policy.Listen = append(Rules(nil), policy.Listen...)
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.timeout <= 0 {
		s.timeout = 30 * time.Second
	}
	if s.readSz <= 0 {
		s.readSz = 64 << 10
	}
	if s.linger == 0 {
		s.linger = defaultLinger
	}
	return s, Network_ServerToClient(s)
}

// NewNetwork returns a Network capability restricted by policy that
// opens sockets through backend. Releasing its last reference closes
// every socket opened through it.
func NewNetwork(policy *Policy, backend Backend, opts *Options) Network {
	_, n := NewServer(policy, backend, opts)
	return n
}

// Stats returns what s holds now.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return Stats{Streams: len(s.streams), Listeners: len(s.listeners), Denied: s.denied}
}

// Shutdown is called when the Network's last reference is released.
func (s *Server) Shutdown() { s.shutdown() }

// Close closes every stream and listener at once (lingering streams
// too), refuses later requests, and waits until the goroutines serving
// them have ended.
func (s *Server) Close() error {
	s.shutdown()
	s.wg.Wait()
	return nil
}

func (s *Server) shutdown() {
	s.mu.Lock()
	s.closed = true
	streams := make([]*hostStream, 0, len(s.streams))
	for h := range s.streams {
		streams = append(streams, h)
	}
	listeners := make([]*hostListener, 0, len(s.listeners))
	for l := range s.listeners {
		listeners = append(listeners, l)
	}
	s.mu.Unlock()
	for _, h := range streams {
		h.close()
	}
	for _, l := range listeners {
		l.close()
	}
}

// request is a parsed connect or listen address.
type request struct {
	network string
	host    string     // canonical name, or "" for a literal address
	addr    netip.Addr // valid for a literal address
	port    uint16
}

// parseRequest checks a guest's network and address.
func parseRequest(network, address string, listen bool) (request, *Error) {
	switch network {
	case "tcp", "tcp4", "tcp6":
	default:
		return request{}, newError(KindInvalidAddress, "network %.32q: want tcp, tcp4 or tcp6", network)
	}
	if len(address) > maxAddressLen {
		return request{}, newError(KindInvalidAddress, "address longer than %d bytes", maxAddressLen)
	}
	host, port, err := net.SplitHostPort(address)
	if err != nil {
		return request{}, newError(KindInvalidAddress, "%.64q: want host:port", address)
	}
	p, perr := parsePort(port)
	if perr != nil {
		return request{}, newError(KindInvalidAddress, "%.64q: %v", address, perr)
	}
	r := request{network: network, port: p}
	if !listen && p == 0 {
		return request{}, newError(KindInvalidAddress, "%.64q: port 0", address)
	}
	switch {
	case host == "" && listen:
		r.addr = netip.IPv4Unspecified()
		if network == "tcp6" {
			r.addr = netip.IPv6Unspecified()
		}
	case host == "":
		return request{}, newError(KindInvalidAddress, "%.64q: missing host", address)
	default:
		if a, err := netip.ParseAddr(host); err == nil {
			if a.Zone() != "" {
				return request{}, newError(KindInvalidAddress, "%.64q: zones are not supported", address)
			}
			r.addr = a.Unmap()
			if network == "tcp4" && !r.addr.Is4() || network == "tcp6" && !r.addr.Is6() {
				return request{}, newError(KindInvalidAddress, "%.64q is not a %s address", address, network)
			}
			break
		}
		if listen {
			return request{}, newError(KindInvalidAddress, "%.64q: listen on an IP address, not a name", address)
		}
		name, err := canonicalName(host)
		if err != nil {
			return request{}, newError(KindInvalidAddress, "%v", err)
		}
		r.host = name
	}
	return r, nil
}

// deny counts and logs a denial.
func (s *Server) deny(op, network, address string) *Error {
	s.mu.Lock()
	s.denied++
	s.mu.Unlock()
	s.log.Debug("netcap: denied", "op", op, "network", network, "address", address)
	return newError(KindDenied, "%s %s %.64s", op, network, address)
}

// acquire reserves a stream slot (or a listener slot).
func (s *Server) acquire(listener bool) *Error {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.closed:
		return newError(KindClosed, "network closed")
	case listener && s.lslots >= s.policy.maxListeners():
		return newError(KindLimit, "%d listeners open", s.lslots)
	case !listener && s.slots >= s.policy.maxStreams():
		return newError(KindLimit, "%d streams open", s.slots)
	}
	if listener {
		s.lslots++
	} else {
		s.slots++
	}
	return nil
}

func (s *Server) release(listener bool) {
	s.mu.Lock()
	if listener {
		s.lslots--
	} else {
		s.slots--
	}
	s.mu.Unlock()
}

// resolve returns the addresses a connect request may dial, in order.
func (s *Server) resolve(ctx context.Context, r request, address string) ([]netip.AddrPort, *Error) {
	rules := s.policy.Connect
	if r.host == "" {
		ap := netip.AddrPortFrom(r.addr, r.port)
		if !rules.allowsAddr(ap) {
			return nil, s.deny("connect", r.network, address)
		}
		return []netip.AddrPort{ap}, nil
	}
	named := rules.allowsName(r.host, r.port)
	if !named && !rules.allowsPort(r.port) {
		// No rule could allow any address: do not even resolve.
		return nil, s.deny("connect", r.network, address)
	}
	addrs, err := s.backend.LookupHost(ctx, r.network, r.host)
	if err != nil {
		e := asError(err)
		if e.Kind == KindOther {
			e = &Error{Kind: KindUnreachable, Detail: e.Detail}
		}
		return nil, e
	}
	var out []netip.AddrPort
	for _, a := range addrs {
		ap := netip.AddrPortFrom(a.Unmap(), r.port)
		if r.network == "tcp4" && !ap.Addr().Is4() || r.network == "tcp6" && !ap.Addr().Is6() {
			continue
		}
		if named || rules.allowsAddr(ap) {
			out = append(out, ap)
		}
	}
	if len(out) == 0 {
		if len(addrs) == 0 {
			return nil, newError(KindUnreachable, "%s: no addresses", r.host)
		}
		e := s.deny("connect", r.network, address)
		e.Detail += fmt.Sprintf(" (resolved to %v)", addrs[:min(len(addrs), 4)])
		return nil, e
	}
	return out, nil
}

// dial opens a connection for a connect request; the caller holds a slot.
func (s *Server) dial(ctx context.Context, r request, address string) (net.Conn, *Error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	addrs, e := s.resolve(ctx, r, address)
	if e != nil {
		return nil, e
	}
	var last error
	for _, ap := range addrs {
		c, err := s.backend.Dial(ctx, r.network, ap)
		if err == nil {
			return c, nil
		}
		last = err
		if ctx.Err() != nil {
			break
		}
	}
	e = asError(last)
	s.log.Debug("netcap: connect failed", "address", address, "err", last)
	return nil, e
}

// Connect implements Network_Server.
func (s *Server) Connect(ctx context.Context, call Network_connect) error {
	call.Go() // dialing may take long; serve other calls meanwhile
	args := call.Args()
	network, _ := args.Network()
	address, _ := args.Address()
	down := args.Down()
	res, err := call.AllocResults()
	if err != nil {
		return fmt.Errorf("netcap: connect: %w", err)
	}
	result, err := res.NewResult()
	if err != nil {
		return fmt.Errorf("netcap: connect: %w", err)
	}
	if !down.IsValid() {
		return writeFailure(result, newError(KindOther, "connect: no down ByteStream"))
	}
	// Invalid and denied requests are answered before taking a slot, so
	// they get that answer even when every slot is in use.
	r, e := parseRequest(network, address, false)
	if e == nil && r.host == "" && !s.policy.Connect.allowsAddr(netip.AddrPortFrom(r.addr, r.port)) {
		e = s.deny("connect", network, address)
	}
	if e != nil {
		return writeFailure(result, e)
	}
	if e := s.acquire(false); e != nil {
		return writeFailure(result, e)
	}
	c, e := s.dial(ctx, r, address)
	if e != nil {
		s.release(false)
		return writeFailure(result, e)
	}
	return s.attach(result, c, down)
}

// writeFailure sets the result's failure.
func writeFailure(r ConnectResult, e *Error) error {
	f, err := r.NewFailure()
	if err != nil {
		return fmt.Errorf("netcap: result: %w", err)
	}
	return setFailure(f, e)
}

// attach makes a stream of c, which holds a slot, and writes it into r.
// down receives the bytes read from c.
func (s *Server) attach(r ConnectResult, c net.Conn, down bytestream.ByteStream) error {
	h := &hostStream{s: s, conn: c}
	h.ctx, h.cancel = context.WithCancel(context.Background())
	h.downCtx, h.downCancel = context.WithCancel(h.ctx)
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		c.Close()
		s.release(false)
		return writeFailure(r, newError(KindClosed, "network closed"))
	}
	s.streams[h] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()

	conn, err := r.NewConnection()
	if err == nil {
		err = conn.SetStream(Stream_ServerToClient(h))
	}
	if err == nil {
		err = conn.SetUp(bytestream.NewServer(c, h.endUp))
	}
	if err == nil {
		err = conn.SetLocalAddress(c.LocalAddr().String())
	}
	if err == nil {
		err = conn.SetRemoteAddress(c.RemoteAddr().String())
	}
	go h.pump(down.AddRef())
	if err != nil {
		h.close()
		return fmt.Errorf("netcap: result: %w", err)
	}
	return nil
}

// hostStream is one open connection on the host.
type hostStream struct {
	s      *Server
	conn   net.Conn
	ctx    context.Context // canceled by close
	cancel context.CancelFunc
	// downCtx bounds the writes to the guest's down ByteStream; canceled
	// by close, and when the stream starts lingering.
	downCtx    context.Context
	downCancel context.CancelFunc

	mu        sync.Mutex
	upEnded   bool        // the guest ended its direction
	finSent   bool        // ... and the host half-closed the socket after its bytes
	downDone  bool        // the remote ended its direction and the guest has all of it
	downEnded bool        // the host is ending down
	failure   *Error      // why, if not cleanly
	pumpDone  bool        // pump has stopped reading the socket
	lingering bool        // closing gracefully: pump discards until the remote's EOF
	closed    bool        // close has run
	linger    *time.Timer // bounds the lingering
	once      sync.Once
}

// Close implements Stream_Server.
func (h *hostStream) Close(ctx context.Context, call Stream_close) error {
	h.closeGracefully()
	return nil
}

// Shutdown closes the stream when its last reference is released, as
// Close does. (When the guest's connection ends, the Network's release
// closes every stream at once.)
func (h *hostStream) Shutdown() { h.closeGracefully() }

// closeGracefully closes the stream without a reset when it can. If the
// guest ended its direction, the socket is already half-closed after the
// guest's bytes; closing it now, with the remote's bytes unread in its
// receive buffer, would send a reset that makes the remote's kernel drop
// the guest's bytes the remote has not read yet. So the host lingers:
// it stops forwarding to the guest, and pump reads and discards until
// the remote's end of stream (then closes) or until the linger ends.
// Otherwise, as when a write was cut short, the close is abortive.
func (h *hostStream) closeGracefully() {
	h.mu.Lock()
	if h.lingering || h.closed {
		h.mu.Unlock()
		return
	}
	if !h.finSent || h.pumpDone || h.s.linger < 0 {
		h.mu.Unlock()
		h.close()
		return
	}
	h.lingering = true
	h.linger = time.AfterFunc(h.s.linger, h.close)
	h.mu.Unlock()
	h.downCancel() // unblocks a pump waiting for the guest to read
}

// isLingering reports whether the stream is closing gracefully.
func (h *hostStream) isLingering() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.lingering
}

// close closes the socket at once (abortive if bytes are unread).
func (h *hostStream) close() {
	h.once.Do(func() {
		h.mu.Lock()
		h.closed = true
		if h.linger != nil {
			h.linger.Stop()
		}
		h.mu.Unlock()
		// Forget the stream first: once the remote sees the socket
		// close, Stats no longer counts it.
		h.s.mu.Lock()
		delete(h.s.streams, h)
		h.s.slots--
		h.s.mu.Unlock()
		h.cancel()
		h.conn.Close()
	})
}

// halfDone records that one direction ended; the socket closes when both
// have.
func (h *hostStream) halfDone(up bool) {
	h.mu.Lock()
	if up {
		h.upEnded = true
	} else {
		h.downDone = true
	}
	both := h.upEnded && h.downDone
	h.mu.Unlock()
	if both {
		h.close()
	}
}

// endUp half-closes the socket when the guest ends its direction: every
// byte before the end has been written to the socket.
func (h *hostStream) endUp(context.Context) error {
	defer h.halfDone(true)
	cw, ok := h.conn.(interface{ CloseWrite() error })
	if !ok {
		return nil // the remote sees the end when the socket closes
	}
	if err := cw.CloseWrite(); err != nil {
		return fmt.Errorf("netcap: half-close: %w", err)
	}
	h.mu.Lock()
	h.finSent = true
	h.mu.Unlock()
	return nil
}

// pump copies the socket's bytes to the guest's down ByteStream. Its writes are
// streaming calls within the down ByteStream's flow-control window: when the guest
// does not read, the window fills, pump stops reading and the remote
// sender is held back by TCP. The host holds at most ReadSize bytes plus
// the window. While the stream lingers, pump discards what it reads.
func (h *hostStream) pump(down bytestream.ByteStream) {
	defer h.s.wg.Done()
	defer down.Release()
	defer func() {
		h.mu.Lock()
		h.pumpDone = true
		h.mu.Unlock()
	}()
	w := bytestream.NewWriter(h.downCtx, down, &bytestream.WriterOptions{ChunkSize: h.s.readSz, Flow: h.s.flow})
	buf := make([]byte, h.s.readSz)
	for {
		n, err := h.conn.Read(buf)
		if n > 0 && !h.isLingering() {
			_, werr := w.Write(buf[:n])
			if werr == nil {
				werr = w.Flush()
			}
			if werr != nil && !h.isLingering() {
				// The guest's down ByteStream failed or went away: nobody reads.
				h.close()
				w.Close()
				return
			}
		}
		if err == nil {
			continue
		}
		switch {
		case h.isLingering():
			// At the remote's end of stream nothing is left unread, and
			// closing sends no reset; on an error there is nothing to save.
			h.close()
			w.Close()
		case h.ctx.Err() != nil:
			// Closed here; the guest closed it, or the Network went.
			w.Close()
		case errors.Is(err, io.EOF):
			h.endDown(nil)
			if w.Close() == nil {
				h.halfDone(false)
			} else {
				h.close()
			}
		default:
			h.endDown(asError(err))
			w.Close()
			h.close()
		}
		return
	}
}

// EndReason implements Stream_Server.
func (h *hostStream) EndReason(ctx context.Context, call Stream_endReason) error {
	res, err := call.AllocResults()
	if err != nil {
		return fmt.Errorf("netcap: endReason: %w", err)
	}
	r, err := res.NewReason()
	if err != nil {
		return fmt.Errorf("netcap: endReason: %w", err)
	}
	h.mu.Lock()
	ended, failure := h.downEnded, h.failure
	h.mu.Unlock()
	switch {
	case failure != nil:
		f, err := r.NewFailure()
		if err != nil {
			return fmt.Errorf("netcap: endReason: %w", err)
		}
		return setFailure(f, failure)
	case ended:
		r.SetEof()
	default:
		r.SetOpen()
	}
	return nil
}

// endDown records why the down direction ends, before its end() call is
// sent: the guest asks endReason once it has seen end().
func (h *hostStream) endDown(e *Error) {
	h.mu.Lock()
	h.downEnded, h.failure = true, e
	h.mu.Unlock()
}

// Listen implements Network_Server.
func (s *Server) Listen(ctx context.Context, call Network_listen) error {
	args := call.Args()
	network, _ := args.Network()
	address, _ := args.Address()
	res, err := call.AllocResults()
	if err != nil {
		return fmt.Errorf("netcap: listen: %w", err)
	}
	result, err := res.NewResult()
	if err != nil {
		return fmt.Errorf("netcap: listen: %w", err)
	}
	fail := func(e *Error) error {
		f, err := result.NewFailure()
		if err != nil {
			return fmt.Errorf("netcap: result: %w", err)
		}
		return setFailure(f, e)
	}
	r, e := parseRequest(network, address, true)
	if e != nil {
		return fail(e)
	}
	ap := netip.AddrPortFrom(r.addr, r.port)
	if !s.policy.Listen.allowsAddr(ap) {
		return fail(s.deny("listen", network, address))
	}
	if e := s.acquire(true); e != nil {
		return fail(e)
	}
	lis, err := s.backend.Listen(ctx, r.network, ap)
	if err != nil {
		s.release(true)
		s.log.Debug("netcap: listen failed", "address", address, "err", err)
		return fail(asError(err))
	}
	l := &hostListener{s: s, lis: lis, conns: make(chan net.Conn), done: make(chan struct{}), failed: make(chan struct{})}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		lis.Close()
		s.release(true)
		return fail(newError(KindClosed, "network closed"))
	}
	s.listeners[l] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	go l.acceptLoop()

	ls, err := result.NewListener()
	if err == nil {
		err = ls.SetListener(Listener_ServerToClient(l))
	}
	if err == nil {
		err = ls.SetAddress(lis.Addr().String())
	}
	if err != nil {
		l.close()
		return fmt.Errorf("netcap: result: %w", err)
	}
	return nil
}

// hostListener is one listening socket on the host.
type hostListener struct {
	s      *Server
	lis    net.Listener
	conns  chan net.Conn // from acceptLoop to a waiting accept call
	done   chan struct{} // closed by close
	failed chan struct{} // closed when Accept fails; err is set
	err    error
	once   sync.Once
}

// acceptLoop accepts connections one at a time and hands each to an
// accept call; it holds at most one connection that no call has taken.
func (l *hostListener) acceptLoop() {
	defer l.s.wg.Done()
	for {
		c, err := l.lis.Accept()
		if err != nil {
			l.err = err
			close(l.failed)
			return
		}
		select {
		case l.conns <- c:
		case <-l.done:
			c.Close()
			return
		}
	}
}

// Accept implements Listener_Server.
func (l *hostListener) Accept(ctx context.Context, call Listener_accept) error {
	call.Go() // accept blocks; close and other accepts must still run
	down := call.Args().Down()
	res, err := call.AllocResults()
	if err != nil {
		return fmt.Errorf("netcap: accept: %w", err)
	}
	result, err := res.NewResult()
	if err != nil {
		return fmt.Errorf("netcap: accept: %w", err)
	}
	if !down.IsValid() {
		return writeFailure(result, newError(KindOther, "accept: no down ByteStream"))
	}
	select {
	case <-l.done:
		return writeFailure(result, newError(KindClosed, "listener closed"))
	default:
	}
	if e := l.s.acquire(false); e != nil {
		return writeFailure(result, e)
	}
	select {
	case c := <-l.conns:
		return l.s.attach(result, c, down)
	case <-l.done:
		l.s.release(false)
		return writeFailure(result, newError(KindClosed, "listener closed"))
	case <-l.failed:
		l.s.release(false)
		select {
		case <-l.done:
			return writeFailure(result, newError(KindClosed, "listener closed"))
		default:
		}
		return writeFailure(result, asError(l.err))
	case <-ctx.Done():
		l.s.release(false)
		return writeFailure(result, asError(ctx.Err()))
	}
}

// Close implements Listener_Server.
func (l *hostListener) Close(ctx context.Context, call Listener_close) error {
	l.close()
	return nil
}

// Shutdown closes the listener when its last reference is released.
func (l *hostListener) Shutdown() { l.close() }

func (l *hostListener) close() {
	l.once.Do(func() {
		l.s.mu.Lock()
		delete(l.s.listeners, l)
		l.s.lslots--
		l.s.mu.Unlock()
		close(l.done)
		l.lis.Close()
	})
}
