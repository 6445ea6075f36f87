//go:build linux

package unix

import (
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"unsafe"
)

// rawSyscallMax is the largest read or write that a socketConn makes
// with a raw system call; larger ones go through the net.Conn, where
// the system call's own cost is small next to the copy.
const rawSyscallMax = 64 << 10

// socketConn is a stream socket whose small reads and writes are raw
// system calls on its non-blocking descriptor, made through
// syscall.RawConn: Go's netpoller still waits when the socket is not
// ready, but a call that is ready skips the scheduler's system call
// bookkeeping. That bookkeeping wakes the runtime's monitor thread
// (sysmon) whenever the process has been idle, which for a process that
// waits for its peer between calls is once per call: a futex wake-up
// and two context switches. Across two processes, skipping it cut the
// CPU time of a sequential call by about 15% and raised the calls per
// second with 64 in flight by about 15% (PERFORMANCE.md).
//
// It is what vectorConn is otherwise (vectored writes, half-close,
// NetConn). One difference: the race detector does not see the kernel
// write into a read's buffer, as it does for syscall.Read; the caller
// owns the buffer throughout either way. Reads and writes each hold a lock around the shared
// arguments of the reusable function that RawConn calls back; the core
// never reads or writes from two goroutines at once, so it is never
// contended.
type socketConn struct {
	net.Conn
	rc syscall.RawConn

	rmu   sync.Mutex
	rbuf  []byte
	rn    int
	rerr  syscall.Errno
	rfunc func(fd uintptr) bool // c.readFD, bound once: no allocation per Read

	wmu   sync.Mutex
	wbuf  []byte
	wn    int
	werr  syscall.Errno
	wfunc func(fd uintptr) bool // c.writeFD
	tfunc func(fd uintptr) bool // c.tryWriteFD
}

// newSocketConn wraps a Unix domain stream socket or a TCP socket in a
// socketConn, and anything else in a vectorConn.
func newSocketConn(c net.Conn) net.Conn {
	var sc syscall.Conn
	switch s := c.(type) {
	case *net.UnixConn:
		if s.LocalAddr().Network() != "unix" { // not unixgram or unixpacket
			return vectorConn{c}
		}
		sc = s
	case *net.TCPConn:
		sc = s
	default:
		return vectorConn{c}
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return vectorConn{c}
	}
	s := &socketConn{Conn: c, rc: rc}
	s.rfunc, s.wfunc, s.tfunc = s.readFD, s.writeFD, s.tryWriteFD
	return s
}

func (c *socketConn) WriteBuffers(bufs [][]byte) (int64, error) { return writeBuffers(c.Conn, bufs) }
func (c *socketConn) CloseWrite() error                         { return closeWrite(c.Conn) }
func (c *socketConn) NetConn() net.Conn                         { return c.Conn }

// Read reads as net.Conn.Read does, with the same errors: io.EOF at the
// end of the stream, *net.OpError otherwise (net.ErrClosed once closed,
// os.ErrDeadlineExceeded past a read deadline).
func (c *socketConn) Read(p []byte) (int, error) {
	if len(p) == 0 || len(p) > rawSyscallMax {
		return c.Conn.Read(p)
	}
	c.rmu.Lock()
	defer c.rmu.Unlock()
	c.rbuf, c.rn, c.rerr = p, 0, 0
	err := c.rc.Read(c.rfunc)
	c.rbuf = nil
	switch {
	case err != nil:
		return 0, c.opError("read", err)
	case c.rerr != 0:
		return 0, c.opError("read", os.NewSyscallError("read", c.rerr))
	case c.rn == 0:
		return 0, io.EOF
	}
	return c.rn, nil
}

// readFD makes one read(2) into c.rbuf; it reports false to have the
// netpoller wait until the socket is readable.
func (c *socketConn) readFD(fd uintptr) bool {
	for {
		n, _, errno := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&c.rbuf[0])), uintptr(len(c.rbuf)))
		switch errno {
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false
		case 0:
			c.rn = int(n)
		default:
			c.rerr = errno
		}
		return true
	}
}

// Write writes all of p as net.Conn.Write does, with the same errors.
func (c *socketConn) Write(p []byte) (int, error) {
	if len(p) == 0 || len(p) > rawSyscallMax {
		return c.Conn.Write(p)
	}
	return c.rawWrite(p, c.wfunc)
}

// rawWrite writes p through the RawConn with f (writeFD or tryWriteFD).
func (c *socketConn) rawWrite(p []byte, f func(fd uintptr) bool) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.wbuf, c.wn, c.werr = p, 0, 0
	err := c.rc.Write(f)
	n := c.wn
	c.wbuf = nil
	switch {
	case err != nil:
		return n, c.opError("write", err)
	case c.werr != 0:
		return n, c.opError("write", os.NewSyscallError("write", c.werr))
	}
	return n, nil
}

// writeFD writes what is left of c.wbuf with write(2) until it is all
// written (true), the socket is full (false: the netpoller waits until
// it is writable and calls again), or the write fails (true, c.werr set).
func (c *socketConn) writeFD(fd uintptr) bool {
	for c.wn < len(c.wbuf) {
		rest := c.wbuf[c.wn:]
		n, _, errno := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&rest[0])), uintptr(len(rest)))
		switch errno {
		case 0:
			c.wn += int(n)
		case syscall.EINTR:
		case syscall.EAGAIN:
			return false
		default:
			c.werr = errno
			return true
		}
	}
	return true
}

// TryWrite writes what of p the socket takes now, without waiting for
// room in its send buffer, and returns how much (possibly 0): it
// implements core.TryWriter, with Write's errors.
func (c *socketConn) TryWrite(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if len(p) > rawSyscallMax {
		p = p[:rawSyscallMax]
	}
	return c.rawWrite(p, c.tfunc)
}

// tryWriteFD is writeFD that stops when the socket is full instead of
// having the netpoller wait.
func (c *socketConn) tryWriteFD(fd uintptr) bool {
	c.writeFD(fd)
	return true
}

// opError wraps err the way the net package wraps a socket's errors.
func (c *socketConn) opError(op string, err error) error {
	return &net.OpError{Op: op, Net: c.LocalAddr().Network(), Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
}
