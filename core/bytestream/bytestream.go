// Package bytestream carries a stream of bytes over Cap'n Proto RPC: the
// ByteStream interface (bytestream.capnp), a Writer that sends an
// io.Writer's bytes to a ByteStream capability with several calls in
// flight, and NewServer, which exposes an io.Writer as one.
//
// Flow control bounds the stream end to end. The writer's calls are
// streaming calls (`-> stream`): each waits only when its object's window
// of bytes in flight is full (see package flow), the server handles one
// call at a time and acknowledges it once its bytes are written, and so a
// slow receiver slows the sender while neither side holds more than the
// window.
package bytestream

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/flowcontrol"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/flow"
)

// DefaultChunkSize is the most bytes a Writer sends in one write call.
// Large enough that per-call costs vanish against copying the bytes, and
// that calls of at least 64 KiB are written from their messages without
// another copy; small enough that several fit a flow-control window.
const DefaultChunkSize = 256 << 10

// WriterOptions configures a Writer. The zero value (or nil) is valid.
type WriterOptions struct {
	// ChunkSize is the most bytes per write call; zero means
	// DefaultChunkSize. Smaller writes are gathered up to it.
	ChunkSize int
	// Flow is the flow control used when the capability has none of its
	// own: it is not imported by a captp connection and its client has
	// no limiter set. Zero fields take flow.Defaults.
	Flow flow.Config
}

// A Writer writes to a ByteStream capability. Its writes are streaming
// calls kept in flight within the capability's flow-control window: Write
// returns once its bytes are sent or gathered, and waits only while the
// window is full. An error from any call fails every later Write, Flush
// and Close. A Writer is not safe for concurrent use.
type Writer struct {
	ctx   context.Context
	bs    ByteStream // the caller's reference, until start replaces it
	own   ByteStream // our reference, with its own limiter
	chunk int
	flow  flow.Config
	buf   []byte
	err   error
	done  bool
	// pending are the write calls not yet released, oldest first. The
	// Writer keeps them itself rather than through go-capnp's
	// SendStreamCall, which starts a goroutine per call only to wait for
	// its Return and release it: a send checks the calls that have
	// returned for errors and releases them in batches (see reap), so a
	// stream costs no goroutine per chunk, and their Finish messages go
	// out in the same write as the next call.
	pending []pendingWrite
	head    int // pending[:head] are released
}

// pendingWrite is a write call in flight.
type pendingWrite struct {
	call core.PendingCall
}

// NewWriter returns a Writer that sends to bs. It takes its own reference
// to bs, so the caller may release bs at once. ctx bounds the whole
// stream: every call made for it. Close must be called to end the stream
// and release the Writer's reference.
func NewWriter(ctx context.Context, bs ByteStream, opts *WriterOptions) *Writer {
	if opts == nil {
		opts = &WriterOptions{}
	}
	chunk := opts.ChunkSize
	if chunk <= 0 {
		chunk = DefaultChunkSize
	}
	return &Writer{ctx: ctx, bs: bs.AddRef(), chunk: chunk, flow: opts.Flow}
}

// start resolves the capability and chooses its flow control: the
// object's limiter when a captp connection imported it, a limiter the
// caller set, or one of the Writer's own, so that what is in flight is
// always bounded (unless flow control is configured Off).
func (w *Writer) start() error {
	if w.own.IsValid() || w.err != nil {
		return w.err
	}
	bs := w.bs
	w.bs = ByteStream{}
	defer bs.Release()
	if err := bs.Resolve(w.ctx); err != nil {
		return fmt.Errorf("bytestream: resolve the stream: %w", err)
	}
	w.own = bs.AddRef()
	switch lim := core.FlowLimiterOf(capnp.Client(w.own)); {
	case lim != nil:
		w.own.SetFlowLimiter(lim)
	case bs.GetFlowLimiter() != flowcontrol.NopLimiter:
		w.own.SetFlowLimiter(bs.GetFlowLimiter())
	default:
		if lim := flow.NewLimiter(w.flow); lim != nil {
			w.own.SetFlowLimiter(lim)
		}
	}
	return nil
}

// Write sends p, gathering writes smaller than the chunk size. It returns
// the first error of the stream, which may come from an earlier call.
func (w *Writer) Write(p []byte) (int, error) {
	if w.done {
		return 0, errors.New("bytestream: write after Close")
	}
	n := 0
	for len(p) > 0 {
		if w.err != nil {
			return n, w.err
		}
		if len(w.buf) == 0 && len(p) >= w.chunk {
			// Whole chunks go straight from p: no copy into buf.
			if err := w.send(p[:w.chunk]); err != nil {
				return n, err
			}
			p, n = p[w.chunk:], n+w.chunk
			continue
		}
		if w.buf == nil {
			w.buf = make([]byte, 0, w.chunk)
		}
		k := copy(w.buf[len(w.buf):w.chunk], p)
		w.buf = w.buf[:len(w.buf)+k]
		p, n = p[k:], n+k
		if len(w.buf) == w.chunk {
			if err := w.Flush(); err != nil {
				return n, err
			}
		}
	}
	return n, w.err
}

// Flush sends the bytes gathered so far.
func (w *Writer) Flush() error {
	if w.err != nil || len(w.buf) == 0 {
		return w.err
	}
	err := w.send(w.buf)
	w.buf = w.buf[:0]
	return err
}

