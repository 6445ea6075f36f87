package bench

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"time"
)

// The raw floor: each message is a 4-byte little-endian length and that
// many payload bytes; the server writes every message back. Both sides
// write a message with one Write and read through a bufio.Reader, so the
// floor is one write system call per message each way and no RPC.

// serveRaw echoes messages on c until it fails.
func serveRaw(c net.Conn) {
	br := bufio.NewReaderSize(c, 64<<10)
	buf := make([]byte, 4+64)
	for {
		if _, err := io.ReadFull(br, buf[:4]); err != nil {
			return
		}
		n := int(binary.LittleEndian.Uint32(buf))
		if 4+n > cap(buf) {
			buf = append(buf[:4], make([]byte, n)...)
		}
		buf = buf[:4+n]
		if _, err := io.ReadFull(br, buf[4:]); err != nil {
			return
		}
		if _, err := c.Write(buf); err != nil {
			return
		}
	}
}

type rawSession struct {
	c       net.Conn
	br      *bufio.Reader
	in      []byte
	m       meter
	cleanup func()
}

func newRawSession(c net.Conn, m meter, cleanup func()) *rawSession {
	return &rawSession{c: c, br: bufio.NewReaderSize(c, 64<<10), m: m, cleanup: cleanup}
}

func (s *rawSession) close() error { s.cleanup(); return nil }

func frame(size int) []byte {
	b := payload(4 + size)
	binary.LittleEndian.PutUint32(b, uint32(size))
	return b
}

// read reads one echoed message of size bytes.
func (s *rawSession) read(size int) error {
	if cap(s.in) < 4+size {
		s.in = make([]byte, 4+size)
	}
	in := s.in[:4+size]
	if _, err := io.ReadFull(s.br, in[:4]); err != nil {
		return err
	}
	if n := int(binary.LittleEndian.Uint32(in)); n != size {
		return fmt.Errorf("raw echo of %d bytes; want %d", n, size)
	}
	_, err := io.ReadFull(s.br, in[4:])
	return err
}

func (s *rawSession) lat(ctx context.Context, n, size int) (result, error) {
	out := frame(size)
	s.in = make([]byte, 4+size)
	r, err := s.m.timedCalls(n, func() error {
		if _, err := s.c.Write(out); err != nil {
			return err
		}
		return s.read(size)
	})
	if err != nil {
		return r, err
	}
	return r, ctx.Err()
}

// flight keeps k messages in flight: a writer goroutine sends while a
// semaphore has room, and this goroutine reads the echoes.
func (s *rawSession) flight(ctx context.Context, n, k, size int) (result, error) {
	out := frame(size)
	sem := make(chan struct{}, k)
	werr := make(chan error, 1)
	s.in = make([]byte, 4+size)
	r := result{calls: n}
	mk, err := s.m.start()
	if err != nil {
		return r, err
	}
	stop := make(chan struct{})
	start := time.Now()
	go func() {
		for range n {
			select {
			case sem <- struct{}{}:
			case <-stop:
				werr <- nil
				return
			}
			if _, err := s.c.Write(out); err != nil {
				werr <- err
				return
			}
		}
		werr <- nil
	}()
	for range n {
		if err := s.read(size); err != nil {
			close(stop)
			<-werr
			return r, err
		}
		<-sem
	}
	r.elapsed = time.Since(start)
	if err := <-werr; err != nil {
		return r, err
	}
	return r, s.m.stop(mk, &r)
}

func (s *rawSession) pipe2(context.Context, int) (result, error) {
	return result{}, errNotApplicable
}
