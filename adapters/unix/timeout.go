package unix

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"sync/atomic"
	"time"

	"github.com/captp-go/captp/core"
)

// An Option tunes how Dial and Serve drive a connection's socket. Options
// are about the byte stream only; protocol limits are core.Options.Limits.
type Option func(*config)

type config struct {
	frameTimeout time.Duration
	idleTimeout  time.Duration
	// socketBuffer is the SO_SNDBUF/SO_RCVBUF size; bufferSet says
	// WithSocketBuffer chose it (else Unix sockets get the default).
	socketBuffer int
	bufferSet    bool
}

// DefaultSocketBuffer is the send and receive buffer size Dial, Serve and
// NewConn give a Unix domain socket unless WithSocketBuffer says
// otherwise. Linux's default (208 KiB) is smaller than one 256 KiB
// ByteStream chunk, so every large frame took several writes, each
// waiting for the reader to drain the socket, and several reads; with
// room for a few chunks a frame goes in one writev and comes out in one
// read, and a 1 GiB stream runs markedly faster (internal/bench/NOTES.md,
// "Streams"). The kernel caps it at net.core.wmem_max and rmem_max.
const DefaultSocketBuffer = 1 << 20

// WithSocketBuffer sets the socket's send and receive buffers to n bytes
// (SO_SNDBUF and SO_RCVBUF; the kernel may cap or round it), on Unix
// domain and TCP sockets alike. Zero keeps the kernel's defaults, which
// for TCP means its automatic tuning; without this option Unix domain
// sockets get DefaultSocketBuffer and TCP sockets keep the kernel's
// tuning.
func WithSocketBuffer(n int) Option {
	return func(c *config) { c.socketBuffer, c.bufferSet = max(n, 0), true }
}

// sizeBuffers applies the socket buffer size. It is best effort: a
// socket that refuses still works, with the kernel's buffers.
func (cf config) sizeBuffers(c net.Conn) {
	n := cf.socketBuffer
	if !cf.bufferSet {
		if _, ok := c.(*net.UnixConn); !ok {
			return
		}
		n = DefaultSocketBuffer
	}
	if n <= 0 {
		return
	}
	if s, ok := c.(interface {
		SetReadBuffer(int) error
		SetWriteBuffer(int) error
	}); ok {
		_ = s.SetReadBuffer(n)
		_ = s.SetWriteBuffer(n)
	}
}

func newConfig(options []Option) config {
	var c config
	for _, o := range options {
		if o != nil {
			o(&c)
		}
	}
	return c
}

// WithFrameTimeout disconnects a peer that has begun sending a message
// frame and then sends nothing more for d. Zero (the default) waits
// forever, as the C++ reference does.
//
// Peers write each frame in one go, so the only pause inside a frame is
// the network's; a peer that stalls mid-frame is broken or hostile (a
// "slowloris" holding a half-read frame, and the connection, open). The
// timer restarts whenever bytes arrive, so a large frame on a slow link is
// fine as long as it keeps moving. Between frames no timer runs: Cap'n
// Proto connections may legitimately stay quiet for hours (see
// WithIdleTimeout).
//
// When it fires the connection ends as on a read error: Conn.Err reports
// a *StallError, every pending call fails as disconnected, and the socket
// is closed (the core sends no Abort for read errors).
func WithFrameTimeout(d time.Duration) Option {
	return func(c *config) { c.frameTimeout = d }
}

// WithIdleTimeout disconnects a peer that sends nothing at all for d, in
// or between frames. Zero (the default) disables it. Cap'n Proto has no
// keep-alive message, so only use it where the peer is known to call at
// least every d; to catch stalled frames only, use WithFrameTimeout.
func WithIdleTimeout(d time.Duration) Option {
	return func(c *config) { c.idleTimeout = d }
}

// StallError is the read error of a connection closed by WithFrameTimeout
// or WithIdleTimeout.
type StallError struct {
	// Limit is the timeout that was exceeded.
	Limit time.Duration
	// InFrame reports that the peer stalled in the middle of a frame (it
	// had sent FrameBytes of it).
	InFrame    bool
	FrameBytes uint64
}

func (e *StallError) Error() string {
	if e.InFrame {
		return fmt.Sprintf("unix: peer sent nothing for %v in the middle of a frame (after %d bytes of it)", e.Limit, e.FrameBytes)
	}
	return fmt.Sprintf("unix: peer sent nothing for %v", e.Limit)
}

// Timeout reports true, like the deadline error it replaces.
func (e *StallError) Timeout() bool { return true }

// wrap applies the config to c.
func (cf config) wrap(c net.Conn) net.Conn {
	cf.sizeBuffers(c)
	sc := newSocketConn(c)
	if cf.frameTimeout <= 0 && cf.idleTimeout <= 0 {
		return sc
	}
	dc := &deadlineConn{Conn: sc, raw: c, frame: cf.frameTimeout, idle: cf.idleTimeout}
	if tw, ok := sc.(core.TryWriter); ok {
		return &deadlineTryConn{deadlineConn: dc, tw: tw}
	}
	return dc
}

// vectorConn gives a socket the core's optional core.BuffersWriter, so that
// a frame written from several buffers (a large message's segments, the
// small frames around it) costs one writev, and keeps the socket's
// half-close, which the core uses after an Abort.
type vectorConn struct{ net.Conn }