// send makes one write call; b may be reused when it returns (the bytes
// are copied into the call's message, or already written to the
// transport).
func (w *Writer) send(b []byte) error {
	if err := w.start(); err != nil {
		w.err = err
		return err
	}
	// Releasing returned calls first puts their Finish messages in the
	// same write as this call.
	if err := w.reap(false); err != nil {
		return err
	}
	// Over a captp connection the call is written straight from b (the
	// core sets the field and returns once b is in the transport).
	ctx := core.WithDataReference(w.ctx, 0, b)
	call := core.Call(ctx, capnp.Client(w.own), capnp.Send{
		Method:   writeMethod,
		ArgsSize: capnp.ObjectSize{PointerCount: 1},
		PlaceArgs: func(s capnp.Struct) error {
			p := ByteStream_write_Params(s)
			if p.HasBytes() {
				return nil
			}
			return p.SetBytes(b)
		},
	})
	w.pending = append(w.pending, pendingWrite{call})
	if isResolved(call) {
		w.check(call) // failed at once (the connection is gone, say)
	}
	return w.err
}

// writeMethod is ByteStream.write, as the generated client names it.
var writeMethod = capnp.Method{
	InterfaceID:   ByteStream_TypeID,
	MethodID:      0,
	InterfaceName: "bytestream.capnp:ByteStream",
	MethodName:    "write",
}

// reap records the first failure among the write calls that have
// returned and releases them, oldest first; with wait it waits for all of
// them. Calls return in order (the server handles them one at a time), so
// it stops at the first that has not. Without wait it releases only once
// reapBatch calls have returned: each release queues a Finish, and the
// first one wakes the connection's writer, so releasing them together
// costs one wake-up and one write instead of one per chunk.
func (w *Writer) reap(wait bool) error {
	done := 0
	for _, p := range w.pending[w.head:] {
		if !isResolved(p.call) {
			break
		}
		w.check(p.call)
		done++
	}
	if !wait && done < reapBatch {
		return w.err
	}
	for ; w.head < len(w.pending); w.head++ {
		p := w.pending[w.head]
		switch {
		case done > 0:
			done--
		case wait:
			<-p.call.Done() // the call is bound by w.ctx, like the stream
			w.check(p.call)
		default:
			w.compact()
			return w.err
		}
		p.call.Release()
		w.pending[w.head] = pendingWrite{}
	}
	w.compact()
	return w.err
}

// check records the failure of a returned write call, if it is the first.
func (w *Writer) check(call core.PendingCall) {
	if _, err := call.Wait(w.ctx); err != nil && w.err == nil {
		w.err = fmt.Errorf("bytestream: write: %w", err)
	}
}

// reapBatch is how many returned write calls a Writer releases at once.
const reapBatch = 8

// isResolved reports whether call has its result.
func isResolved(call core.PendingCall) bool {
	select {
	case <-call.Done():
		return true
	default:
		return false
	}
}

// compact moves the calls in flight to the front of pending once the
// reaped ones make up half of it, so the queue reuses its array.
func (w *Writer) compact() {
	if w.head == 0 || w.head*2 < len(w.pending) {
		return
	}
	n := copy(w.pending, w.pending[w.head:])
	clear(w.pending[n:])
	w.pending, w.head = w.pending[:n], 0
}

// Close sends what is gathered, ends the stream and waits until the
// receiver has handled every write. It returns the stream's first error.
func (w *Writer) Close() error {
	if w.done {
		return w.err
	}
	w.done = true
	if w.Flush() == nil {
		w.err = w.start() // an empty stream still ends
	}
	defer w.own.Release()
	defer w.bs.Release()
	if w.err != nil {
		w.drop()
		return w.err
	}
	f, release := w.own.End(w.ctx, nil)
	_, endErr := f.Struct()
	release()
	if w.reap(true) == nil && endErr != nil {
		w.err = fmt.Errorf("bytestream: end: %w", endErr)
	}
	return w.err
}

// drop releases the calls still in flight without waiting for them: the
// stream has failed, so their results no longer matter.
func (w *Writer) drop() {
	for _, p := range w.pending[w.head:] {
		p.call.Release()
	}
	w.pending, w.head = nil, 0
}

// NewServer returns a ByteStream capability that writes the bytes it
// receives to w, in order, and calls end (if not nil) when the stream
// ends. The caller owns the returned client and must release it.
//
// Writes are handled one at a time, straight from the call's message, and
// a call is acknowledged once w.Write returns: the server buffers nothing
// itself, so a slow w slows the sender, which holds at most its window of
// calls in flight. To read the stream as an io.Reader, pass the writing
// end of an io.Pipe and close it in end.
//
// After w fails, every later write and end fail with that error.
func NewServer(w io.Writer, end func(context.Context) error) ByteStream {
	return ByteStream_ServerToClient(&streamServer{w: w, end: end})
}

type streamServer struct {
	mu    sync.Mutex // calls arrive one at a time; this keeps it so for any caller
	w     io.Writer
	end   func(context.Context) error
	err   error
	ended bool
}

func (s *streamServer) Write(ctx context.Context, call ByteStream_write) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return s.err
	}
	if s.ended {
		return errors.New("bytestream: write after end")
	}
	b, err := call.Args().Bytes()
	if err != nil {
		s.err = fmt.Errorf("bytestream: decode write: %w", err)
		return s.err
	}
	if _, err := s.w.Write(b); err != nil {
		s.err = fmt.Errorf("bytestream: write: %w", err)
	}
	return s.err
}

func (s *streamServer) End(ctx context.Context, call ByteStream_end) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return s.err
	}
	if s.ended {
		return errors.New("bytestream: end called twice")
	}
	s.ended = true
	if s.end != nil {
		if err := s.end(ctx); err != nil {
			s.err = fmt.Errorf("bytestream: end: %w", err)
		}
	}
	return s.err
}
