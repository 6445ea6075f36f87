package netcap

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/core/bytestream"
)

// Dial connects to address through the Network capability n, as
// net.Dialer.DialContext does: network is "tcp", "tcp4" or "tcp6". ctx
// bounds the connection attempt only. A refusal by the host is an error
// for which errors.Is(err, ErrDenied) (ErrRefused, ErrTimeout, ...) holds;
// errors.As finds the *Error with the host's description. The net.Conn
// also has CloseWrite() error, which half-closes the stream.
func Dial(ctx context.Context, n Network, network, address string) (net.Conn, error) {
	in := newInbound()
	f, release := n.Connect(ctx, func(p Network_connect_Params) error {
		if err := p.SetNetwork(network); err != nil {
			return err
		}
		if err := p.SetAddress(address); err != nil {
			return err
		}
		return p.SetDown(bytestream.ByteStream_ServerToClient(in))
	})
	defer release()
	res, err := f.Struct()
	if err != nil {
		return nil, opError("dial", network, nil, address, callError(ctx, err))
	}
	r, err := res.Result()
	if err != nil {
		return nil, opError("dial", network, nil, address, newError(KindOther, "decode result: %v", err))
	}
	c, err := newConn(in, network, r)
	if err != nil {
		return nil, opError("dial", network, nil, address, err)
	}
	return c, nil
}

// A Dialer dials through a Network capability; its DialContext fits
// net/http.Transport.DialContext and similar hooks.
type Dialer struct {
	Network Network
}

// DialContext calls Dial with d.Network.
func (d *Dialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	return Dial(ctx, d.Network, network, address)
}

// Listen listens on address through n. ctx bounds the request only. The
// listener's Accept waits, without polling, until the host accepts a
// connection or the listener is closed; it also has
// AcceptContext(ctx) (net.Conn, error), which a context ends too.
func Listen(ctx context.Context, n Network, network, address string) (net.Listener, error) {
	f, release := n.Listen(ctx, func(p Network_listen_Params) error {
		if err := p.SetNetwork(network); err != nil {
			return err
		}
		return p.SetAddress(address)
	})
	defer release()
	res, err := f.Struct()
	if err != nil {
		return nil, opError("listen", network, nil, address, callError(ctx, err))
	}
	r, err := res.Result()
	if err != nil {
		return nil, opError("listen", network, nil, address, newError(KindOther, "decode result: %v", err))
	}
	switch r.Which() {
	case ListenResult_Which_failure:
		f, _ := r.Failure()
		return nil, opError("listen", network, nil, address, fromFailure(f))
	case ListenResult_Which_listener:
	default:
		return nil, opError("listen", network, nil, address, newError(KindOther, "unknown result %d", r.Which()))
	}
	ls, err := r.Listener()
	if err != nil {
		return nil, opError("listen", network, nil, address, newError(KindOther, "decode result: %v", err))
	}
	a, _ := ls.Address()
	l := &listener{l: ls.Listener().AddRef(), network: network, addr: parseAddr(network, a)}
	l.ctx, l.cancel = context.WithCancel(context.Background())
	return l, nil
}

// callError types the failure of a call itself (not a failure result).
func callError(ctx context.Context, err error) *Error {
	switch {
	case ctx.Err() != nil:
		return asError(ctx.Err())
	case capnp.IsDisconnected(err):
		return newError(KindClosed, "%v", err)
	}
	return newError(KindOther, "%v", err)
}

func opError(op, network string, local net.Addr, address string, err error) error {
	return &net.OpError{Op: op, Net: network, Source: local, Addr: parseAddr(network, address), Err: err}
}

// strAddr is an address that is not ip:port, such as a host name.
type strAddr struct{ network, s string }

func (a strAddr) Network() string { return a.network }
func (a strAddr) String() string  { return a.s }

func parseAddr(network, s string) net.Addr {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return net.TCPAddrFromAddrPort(ap)
	}
	return strAddr{network, s}
}

// listener is the guest's net.Listener over a Listener capability.
type listener struct {
	l       Listener
	network string
	addr    net.Addr
	ctx     context.Context // canceled by Close: ends pending accepts
	cancel  context.CancelFunc
	once    sync.Once
}

// Accept waits for the next connection.
func (l *listener) Accept() (net.Conn, error) { return l.AcceptContext(context.Background()) }