func (c vectorConn) WriteBuffers(bufs [][]byte) (int64, error) { return writeBuffers(c.Conn, bufs) }
func (c vectorConn) CloseWrite() error                         { return closeWrite(c.Conn) }

// NetConn returns the socket (or TLS connection) underneath, as
// tls.Conn.NetConn does: adapters/secure finds the peer's identity there.
func (c vectorConn) NetConn() net.Conn { return c.Conn }

func writeBuffers(c net.Conn, bufs [][]byte) (int64, error) {
	nb := net.Buffers(bufs)
	return nb.WriteTo(c)
}

func closeWrite(c net.Conn) error {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.ErrUnsupported
}

// deadlineConn sets a read deadline before each Read from what it has
// seen of the frame structure. Only the core's reader goroutine calls
// Read. It reads and writes through Conn, the socket as newSocketConn
// wraps it (raw system calls on Linux); deadlines reach the socket
// through it too.
type deadlineConn struct {
	net.Conn
	raw         net.Conn // the socket itself, for vectored writes and NetConn
	frame, idle time.Duration
	fs          frameScanner
	armed       bool // a read deadline is set
	// interrupted holds a deadline set from outside (the core interrupts
	// a caller's Read with one): Read keeps it rather than arming its own.
	interrupted atomic.Bool
}

// SetReadDeadline lets the core interrupt a Read; a zero t clears that.
// Read arms its own stall deadlines only while none is set this way.
func (c *deadlineConn) SetReadDeadline(t time.Time) error {
	c.interrupted.Store(!t.IsZero())
	return c.Conn.SetReadDeadline(t)
}

func (c *deadlineConn) WriteBuffers(bufs [][]byte) (int64, error) { return writeBuffers(c.raw, bufs) }
func (c *deadlineConn) CloseWrite() error                         { return closeWrite(c.raw) }
func (c *deadlineConn) NetConn() net.Conn                         { return c.raw }

// deadlineTryConn is a deadlineConn over a socket that can write without
// waiting: timeouts only concern reads, so it keeps core.TryWriter, with
// which the core's read loop sends the Returns of a batch of calls while
// it still serves the rest.
type deadlineTryConn struct {
	*deadlineConn
	tw core.TryWriter
}

func (c *deadlineTryConn) TryWrite(p []byte) (int, error) { return c.tw.TryWrite(p) }

func (c *deadlineConn) Read(p []byte) (int, error) {
	if c.interrupted.Load() {
		return 0, os.ErrDeadlineExceeded
	}
	d := c.idle
	if c.fs.inFrame() && c.frame > 0 && (d <= 0 || c.frame < d) {
		d = c.frame
	}
	switch {
	case d > 0:
		if err := c.Conn.SetReadDeadline(time.Now().Add(d)); err != nil {
			return 0, err
		}
		c.armed = true
	case c.armed:
		if err := c.Conn.SetReadDeadline(time.Time{}); err != nil {
			return 0, err
		}
		c.armed = false
	}
	if c.interrupted.Load() {
		// Interrupted while arming: our deadline may have replaced it.
		return 0, os.ErrDeadlineExceeded
	}
	n, err := c.Conn.Read(p)
	c.fs.scan(p[:n])
	if err != nil && d > 0 && errors.Is(err, os.ErrDeadlineExceeded) {
		err = &StallError{Limit: d, InFrame: c.fs.inFrame(), FrameBytes: c.fs.seen}
	}
	return n, err
}

// frameScanner follows Cap'n Proto stream framing (see core's frame
// reader) over the bytes read, only to know whether the stream is between
// frames. It allocates nothing and validates nothing: the core rejects bad
// frames.
type frameScanner struct {
	word  [4]byte // partial little-endian uint32 of the header
	nword int     // bytes of it so far
	// nseg: segments announced; sizes: segment sizes read so far; pad:
	// header padding still to skip; body: body bytes still to come.
	nseg, sizes, pad, body uint64
	header                 bool   // reading the header (after the first byte)
	seen                   uint64 // bytes of the current frame
}

func (s *frameScanner) inFrame() bool { return s.seen > 0 }

func (s *frameScanner) scan(p []byte) {
	for len(p) > 0 {
		if s.body > 0 && !s.header {
			n := uint64(len(p))
			if n > s.body {
				n = s.body
			}
			s.body -= n
			s.seen += n
			p = p[n:]
			if s.body == 0 {
				s.seen = 0 // frame complete
			}
			continue
		}
		if s.pad > 0 {
			s.pad--
			s.seen++
			p = p[1:]
			if s.pad == 0 {
				s.endHeader()
			}
			continue
		}
		// Header words: segment count - 1, then each segment's size.
		s.header = true
		s.word[s.nword] = p[0]
		s.nword++
		s.seen++
		p = p[1:]
		if s.nword < 4 {
			continue
		}
		v := uint64(binary.LittleEndian.Uint32(s.word[:]))
		s.nword = 0
		if s.nseg == 0 {
			s.nseg = v + 1
			s.sizes, s.body = 0, 0
			continue
		}
		s.body += v * 8
		s.sizes++
		if s.sizes == s.nseg {
			if s.nseg%2 == 0 {
				s.pad = 4 // pad the header to a word
			} else {
				s.endHeader()
			}
		}
	}
}

// endHeader moves from the header to the body.
func (s *frameScanner) endHeader() {
	s.header = false
	s.nseg, s.sizes = 0, 0
	if s.body == 0 {
		s.seen = 0 // a frame of empty segments is complete
	}
}
