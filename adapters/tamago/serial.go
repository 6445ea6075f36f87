package tamago

import (
	"errors"
	"runtime"
	"sync"
	"time"
)

// UART is the byte-level API of a serial port. tamago's
// soc/intel/uart.UART implements it.
//
// Serial uses it rather than the UART's own Read and Write, which in
// tamago v1.26.0 report one byte too few when they fill the whole buffer.
type UART interface {
	// Tx transmits one byte, waiting for room in the transmitter.
	Tx(c byte)
	// Rx returns a received byte, or ok false when none is waiting.
	Rx() (c byte, ok bool)
}

// SerialOptions tune how a Serial polls an empty receiver. The zero value
// is valid.
type SerialOptions struct {
	// Spins is how many empty polls yield the processor
	// (runtime.Gosched) before the reader starts sleeping: bytes of a
	// message arrive back to back, and a sleep between two of them would
	// cap the line's speed. Zero means 32; negative means none.
	Spins int
	// MinSleep and MaxSleep bound the sleep between polls once the
	// spins are spent: it starts at MinSleep and doubles after each empty
	// poll up to MaxSleep; each Read starts over with the spins. Zero
	// means 50µs and 5ms.
	MinSleep, MaxSleep time.Duration
}

// ErrClosed is returned by a Serial's Read and Write after Close.
var ErrClosed = errors.New("tamago: serial port closed")

// A Serial is a byte stream over a UART: the io.ReadWriteCloser that
// core.NewConn takes. Reads are polled (a UART without interrupts never
// signals), first yielding then sleeping with exponential back-off, so an
// idle line costs a poll every MaxSleep (boards/microvm halts the
// processor in between). Close unblocks a pending Read within one sleep.
// Writes wait for the transmitter byte by byte, in the UART's own Tx.
//
// A serial line has no end-of-stream and no connection: bytes written
// before the peer listens may be lost (QEMU's -chardev socket with
// wait=on, or a client-mode socket, avoids that) and a peer that goes
// away is never noticed. Whoever owns the line owns its liveness; the host
// bridge (captp host) owns the QEMU process and ends it with the
// connection.
type Serial struct {
	u    UART
	opts SerialOptions

	rmu, wmu  sync.Mutex // one reader, one writer at a time
	closeOnce sync.Once
	closed    chan struct{}
}

// NewSerial returns a Serial on u; opts may be nil.
func NewSerial(u UART, opts *SerialOptions) *Serial {
	s := &Serial{u: u, closed: make(chan struct{})}
	if opts != nil {
		s.opts = *opts
	}
	if s.opts.Spins == 0 {
		s.opts.Spins = 32
	}
	if s.opts.MinSleep <= 0 {
		s.opts.MinSleep = 50 * time.Microsecond
	}
	if s.opts.MaxSleep < s.opts.MinSleep {
		s.opts.MaxSleep = max(5*time.Millisecond, s.opts.MinSleep)
	}
	return s
}

// Read reads the bytes waiting in the UART, at least one, waiting for the
// first as SerialOptions say.
func (s *Serial) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	s.rmu.Lock()
	defer s.rmu.Unlock()
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	spins, sleep := 0, s.opts.MinSleep
	for {
		select {
		case <-s.closed:
			return 0, ErrClosed
		default:
		}
		n := 0
		for n < len(p) {
			c, ok := s.u.Rx()
			if !ok {
				break
			}
			p[n] = c
			n++
		}
		if n > 0 {
			return n, nil
		}
		if spins < s.opts.Spins {
			spins++
			runtime.Gosched()
			continue
		}
		if timer == nil {
			timer = time.NewTimer(sleep)
		} else {
			timer.Reset(sleep)
		}
		select {
		case <-s.closed:
			return 0, ErrClosed
		case <-timer.C:
		}
		sleep = min(2*sleep, s.opts.MaxSleep)
	}
}

// Write transmits p. It returns ErrClosed, having written nothing, after
// Close.
func (s *Serial) Write(p []byte) (int, error) {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	select {
	case <-s.closed:
		return 0, ErrClosed
	default:
	}
	for _, c := range p {
		s.u.Tx(c)
	}
	return len(p), nil
}

// Close makes pending and later Reads and Writes return ErrClosed. The
// UART itself stays as it is.
func (s *Serial) Close() error {
	s.closeOnce.Do(func() { close(s.closed) })
	return nil
}