// AcceptContext waits for the next connection until ctx ends or the
// listener closes.
func (l *listener) AcceptContext(ctx context.Context) (net.Conn, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(l.ctx, cancel)
	defer stop()
	if l.ctx.Err() != nil {
		return nil, opError("accept", l.network, nil, l.addr.String(), net.ErrClosed)
	}
	in := newInbound()
	f, release := l.l.Accept(ctx, func(p Listener_accept_Params) error {
		return p.SetDown(bytestream.ByteStream_ServerToClient(in))
	})
	defer release()
	res, err := f.Struct()
	if err != nil {
		if l.ctx.Err() != nil {
			err = net.ErrClosed
		} else {
			err = callError(ctx, err)
		}
		return nil, opError("accept", l.network, nil, l.addr.String(), err)
	}
	r, err := res.Result()
	if err != nil {
		return nil, opError("accept", l.network, nil, l.addr.String(), newError(KindOther, "decode result: %v", err))
	}
	c, err := newConn(in, l.network, r)
	if err != nil {
		if l.ctx.Err() != nil {
			err = net.ErrClosed
		}
		return nil, opError("accept", l.network, nil, l.addr.String(), err)
	}
	return c, nil
}

// Close stops listening; pending Accepts return net.ErrClosed.
func (l *listener) Close() error {
	l.once.Do(func() {
		l.cancel()
		_, release := l.l.Close(context.Background(), nil)
		release()
		l.l.Release()
	})
	return nil
}

// Addr is where the host listens.
func (l *listener) Addr() net.Addr { return l.addr }

// lingerTimeout bounds how long Close waits for the host to take the
// bytes already written.
const lingerTimeout = 5 * time.Second

var errWriteTimeout = &Error{Kind: KindTimeout, Detail: "write deadline exceeded"}

// conn is the guest's net.Conn over a Stream: writes go to the host's up
// ByteStream through a bytestream.Writer, reads come from inbound.
type conn struct {
	in            *inbound
	stream        Stream
	network       string
	local, remote net.Addr

	ctx    context.Context // canceled by Close
	cancel context.CancelFunc

	wmu     sync.Mutex // serialises writes
	w       *bytestream.Writer
	wctx    context.Context
	wcancel context.CancelCauseFunc
	wended  bool
	werr    error

	dmu     sync.Mutex // write deadline
	wdl     time.Time
	wtimer  *time.Timer
	writing bool

	closeOnce sync.Once
}

var _ interface {
	net.Conn
	CloseWrite() error
} = (*conn)(nil)

func newConn(in *inbound, network string, r ConnectResult) (*conn, error) {
	switch r.Which() {
	case ConnectResult_Which_failure:
		in.close()
		f, _ := r.Failure()
		return nil, fromFailure(f)
	case ConnectResult_Which_connection:
	default:
		in.close()
		return nil, newError(KindOther, "unknown result %d", r.Which())
	}
	cr, err := r.Connection()
	if err != nil {
		in.close()
		return nil, newError(KindOther, "decode result: %v", err)
	}
	la, _ := cr.LocalAddress()
	ra, _ := cr.RemoteAddress()
	c := &conn{
		in:      in,
		stream:  cr.Stream().AddRef(),
		network: network,
		local:   parseAddr(network, la),
		remote:  parseAddr(network, ra),
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.wctx, c.wcancel = context.WithCancelCause(context.Background())
	c.w = bytestream.NewWriter(c.wctx, cr.Up(), nil) // takes its own reference
	in.setFetch(c.fetchReason)
	return c, nil
}

func (c *conn) LocalAddr() net.Addr  { return c.local }
func (c *conn) RemoteAddr() net.Addr { return c.remote }

func (c *conn) opError(op string, err error) error {
	return &net.OpError{Op: op, Net: c.network, Source: c.local, Addr: c.remote, Err: err}
}

// Read reads the bytes the remote end sent. io.EOF is its clean end;
// a reset or other failure on the host is an *Error.
func (c *conn) Read(p []byte) (int, error) {
	n, err := c.in.read(p)
	if err != nil && err != io.EOF {
		err = c.opError("read", err)
	}
	return n, err
}

// Write sends p within the stream's flow-control window: it waits while
// the window is full. A Write that times out fails every later Write
// (as with crypto/tls): the bytes in flight are unknown.
func (c *conn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	switch {
	case c.ctx.Err() != nil:
		return 0, c.opError("write", net.ErrClosed)
	case c.wended:
		return 0, c.opError("write", newError(KindClosed, "write after CloseWrite"))
	case c.werr != nil:
		return 0, c.werr
	}
	if err := c.armWrite(); err != nil {
		return 0, c.opError("write", err)
	}
	n, err := c.w.Write(p)
	if err == nil {
		err = c.w.Flush()
	}
	c.disarmWrite()
	if err != nil {
		c.werr = c.opError("write", c.writeError(err))
		return n, c.werr
	}
	return n, nil
}

// writeError types a failed write.
func (c *conn) writeError(err error) error {
	switch cause := context.Cause(c.wctx); {
	case cause == errWriteTimeout:
		return errWriteTimeout
	case c.ctx.Err() != nil:
		return net.ErrClosed
	case cause != nil:
		return cause
	}
	e := asError(err) // the host's exception: classify its text
	if e.Kind == KindCanceled || e.Kind == KindOther && capnp.IsDisconnected(err) {
		e.Kind = KindClosed
	}
	return e
}

// armWrite starts the write deadline's timer, if any.
func (c *conn) armWrite() error {
	c.dmu.Lock()
	defer c.dmu.Unlock()
	c.writing = true
	if c.wdl.IsZero() {
		return nil
	}
	d := time.Until(c.wdl)
	if d <= 0 {
		c.writing = false
		return errWriteTimeout
	}
	c.wtimer = time.AfterFunc(d, func() { c.wcancel(errWriteTimeout) })
	return nil
}

func (c *conn) disarmWrite() {
	c.dmu.Lock()
	defer c.dmu.Unlock()
	c.writing = false
	if c.wtimer != nil {
		c.wtimer.Stop()
		c.wtimer = nil
	}
}

// CloseWrite ends the guest's direction: the host half-closes the
// socket once it has written every byte before it.
func (c *conn) CloseWrite() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.wended {
		return nil
	}
	c.wended = true
	if err := c.w.Close(); err != nil {
		return c.opError("close", c.writeError(err))
	}
	return nil
}

// Close closes the stream. Bytes already written are handed to the host
// first (for at most lingerTimeout) unless a Write is blocked, which
// Close cancels; the host then sends them and a FIN, and closes its
// socket without a reset (Options.Linger).
func (c *conn) Close() error {
	first := false
	c.closeOnce.Do(func() {
		first = true
		c.dmu.Lock()
		if c.writing {
			c.wcancel(net.ErrClosed)
		}
		c.dmu.Unlock()
		c.cancel()
		c.in.close()
		c.wmu.Lock()
		if !c.wended {
			c.wended = true
			t := time.AfterFunc(lingerTimeout, func() { c.wcancel(net.ErrClosed) })
			c.w.Close()
			t.Stop()
		}
		c.wcancel(net.ErrClosed)
		c.wmu.Unlock()
		_, release := c.stream.Close(context.Background(), nil)
		release()
		c.stream.Release()
	})
	if !first {
		return c.opError("close", net.ErrClosed)
	}
	return nil
}

// SetDeadline sets both deadlines.
func (c *conn) SetDeadline(t time.Time) error {
	c.SetReadDeadline(t)
	return c.SetWriteDeadline(t)
}

// SetReadDeadline makes a blocked or later Read fail with a timeout
// (errors.Is(err, os.ErrDeadlineExceeded)) once t has passed; the zero
// time clears it.
func (c *conn) SetReadDeadline(t time.Time) error {
	c.in.setDeadline(t)
	return nil
}

// SetWriteDeadline makes a Write fail with a timeout once t has passed.
func (c *conn) SetWriteDeadline(t time.Time) error {
	c.dmu.Lock()
	defer c.dmu.Unlock()
	c.wdl = t
	if c.wtimer != nil {
		c.wtimer.Stop()
		c.wtimer = nil
	}
	if c.writing && !t.IsZero() {
		c.wtimer = time.AfterFunc(time.Until(t), func() { c.wcancel(errWriteTimeout) })
	}
	return nil
}

// fetchReason asks the host why the down direction ended.
func (c *conn) fetchReason() error {
	s := c.stream.AddRef()
	defer s.Release()
	f, release := s.EndReason(c.ctx, nil)
	defer release()
	res, err := f.Struct()
	if err != nil {
		return callError(c.ctx, err)
	}
	r, err := res.Reason()
	if err != nil {
		return newError(KindOther, "decode end reason: %v", err)
	}
	if r.Which() == EndReason_Which_failure {
		f, _ := r.Failure()
		return fromFailure(f)
	}
	return io.EOF
}

// inbound is the guest's down ByteStream server: each write call waits
// until Read has taken all its bytes, so the guest holds at most one
// call's bytes per stream (plus what the connection's inbound limit
// allows in queue), and a reader that stalls stalls the host's sender.
type inbound struct {
	mu       sync.Mutex
	chunk    []byte        // the current write call's bytes not yet read
	consumed chan struct{} // closed when chunk is read or the stream closed
	ended    bool          // end() arrived
	gone     bool          // every reference was released without end()
	closed   bool          // closed locally
	reason   error         // after end: io.EOF or why not; nil until known
	fetching bool
	fetch    func() error  // asks the host for reason
	notify   chan struct{} // closed and replaced on every change
	deadline time.Time
}

func newInbound() *inbound { return &inbound{notify: make(chan struct{})} }

func (in *inbound) broadcastLocked() {
	close(in.notify)
	in.notify = make(chan struct{})
}

func (in *inbound) setFetch(f func() error) {
	in.mu.Lock()
	in.fetch = f
	in.broadcastLocked()
	in.mu.Unlock()
}

func (in *inbound) setDeadline(t time.Time) {
	in.mu.Lock()
	in.deadline = t
	in.broadcastLocked()
	in.mu.Unlock()
}

func (in *inbound) close() {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.closed = true
	in.chunk = nil
	if in.consumed != nil {
		close(in.consumed)
		in.consumed = nil
	}
	in.broadcastLocked()
}

// Write implements bytestream.ByteStream_Server.
func (in *inbound) Write(ctx context.Context, call bytestream.ByteStream_write) error {
	b, err := call.Args().Bytes()
	if err != nil {
		return fmt.Errorf("netcap: decode write: %w", err)
	}
	in.mu.Lock()
	switch {
	case in.closed:
		// Closed here: discard, as a closed socket would, but do not fail
		// the host's pump, which would close the socket before Close has
		// handed over the guest's last bytes.
		in.mu.Unlock()
		return nil
	case in.ended:
		in.mu.Unlock()
		return errors.New("netcap: write after end")
	case len(b) == 0:
		in.mu.Unlock()
		return nil
	}
	// Read copies straight from the call's message, valid until we return.
	done := make(chan struct{})
	in.chunk, in.consumed = b, done
	in.broadcastLocked()
	in.mu.Unlock()
	select {
	case <-done:
	case <-ctx.Done():
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.consumed == done {
		in.chunk, in.consumed = nil, nil
	}
	if in.closed {
		return nil
	}
	return ctx.Err()
}

// End implements bytestream.ByteStream_Server.
func (in *inbound) End(ctx context.Context, call bytestream.ByteStream_end) error {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.ended = true
	in.broadcastLocked()
	return nil
}

// Shutdown notes that the host released the stream without end(): its
// connection is gone or it dropped the stream.
func (in *inbound) Shutdown() {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.gone = true
	in.broadcastLocked()
}

func (in *inbound) read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		in.mu.Lock()
		switch {
		case in.closed:
			in.mu.Unlock()
			return 0, net.ErrClosed
		case len(in.chunk) > 0:
			n := copy(p, in.chunk)
			in.chunk = in.chunk[n:]
			if len(in.chunk) == 0 {
				in.chunk = nil
				close(in.consumed)
				in.consumed = nil
			}
			in.mu.Unlock()
			return n, nil
		case in.ended && in.reason != nil:
			err := in.reason
			in.mu.Unlock()
			return 0, err
		case in.ended && !in.fetching && in.fetch != nil:
			in.fetching = true
			go func(fetch func() error) {
				err := fetch()
				in.mu.Lock()
				in.reason = err
				in.broadcastLocked()
				in.mu.Unlock()
			}(in.fetch)
		case in.gone && !in.ended:
			in.mu.Unlock()
			return 0, newError(KindReset, "the host dropped the stream (connection lost?)")
		}
		dl, ch := in.deadline, in.notify
		in.mu.Unlock()
		var tc <-chan time.Time
		if !dl.IsZero() {
			d := time.Until(dl)
			if d <= 0 {
				return 0, newError(KindTimeout, "read deadline exceeded")
			}
			if timer == nil {
				timer = time.NewTimer(d)
			} else {
				timer.Reset(d)
			}
			tc = timer.C
		}
		select {
		case <-ch:
		case <-tc:
		}
	}
}
