package core

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/exc"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"

	"github.com/captp-go/captp/core/flow"
)

// Conn is one Cap'n Proto RPC connection over a byte stream.
//
// All protocol state (the four tables and the embargoes) lives behind one
// mutex and is changed only by short, non-blocking critical sections that
// queue outbound frames in order. Work that calls into capabilities (user
// code) is collected while the lock is held and run after it is released,
// in order, so message handling stays deterministic and re-entrancy safe.
type Conn struct {
	rwc          io.ReadWriteCloser
	log          *slog.Logger
	lim          Limits
	abortTimeout time.Duration

	// ctx is the parent of every answer's context; cancelled at shutdown.
	ctx    context.Context
	cancel context.CancelFunc

	mu        sync.Mutex // release with c.unlock(), never c.mu.Unlock()
	closing   bool       // shutdown has begun: nothing new is queued but the Abort
	err       error      // why the connection ended; nil for a clean local Close
	bootstrap capnp.Client
	restorer  Restorer // answers Bootstraps naming a service (restore.go)
	vat       *Vat     // three-party handoff (thirdparty.go); nil: Level 1/2 only

	// manual is set for a Conn driven by hand, one step at a time, with no
	// goroutines of its own (the deterministic simulation). Work that
	// would wait in a goroutine is queued in pending and run by poll.
	manual  bool
	pending []pendingWork

	questions      map[uint32]*question
	questionIDs    idAllocator
	questionsByAns map[*capnp.Answer]*question
	answers        map[uint32]*answer
	inProgress     int // answers whose call has not returned yet
	// finishOptional holds the ids of answers dropped at their Return
	// (noFinishNeeded) until the peer sends a Finish anyway or reuses the
	// id (answer.go, noFinishNeededLocked).
	finishOptional map[uint32]struct{}
	imports        map[uint32]*importEntry
	exports        map[uint32]*export
	exportIDs      idAllocator
	exportsByHook  map[*capnp.Metadata]uint32
	embargoes      map[uint32]*embargo
	provides       map[uint32]*vine // our Provides by question id (not in questions: they get no Return)
	handoffs       atomic.Int32     // pickups of thirdPartyHosted capabilities running (thirdparty.go)
	embargoIDs     idAllocator
	watches        map[context.Context]*ctxWatch // see watchCancelLocked
	flow           *flow.Pool                    // flow control shared by the imports
	// Results of retired questions kept for resultsGrace (see buryLocked).
	graveNew, graveOld []*question
	graveTimer         *time.Timer
	graveArmed         bool

	// Output. Frames queue in out; one goroutine at a time writes it:
	// the writer goroutine, or a caller writing its own Call or Return
	// directly when nobody is writing (one hand-off fewer per message).
	out        []byte        // encoded frames waiting to be written
	outLarge   []largeFrame  // segments of large frames, written from their messages
	vec        [][]byte      // reused by writeBuffers; only the writing goroutine uses it
	largeBytes int           // bytes in outLarge
	spare      []byte        // the other buffer, reused for out while one is written
	writing    bool          // a goroutine is writing; others only queue
	wakeWriter bool          // frames were queued: unlock signals the writer
	outWake    chan struct{} // capacity 1: the writer has work
	outDrained chan struct{} // made by waiters; closed after the next write
	writerStop bool          // the writer exits once out is empty
	abortSent  bool          // shutdown queued an Abort: linger before closing
	// dispatching is set while the read loop delivers calls: writes from
	// there go through the writer, so the reader never blocks on a full
	// socket (the peer may be waiting for us to read before it reads).
	dispatching atomic.Bool
	// inboundBusy is set while more input is already buffered: the peer
	// is sending faster than we handle it, and a handler that wrote
	// directly could block on a full socket instead of taking the next
	// call, so the writer goroutine writes.
	inboundBusy atomic.Bool
	// corked is set while frames wait in out for a native caller to write
	// them when it waits (corkableLocked); set under c.mu.
	corked atomic.Bool
	// readerOwes is set while Returns that the read role's holder held
	// back, because more input was buffered, wait in out for it to write
	// them once the input runs dry (claimInlineLocked); set under c.mu.
	readerOwes atomic.Bool
	// inboundHeld counts the bytes of the peer's calls whose arguments
	// are held (see Limits.MaxInboundBytes).
	inboundHeld atomic.Int64

	// tasks are table updates requested where c.mu may already be held by
	// the same goroutine (a hook shut down by go-capnp while we inspect a
	// client); they run at the next unlock. See schedule.
	taskMu       sync.Mutex
	tasks        []task
	spareTasks   []task // the last batch's array, for the next (under taskMu)
	pendingTasks atomic.Int32
	spareFx      atomic.Pointer[effects] // runTasksAndUnlock's, reused

	// read is the read role: who reads the transport (reader.go).
	read      readRole
	deadliner readDeadliner // the transport's, if it has one
	tryWriter TryWriter     // the transport's, if it has one
	// peerCalls counts the peer's calls, so that a connection the peer
	// calls on stays read by the read loop (quietLocked).
	peerCalls uint64

	shutdownOnce sync.Once
	readerDone   chan struct{}
	writerDone   chan struct{}
	done         chan struct{}
}

// Stats counts the entries of a connection's four tables and its embargoes.
// When both sides have dropped every reference, all are zero.
type Stats struct {
	Questions int
	Answers   int
	Imports   int
	Exports   int
	Embargoes int
}

// IsZero reports whether every table is empty.
func (s Stats) IsZero() bool { return s == Stats{} }

func (s Stats) String() string {
	return fmt.Sprintf("questions=%d answers=%d imports=%d exports=%d embargoes=%d",
		s.Questions, s.Answers, s.Imports, s.Exports, s.Embargoes)
}

// NewConn starts serving the Cap'n Proto RPC protocol on rwc.
// The Conn owns rwc and closes it when the connection ends; rwc.Close must
// unblock a pending Read. opts may be nil.
func NewConn(rwc io.ReadWriteCloser, opts *Options) *Conn {
	c := newConn(rwc, opts)
	go c.readLoop()
	go c.writeLoop()
	return c
}

// newConn builds a Conn without starting its goroutines. The simulation
// drives such a Conn by hand (see manual).
func newConn(rwc io.ReadWriteCloser, opts *Options) *Conn {
	if opts == nil {
		opts = &Options{}
	}
	c := &Conn{
		rwc:            rwc,
		log:            opts.Logger,
		lim:            opts.Limits.withDefaults(),
		abortTimeout:   opts.AbortTimeout,
		bootstrap:      opts.BootstrapClient,
		restorer:       opts.Restorer,
		vat:            opts.Vat,
		provides:       make(map[uint32]*vine),
		questions:      make(map[uint32]*question),
		questionsByAns: make(map[*capnp.Answer]*question),
		answers:        make(map[uint32]*answer),
		imports:        make(map[uint32]*importEntry),
		exports:        make(map[uint32]*export),
		exportsByHook:  make(map[*capnp.Metadata]uint32),
		embargoes:      make(map[uint32]*embargo),
		outWake:        make(chan struct{}, 1),
		readerDone:     make(chan struct{}),
		writerDone:     make(chan struct{}),
		done:           make(chan struct{}),
	}
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	if c.abortTimeout <= 0 {
		c.abortTimeout = time.Second
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.flow = flow.NewPool(c.lim.Flow)
	c.read.init()
	c.deadliner, _ = rwc.(readDeadliner)
	c.tryWriter, _ = rwc.(TryWriter)
	return c
}

// Transport returns the byte stream the connection runs on, as given to
// NewConn: a Network (Level 3) looks through it for the peer's
// authenticated identity.
func (c *Conn) Transport() io.ReadWriteCloser { return c.rwc }

// Bootstrap asks the peer for its bootstrap capability. The result is a
// promise: calls on it are pipelined until the peer answers. ctx bounds
// the request only, not the capability's lifetime.
func (c *Conn) Bootstrap(ctx context.Context) capnp.Client { return c.sendBootstrap(ctx, nil) }

// sendBootstrap sends a Bootstrap message; a non-nil objectID names a service
// (see Restore).
func (c *Conn) sendBootstrap(ctx context.Context, objectID []byte) capnp.Client {
	return c.requestCap(ctx, "bootstrap", nil, func(m rpccp.Message, qid uint32) error {
		b, err := m.NewBootstrap()
		if err != nil {
			return err
		}
		b.SetQuestionId(qid)
		if objectID != nil {
			return setObjectID(b, objectID)
		}
		return nil
	})
}

// requestCap sends a question whose answer is a capability (a Bootstrap,
// or a Level 3 Accept), built by build with the question's id, and
// returns that capability as a promise. onSettled, if not nil, runs once
// the question is settled (or failed).
func (c *Conn) requestCap(ctx context.Context, what string, onSettled func(), build func(m rpccp.Message, qid uint32) error) capnp.Client {
	msg, m, err := newMessage()
	if err != nil {
		return brokenClient(fmt.Errorf("captp: %s: %w", what, err))
	}
	defer msg.Release()
	c.mu.Lock()
	if c.closing {
		err := c.err
		c.unlock()
		return brokenClient(err)
	}
	q := c.newQuestionLocked(capnp.Method{})
	q.bootstrap = true
	q.onSettled = onSettled
	err = build(m, q.id)
	if err == nil {
		err = c.sendLocked(msg)
	}
	if err != nil {
		var fx effects
		c.dropQuestionLocked(&fx, q)
		c.unlock()
		fx.run()
		return brokenClient(fmt.Errorf("captp: %s: %w", what, err))
	}
	// The capability is a promise of our own rather than the answer's
	// pipeline client, so that calls racing with the Return can still
	// reach the capability after the question is finished.
	client, resolver := capnp.NewPromisedClient(&bootstrapHook{q: q})
	q.bootResolver = resolver
	q.bootSettled = &bootSettlement{done: make(chan struct{})}
	// go-capnp keeps flow control per client value: this one gets its own
	// window, drawing on the connection's budget like every import's.
	if l := c.flow.NewLimiter(); l != nil {
		client.SetFlowLimiter(l)
	}
	c.watchCancelLocked(q, ctx)
	c.unlock()
	return client
}

// bootstrapHook carries calls on the bootstrap capability until the
// peer's Return resolves it.
type bootstrapHook struct{ q *question }

func (h *bootstrapHook) Send(ctx context.Context, s capnp.Send) (*capnp.Answer, capnp.ReleaseFunc) {
	return h.q.c.sendCall(ctx, callTarget{question: h.q}, s)
}

func (h *bootstrapHook) Recv(ctx context.Context, r capnp.Recv) capnp.PipelineCaller {
	return h.q.c.forwardCall(ctx, callTarget{question: h.q}, r)
}

func (h *bootstrapHook) settledSignal() <-chan struct{} { return h.q.bootSettled.done }

func (h *bootstrapHook) isSettled() bool { return closed(h.q.bootSettled.done) }

// settledTo returns the bootstrap capability, or why there is none. The
// caller's client keeps q.bootCap (Shutdown drops it).
func (h *bootstrapHook) settledTo() capnp.Client {
	q := h.q
	c := q.c
	c.mu.Lock()
	defer c.unlock()
	switch {
	case q.bootSettled.err != nil:
		return brokenClient(q.bootSettled.err)
	case q.bootCap.IsValid():
		return q.bootCap.AddRef()
	}
	return brokenClient(errors.New("captp: the bootstrap capability is gone"))
}

func (h *bootstrapHook) Brand() capnp.Brand { return capnp.Brand{Value: h} }
func (h *bootstrapHook) String() string     { return "captp bootstrap promise" }

// Shutdown runs once no call can use the hook any more.
func (h *bootstrapHook) Shutdown() {
	h.q.c.schedule(func(fx *effects) {
		cl := h.q.bootCap
		h.q.bootCap = capnp.Client{}
		h.q.bootDropped = true
		fx.releaseClient(cl)
	})
}

// Close sends an Abort to the peer, rejects everything pending with a
// disconnected error, releases every capability and waits until the
// connection's goroutines have exited. Closing twice is harmless; the
// second Close reports that the connection was already closed.
func (c *Conn) Close() error {
	first := c.shutdown(errClosedLocally, true)
	<-c.done
	if !first {
		return errors.New("captp: connection already closed")
	}
	return nil
}

// Done is closed when the connection has ended and been cleaned up.
func (c *Conn) Done() <-chan struct{} { return c.done }

// Err reports why the connection ended: nil while it is open or after a
// local Close, otherwise the peer's Abort, a protocol violation or an I/O
// error. Errors are disconnected exceptions (see capnp.IsDisconnected).
func (c *Conn) Err() error {
	c.mu.Lock()
	defer c.unlock()
	if errors.Is(c.err, errClosedLocally) {
		return nil
	}
	return c.err
}

// Stats returns the current table sizes.
func (c *Conn) Stats() Stats {
	c.mu.Lock()
	defer c.unlock()
	return Stats{
		Questions: len(c.questions),
		Answers:   len(c.answers),
		Imports:   len(c.imports),
		Exports:   len(c.exports),
		Embargoes: len(c.embargoes),
	}
}

var errClosedLocally = errors.New("connection closed")

// disconnected wraps err as a disconnected exception for callers.
func disconnected(err error) error {
	var e *exc.Exception
	if errors.As(err, &e) && e.Type == exc.Disconnected {
		return err
	}
	return &exc.Exception{Type: exc.Disconnected, Prefix: "captp", Cause: err}
}

// writeLoop writes queued frames, batching everything queued since the
// last write into one Write call, until shutdown has flushed the queue.
func (c *Conn) writeLoop() {
	defer close(c.writerDone)
	for {
		<-c.outWake
		if hook := testWriterWoken.Load(); hook != nil {
			(*hook)(c)
		}
		for {
			c.mu.Lock()
			if c.writing || c.queuedLocked() == 0 {
				// A direct writer wakes us when it is done, if needed.
				exit := c.writerStop && !c.writing
				c.unlock()
				if exit {
					return
				}
				break
			}
			buf := c.takeOutputLocked()
			c.unlock()
			if !c.write(buf) {
				return
			}
		}
	}
}

// testWriterWoken, set only by tests, is called each time a writer
// goroutine wakes.
var testWriterWoken atomic.Pointer[func(*Conn)]

// output is a batch of frames taken for writing: the bytes of small
// frames and headers, and the segments of large frames to write at their
// offsets in between.
type output struct {
	buf   []byte
	large []largeFrame
	try   bool // write what the transport takes at once (tryWrite)
}

// A largeFrame's segments are written straight from its message, not
// copied into the output buffer, so the message must stay intact until
// they are written (or dropped): then it is recycled, or, for a Return
// its answer keeps, unpinned.
type largeFrame struct {
	at    int // offset in buf where the segments go
	segs  [][]byte
	size  int
	msg   *capnp.Message
	owner *answer
	// written, if set, is closed once the frame is written or dropped:
	// its sender waits for it because the frame points into its data.
	written chan struct{}
}

func (lf *largeFrame) release() {
	if lf.written != nil {
		close(lf.written)
	}
	if lf.owner != nil {
		lf.owner.unpin()
	} else {
		recycleMessage(lf.msg)
	}
}

// largeFrameBytes is the frame size from which Calls and Returns are
// written from their messages instead of being copied.
const largeFrameBytes = 64 << 10

func (c *Conn) queuedLocked() int { return len(c.out) + c.largeBytes }

// takeOutputLocked hands the queued frames to the caller, who must write
// them with write. The caller holds c.mu and has checked !c.writing.
func (c *Conn) takeOutputLocked() output {
	c.corked.Store(false)
	c.readerOwes.Store(false)
	o := output{buf: c.out, large: c.outLarge}
	c.out, c.spare = c.spare[:0], nil
	c.outLarge, c.largeBytes = nil, 0
	c.writing = true
	c.wakeWriter = false
	return o
}

// claimOutputLocked returns the queued frames for the calling goroutine to
// write itself, or nil if the writer goroutine should: when another
// goroutine is writing (it picks them up), when the read loop is
// delivering (it must never block on the socket: the peer may be waiting
// for us to read), or when other calls are in flight, whose frames the
// writer will batch into fewer writes. So an idle connection gets the
// latency of a direct write and a busy one the throughput of batching.
func (c *Conn) claimOutputLocked() output {
	if c.manual || c.writing || c.closing || c.queuedLocked() == 0 || c.dispatching.Load() || c.inboundBusy.Load() ||
		(len(c.questions) > 1 || c.inProgress > 0) && c.largeBytes == 0 {
		return output{}
	}
	return c.takeOutputLocked()
}

// corkableLocked reports whether the native Call just queued may wait in
// the queue for its caller to write it when it waits for a result
// (uncork), instead of being written now: then the calls a caller makes
// before it waits (a call and the calls pipelined on it) leave in one
// write, and the peer reads them together. Only where the caller would
// have written it directly (claimOutputLocked), or more calls join frames
// already corked, and only while the read role is free: the read loop is
// then in awaitRole, which flushes the queue at its next check, so a call
// whose caller never waits still goes out within about idleReadDelay.
// wake is whether the writer was to be woken before the Call was queued.
func (c *Conn) corkableLocked(wake bool) bool {
	if wake || c.manual || c.writing || c.closing || c.dispatching.Load() || c.inboundBusy.Load() ||
		c.largeBytes > 0 || c.queuedLocked() > inlineWriteBytes || c.read.state.Load() != roleFree {
		return false
	}
	return c.corked.Load() || len(c.questions) <= 1 && c.inProgress == 0
}

// noHasteLocked is called right after queueing a frame that can wait for
// the next one out (a Finish after its Return, a Release), with wake, the
// writer's wake-up flag before it was queued: unless the read loop holds
// the read role (then nothing else would send it soon), the frame does
// not wake the writer itself, which would cost a thread wake-up and a
// write of its own. It goes with the next frame, or when the read loop
// next checks the free role (awaitRole, flushLazy).
func (c *Conn) noHasteLocked(wake bool) {
	if c.read.state.Load() != roleLoop {
		c.wakeWriter = wake
	}
}

// uncork writes the frames left for a native caller (corkableLocked), or
// has the writer write them; a caller calls it before it waits.
func (c *Conn) uncork() {
	if !c.corked.Load() {
		return
	}
	c.mu.Lock()
	var out output
	if c.corked.Load() {
		c.corked.Store(false)
		switch {
		case c.queuedLocked() == 0 || c.writing || c.closing:
			// Taken already, or the writer takes it after this write.
		case c.dispatching.Load():
			c.wakeWriter = true // never block the read role on the socket
		default:
			out = c.takeOutputLocked()
		}
	}
	c.unlock()
	c.writeClaimed(out)
}

// claimInlineLocked is claimOutputLocked for the Return of a native
// handler that ran inline, perhaps on the read loop itself (native.go).
// The read loop writes it directly, saving the wake-up of the writer
// goroutine, only in a quiet exchange: no call of ours outstanding (so
// the peer's read loop is not itself writing a Return to us, which over
// a synchronous pipe would deadlock both), no other call of the peer's
// in progress, no more input buffered, nothing large queued, a small
// frame. The read loop must not block while the peer waits for it to
// read; in such an exchange the peer reads (its read loop is free), and
// a kernel socket takes a small frame at once anyway. What remains is a
// peer whose read loop has stopped for its own full outbound queue
// (Limits.MaxQueuedBytes) at that very moment, over a transport with no
// buffer of its own.
//
// While more input is buffered, a Return that could be written so is
// held back instead (readerOwes), and written with those that follow
// when the input runs dry (payReaderDebt): a peer's calls that arrived
// together, a call and the calls pipelined on it, are answered in one
// write. Over a transport that can write without waiting (TryWriter),
// the Returns held back go out as soon as they reach pipelineWriteBytes,
// as much as the transport takes at once, the rest through the writer
// goroutine: the peer then works on them while this side serves the rest
// of the input, instead of the two sides taking turns with whole
// batches.
func (c *Conn) claimInlineLocked() output {
	if !c.dispatching.Load() {
		return c.claimOutputLocked()
	}
	if !c.inlineWritableLocked() {
		return output{}
	}
	if c.inboundBusy.Load() {
		if c.tryWriter == nil || c.queuedLocked() < pipelineWriteBytes {
			c.wakeWriter = false
			c.readerOwes.Store(true)
			return output{}
		}
		o := c.takeOutputLocked()
		o.try = true
		return o
	}
	return c.takeOutputLocked()
}

// pipelineWriteBytes is how many bytes of Returns the read loop holds
// back while more input is buffered, over a TryWriter transport
// (claimInlineLocked): about ten small Returns. With 64 calls in flight
// over a Unix socket, 1 KiB did a little better than 2; holding the whole
// batch made client and server take turns.
const pipelineWriteBytes = 1 << 10

// TryWriter is an optional interface of a connection's transport.
// TryWrite writes as much of p as the transport takes at once, without
// waiting for room (a kernel socket's send buffer), possibly nothing, and
// returns how much it wrote. Over such a transport the read loop sends
// the Returns of calls it serves inline about 1 KiB at a time while more
// of the peer's calls are buffered, instead of all together after the
// last, so that both sides work at once: with 64 calls in flight over a
// Unix socket, about 1.6 times the calls per second in one process and
// 1.2 times across two. What the transport does not take at once goes to
// the writer goroutine: the read loop never waits for a peer that reads
// slowly (which may itself have stopped reading until its own calls to
// us drain). adapters/unix's socket connections implement it on Linux,
// with or without timeouts.
type TryWriter interface {
	TryWrite(p []byte) (int, error)
}

// tryWrite writes what of o, small frames taken by claimInlineLocked,
// the transport takes at once, and leaves the rest, ahead of anything
// queued since, to the writer goroutine.
func (c *Conn) tryWrite(o output) {
	n, err := c.tryWriter.TryWrite(o.buf)
	if err == nil && (n < 0 || n > len(o.buf)) {
		err = errors.New("transport's TryWrite returned an invalid count")
	}
	var rest []byte
	if err == nil {
		rest = o.buf[n:]
	}
	c.endWrite(o.buf, rest, err)
}

// inlineWritableLocked reports whether the read role's holder may write
// the queue itself: see claimInlineLocked.
func (c *Conn) inlineWritableLocked() bool {
	if c.manual || c.writing || c.closing || c.largeBytes > 0 || c.inProgress > 0 || len(c.questions) > 0 {
		return false
	}
	n := c.queuedLocked()
	return n > 0 && n <= inlineWriteBytes
}

// payReaderDebt writes the Returns held back while input was buffered
// (claimInlineLocked), or has the writer write them if the exchange is
// no longer quiet. The read role's holder calls it when the input it has
// buffered runs dry, before it reads again.
func (c *Conn) payReaderDebt() {
	c.mu.Lock()
	var out output
	if c.readerOwes.Load() {
		c.readerOwes.Store(false)
		if c.inlineWritableLocked() {
			out = c.takeOutputLocked()
		} else if c.queuedLocked() > 0 {
			c.wakeWriter = true
		}
	}
	c.unlock()
	c.writeClaimed(out)
}

// inlineWriteBytes bounds what the read loop writes itself.
const inlineWriteBytes = 16 << 10

// write writes buf, taken with takeOutputLocked, and hands back the
// writing role: frames queued meanwhile go to the writer goroutine. It
// reports false if the connection failed.
func (c *Conn) write(o output) bool {
	err := c.writeOutput(o)
	for _, lf := range o.large {
		lf.release()
	}
	return c.endWrite(o.buf, nil, err)
}

// endWrite hands back the writing role after a write of buf (the bytes
// of small frames and headers taken with takeOutputLocked) that failed
// with err, or left rest, a tail of buf, unwritten: rest is queued again
// ahead of the frames queued since, for the writer goroutine. It reports
// false if the connection failed.
func (c *Conn) endWrite(buf, rest []byte, err error) bool {
	c.mu.Lock()
	c.writing = false
	var dropped []largeFrame
	switch {
	case err != nil:
		c.out = nil
		dropped, c.outLarge, c.largeBytes = c.outLarge, nil, 0
	case len(rest) > 0:
		rest = buf[:copy(buf, rest)]
		for i := range c.outLarge { // queued since: their places move
			c.outLarge[i].at += len(rest)
		}
		c.out, c.spare = append(rest, c.out...), c.out[:0]
	case cap(buf) <= max(maxSpareBuffer, c.lim.MaxQueuedBytes):
		// Kept even when large: under sustained load the queue refills
		// to the same size, and regrowing it is garbage for the GC.
		c.spare = buf[:0]
	}
	if c.outDrained != nil {
		close(c.outDrained)
		c.outDrained = nil
	}
	if c.queuedLocked() > 0 || c.writerStop {
		c.wakeWriter = true
	}
	c.unlock()
	for _, lf := range dropped {
		lf.release()
	}
	if err != nil {
		c.shutdown(fmt.Errorf("write: %w", err), false)
		return false
	}
	return true
}

// BuffersWriter is an optional interface of a connection's transport: it
// writes bufs in order with as few system calls as it can (writev), as
// net.Buffers does for sockets. The core writes a batch holding large
// frames with one WriteBuffers instead of a Write per piece; the adapters'
// connections implement it.
type BuffersWriter interface {
	WriteBuffers(bufs [][]byte) (int64, error)
}

// writeOutput writes a batch: one Write when it has no large frames, else
// the pieces in order, in one WriteBuffers if the transport has it.
func (c *Conn) writeOutput(o output) error {
	if bw, ok := c.rwc.(BuffersWriter); ok && len(o.large) > 0 {
		return c.writeBuffers(bw, o)
	}
	off := 0
	for _, lf := range o.large {
		if lf.at > off {
			if _, err := c.rwc.Write(o.buf[off:lf.at]); err != nil {
				return err
			}
		}
		for _, seg := range lf.segs {
			if _, err := c.rwc.Write(seg); err != nil {
				return err
			}
		}
		off = lf.at
	}
	if off < len(o.buf) {
		_, err := c.rwc.Write(o.buf[off:])
		return err
	}
	return nil
}

// writeBuffers writes a batch with large frames as one vector: the
// output buffer's pieces with each large frame's segments in between.
func (c *Conn) writeBuffers(bw BuffersWriter, o output) error {
	vec := c.vec[:0]
	off := 0
	for _, lf := range o.large {
		if lf.at > off {
			vec = append(vec, o.buf[off:lf.at])
		}
		vec = append(vec, lf.segs...)
		off = lf.at
	}
	if off < len(o.buf) {
		vec = append(vec, o.buf[off:])
	}
	_, err := bw.WriteBuffers(vec)
	clear(vec) // drop the references to written messages
	c.vec = vec[:0]
	return err
}

// writeClaimed writes frames claimed with claimOutputLocked, if any.
func (c *Conn) writeClaimed(o output) {
	switch {
	case o.try:
		c.tryWrite(o)
	case o.buf != nil || o.large != nil:
		c.write(o)
	}
}

// maxSpareBuffer is the output buffer size always kept for reuse; larger
// ones are kept up to MaxQueuedBytes (large messages are written from
// their own memory, so only many small frames make the buffer big).
const maxSpareBuffer = 1 << 20

// sendLocked queues msg's frame. The caller holds c.mu; its unlock wakes
// the writer unless the caller claims the output to write it itself.
func (c *Conn) sendLocked(msg *capnp.Message) error {
	out, err := appendFrame(c.out, msg)
	if err != nil {
		return fmt.Errorf("encode message: %w", err)
	}
	c.out = out
	c.wakeWriter = true
	return nil
}

// sendByRefLocked queues msg like sendLocked, but a frame of at least
// largeFrameBytes only by reference, and reports whether it did. Then the
// message is no longer the caller's: once written it is recycled, or, if
// owner is set (a Return the answer keeps for pipelining), the answer is
// unpinned and frees it when it no longer needs it.
func (c *Conn) sendByRefLocked(msg *capnp.Message, owner *answer) (bool, error) {
	if c.manual || msg.NumSegments() > 8 {
		return false, c.sendLocked(msg)
	}
	var segs [8][]byte
	size := 0
	n := int(msg.NumSegments())
	for i := range n {
		seg, err := msg.Segment(capnp.SegmentID(i))
		if err != nil {
			return false, fmt.Errorf("encode message: %w", err)
		}
		segs[i] = seg.Data()
		size += len(segs[i])
	}
	if size < largeFrameBytes {
		return false, c.sendLocked(msg)
	}
	out, err := appendFrameHeader(c.out, segs[:n])
	if err != nil {
		return false, fmt.Errorf("encode message: %w", err)
	}
	c.out = out
	c.outLarge = append(c.outLarge, largeFrame{at: len(out), segs: slices.Clone(segs[:n]), size: size, msg: msg, owner: owner})
	if owner != nil {
		owner.pins++
	}
	c.largeBytes += size
	c.wakeWriter = true
	return true, nil
}

// waitQueue blocks while the outbound queue exceeds its bound, so a caller
// producing calls faster than the peer reads them slows down instead of
// growing memory without bound.
func (c *Conn) waitQueue(ctx context.Context) error {
	if c.manual {
		return nil // nothing drains the queue but the simulation itself
	}
	for {
		c.mu.Lock()
		if c.closing {
			c.unlock()
			return nil // the call itself reports the disconnect
		}
		if c.queuedLocked() <= c.lim.MaxQueuedBytes {
			c.unlock()
			return nil
		}
		c.wakeWriter = true // frames left for later (uncork, payReaderDebt) go now
		if c.outDrained == nil {
			c.outDrained = make(chan struct{})
		}
		drained := c.outDrained
		c.unlock()
		select {
		case <-drained:
		case <-ctx.Done():
			return ctx.Err()
		case <-c.done:
			return nil
		}
	}
}

// abort reports a protocol violation by the peer: it sends an Abort with
// the reason and shuts the connection down.
func (c *Conn) abort(reason error) {
	c.log.Warn("captp: aborting connection", "reason", reason)
	c.shutdown(reason, true)
}

// shutdown ends the connection once: it queues an Abort when asked,
// empties every table, rejects what is pending and releases what is held,
// then lets the writer flush and closes the stream. It reports whether
// this call was the one that shut down.
func (c *Conn) shutdown(reason error, sendAbort bool) bool {
	first := false
	c.shutdownOnce.Do(func() {
		first = true
		c.mu.Lock()
		c.closing = true
		c.err = disconnected(reason)
		var dropped []largeFrame
		if sendAbort {
			// Output not yet written is moot once we abort, and the
			// Abort must not wait behind it (up to MaxQueuedBytes for a
			// peer that reads slowly): it goes next.
			c.out = c.out[:0]
			dropped, c.outLarge, c.largeBytes = c.outLarge, nil, 0
			if msg, err := c.newAbort(reason); err == nil {
				_ = c.sendLocked(msg)
				msg.Release()
				c.abortSent = true
			}
		}
		var fx effects
		c.clearTablesLocked(&fx, c.err)
		c.writerStop = true
		c.wakeWriter = true
		c.unlock()
		for _, lf := range dropped {
			lf.release()
		}
		c.cancel()
		fx.run()
		if c.manual {
			c.finishManualShutdown()
		} else {
			go c.finishShutdown()
		}
	})
	return first
}

// finishShutdown waits for the writer to flush (bounded by abortTimeout),
// closes the stream and waits for the reader.
func (c *Conn) finishShutdown() {
	drained := c.drainAfterAbort()
	timer := time.NewTimer(c.abortTimeout)
	defer timer.Stop()
	select {
	case <-c.writerDone:
		if c.abortSent {
			// Our output ends with the Abort: say so, and give the peer
			// time to read it before closing (see drainAfterAbort).
			if cw, ok := c.rwc.(interface{ CloseWrite() error }); ok {
				_ = cw.CloseWrite()
			}
			timer.Reset(c.abortTimeout)
			select {
			case <-drained:
			case <-timer.C:
			}
		}
	case <-timer.C:
	}
	_ = c.rwc.Close()
	<-drained
	<-c.writerDone
	<-c.readerDone
	// Releasing the bootstrap capability may call user code; do it last,
	// with no lock held.
	c.mu.Lock()
	boot := c.bootstrap
	c.bootstrap = capnp.Client{}
	c.unlock()
	boot.Release()
	close(c.done)
}

// drainAfterAbort reads and discards input once we have aborted, until the
// peer closes or the stream is closed; the returned channel closes then.
// Closing a socket with unread input makes the kernel reset the
// connection, and over TCP the reset discards what the peer has not read
// yet: a peer busy writing (a flood) would lose our Abort. Draining lets
// its writes finish so that it reads the Abort; a peer that never stops
// is cut off when finishShutdown's timer (abortTimeout) ends the wait.
func (c *Conn) drainAfterAbort() <-chan struct{} {
	done := make(chan struct{})
	if !c.abortSent {
		close(done)
		return done
	}
	timer := time.NewTimer(c.abortTimeout)
	defer timer.Stop()
	select {
	case <-c.readerDone: // it stops after the violation it reported
	case <-timer.C:
		close(done) // still reading; Close stops it
		return done
	}
	go func() {
		defer close(done)
		buf := make([]byte, 16<<10)
		for {
			if _, err := c.rwc.Read(buf); err != nil {
				return
			}
		}
	}()
	return done
}

func (c *Conn) newAbort(reason error) (*capnp.Message, error) {
	msg, m, err := newMessage()
	if err != nil {
		return nil, err
	}
	e, err := m.NewAbort()
	if err != nil {
		msg.Release()
		return nil, err
	}
	if err := marshalException(e, reason); err != nil {
		msg.Release()
		return nil, err
	}
	return msg, nil
}

// clearTablesLocked empties every table at shutdown, collecting the
// rejections and releases to run once the lock is dropped.
func (c *Conn) clearTablesLocked(fx *effects, reason error) {
	c.dropWatchesLocked()
	c.dropGravesLocked(fx)
	// Sorted, so that a simulated run replays exactly.
	for _, id := range sortedKeys(c.questions) {
		q := c.questions[id]
		delete(c.questions, id)
		q.rejectLocked(fx, reason)
	}
	clear(c.questionsByAns)
	for _, id := range sortedKeys(c.answers) {
		a := c.answers[id]
		delete(c.answers, id)
		if a.provision != nil {
			c.dropProvisionLocked(fx, a)
		}
		if a.accept != nil {
			c.vat.forget(a.accept)
			a.accept = nil
		}
		a.dropLocked(fx)
	}
	clear(c.provides)
	c.inProgress = 0
	for _, id := range sortedKeys(c.imports) {
		ie := c.imports[id]
		delete(c.imports, id)
		signal := ie.settledSignalLocked()
		fx.releaseClient(ie.resolution)
		ie.resolution = capnp.Client{}
		ie.settleLocked(fx, func(resolvers []capnp.Resolver[capnp.Client]) {
			breakPromises(reason, resolvers...)
			closeSignal(signal)
		})
	}
	for _, id := range sortedKeys(c.exports) {
		e := c.exports[id]
		delete(c.exports, id)
		c.vineUsedLocked(fx, e) // the recipient is gone: end its Provide
		e.dropLocked(fx)
	}
	clear(c.exportsByHook)
	for _, id := range sortedKeys(c.embargoes) {
		em := c.embargoes[id]
		delete(c.embargoes, id)
		fx.add(func() { em.end(reason) })
	}
}

// messagePool keeps outbound Message structs for reuse (their arenas are
// pooled by go-capnp already).
var messagePool = sync.Pool{New: func() any { return new(capnp.Message) }}

// newMessage allocates an outbound RPC message.
func newMessage() (*capnp.Message, rpccp.Message, error) {
	msg := messagePool.Get().(*capnp.Message)
	seg, err := msg.Reset(capnp.SingleSegment(nil))
	if err != nil {
		return nil, rpccp.Message{}, err
	}
	m, err := rpccp.NewRootMessage(seg)
	if err != nil {
		msg.Release()
		return nil, rpccp.Message{}, err
	}
	return msg, m, nil
}

// messageBytes is the size of msg's segments.
func messageBytes(msg *capnp.Message) int64 {
	var n int64
	for i := int64(0); i < msg.NumSegments(); i++ {
		if seg, err := msg.Segment(capnp.SegmentID(i)); err == nil {
			n += int64(len(seg.Data()))
		}
	}
	return n
}

// recycleMessage releases a message from newMessage and keeps it for
// reuse. Only for messages released exactly once, by their only owner: a
// second release would hand the struct to two users.
func recycleMessage(msg *capnp.Message) {
	arena := msg.Arena
	if unpooled(arena) {
		// go-capnp would zero the buffer, twice, only to drop it: its pool
		// keeps nothing this large (in a 1 MiB echo through capnpc-go's
		// stubs, a sixth of the CPU). The garbage collector takes it as
		// it is. largeBodies cannot use it either: inbound bodies need
		// room to read ahead, and this buffer fits its message exactly.
		msg.Arena = nil
	}
	msg.Reset(nil) // releases arena
	if ro, ok := arena.(*capnp.ReadOnlySingleSegment); ok {
		ro.Segment(0).BindTo(nil) // Release leaves it bound to msg
		inboundArenas.Put(ro)
	}
	largeBodies.giveBack(msg)
	messagePool.Put(msg)
}

// goCapnpPoolMaxBytes is where go-capnp's buffer pool (bufferpool.Default,
// 20 buckets) stops: it drops buffers of this capacity or more.
const goCapnpPoolMaxBytes = 1 << 20

// unpooled says whether arena is a growable single-segment arena
// (capnp.SingleSegment(nil), as newMessage makes) whose buffer go-capnp's
// pool would not keep.
func unpooled(arena capnp.Arena) bool {
	ss, ok := arena.(*capnp.SingleSegmentArena)
	if !ok {
		return false
	}
	seg := ss.Segment(0)
	return seg != nil && cap(seg.Data()) >= goCapnpPoolMaxBytes
}

// inboundArenas keeps the arenas of single-segment inbound frames, which
// only read the frame's body: one per frame would otherwise be garbage.
var inboundArenas = sync.Pool{New: func() any { return new(capnp.ReadOnlySingleSegment) }}

// inboundArena returns a released arena reading body.
func inboundArena(body []byte) *capnp.ReadOnlySingleSegment {
	ro := inboundArenas.Get().(*capnp.ReadOnlySingleSegment)
	ro.ReplaceData(body)
	return ro
}

// effects are calls into capabilities or promises collected under c.mu and
// run, in order, after it is released. The first few live in the struct
// itself (on the caller's stack), and the common kinds are fields rather
// than closures, so the per-call path queues its effects without
// allocating.
type effects struct {
	n      int
	inline [4]effect
	more   []effect
}

// An effect is one deferred step; the non-zero fields run in the order
// below.
type effect struct {
	f       func()
	deliver *answer        // deliver the peer's call to its target
	settle  *question      // resolve the caller's promise from the Return
	retire  *question      // release the clients of a retired question's promise
	recycle *capnp.Message // released with recycleMessage
	client  capnp.Client
}

func (e *effect) run() {
	if e.f != nil {
		e.f()
	}
	if e.deliver != nil {
		e.deliver.deliver()
	}
	if e.settle != nil {
		e.settle.runSettle()
	}
	if e.retire != nil {
		e.retire.p.ReleaseClients()
	}
	if e.recycle != nil {
		recycleMessage(e.recycle)
	}
	e.client.Release()
}

func (fx *effects) push(e effect) {
	if fx.n < len(fx.inline) {
		fx.inline[fx.n] = e
	} else {
		fx.more = append(fx.more, e)
	}
	fx.n++
}

func (fx *effects) add(f func()) { fx.push(effect{f: f}) }

// recycleMsg queues recycleMessage(msg) (nil is ignored).
func (fx *effects) recycleMsg(msg *capnp.Message) {
	if msg != nil {
		fx.push(effect{recycle: msg})
	}
}

// releaseClient queues cl.Release.
func (fx *effects) releaseClient(cl capnp.Client) { fx.push(effect{client: cl}) }

// run runs the effects in order, including any queued while running.
func (fx *effects) run() {
	for i := 0; i < fx.n; i++ {
		var e *effect
		if i < len(fx.inline) {
			e = &fx.inline[i]
		} else {
			e = &fx.more[i-len(fx.inline)]
		}
		todo := *e
		*e = effect{}
		todo.run()
	}
	fx.n = 0
	fx.more = fx.more[:0]
}

// idAllocator hands out small integer ids, reusing freed ones first so
// tables stay dense.
type idAllocator struct {
	next uint32
	free []uint32
}

func (a *idAllocator) get() uint32 {
	if n := len(a.free); n > 0 {
		id := a.free[n-1]
		a.free = a.free[:n-1]
		return id
	}
	id := a.next
	a.next++
	return id
}

func (a *idAllocator) put(id uint32) { a.free = append(a.free, id) }

func sortedKeys[V any](m map[uint32]V) []uint32 {
	keys := make([]uint32, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// schedule runs task under c.mu as soon as it can: now if the lock is
// free, else when its holder (possibly this very goroutine, deeper in the
// stack) unlocks. go-capnp shuts hooks down from inside Snapshot and
// Release, which we call with c.mu held, so hooks must not lock.
func (c *Conn) schedule(f func(fx *effects)) { c.scheduleTask(taskFunc(f)) }

// A task is work for schedule. Hooks whose Shutdown runs on every
// capability's release implement it themselves, so that scheduling
// their shutdown allocates no closure.
type task interface{ runTask(fx *effects) }

type taskFunc func(fx *effects)

func (f taskFunc) runTask(fx *effects) { f(fx) }

// scheduleTask is schedule for a task value.
func (c *Conn) scheduleTask(t task) {
	c.taskMu.Lock()
	c.tasks = append(c.tasks, t)
	c.taskMu.Unlock()
	c.pendingTasks.Add(1)
	if c.mu.TryLock() {
		c.unlock()
	}
}

// unlock runs scheduled tasks, releases c.mu, then runs the tasks'
// effects. A task scheduled after the check but while the lock was held
// is picked up by the re-check after Unlock.
func (c *Conn) unlock() {
	for {
		if c.pendingTasks.Load() > 0 {
			c.runTasksAndUnlock()
		} else {
			c.signalWriterLocked()
			c.mu.Unlock()
		}
		if c.pendingTasks.Load() == 0 || !c.mu.TryLock() {
			return
		}
	}
}

// runTasksAndUnlock runs the scheduled tasks, releases c.mu and runs their
// effects. Kept apart so the common unlock allocates nothing.
func (c *Conn) runTasksAndUnlock() {
	// The effects list escapes (tasks are dynamic calls), so one is kept
	// for the next batch; a nested batch (an effect that unlocks) makes
	// its own.
	fx := c.spareFx.Swap(nil)
	if fx == nil {
		fx = new(effects)
	}
	c.taskMu.Lock()
	tasks := c.tasks
	c.tasks, c.spareTasks = c.spareTasks, nil
	c.pendingTasks.Add(-int32(len(tasks)))
	c.taskMu.Unlock()
	for _, t := range tasks {
		t.runTask(fx)
	}
	// Batches run under c.mu, one at a time: tasks' array is this
	// batch's alone until handed back.
	clear(tasks)
	c.taskMu.Lock()
	if c.spareTasks == nil && cap(tasks) <= maxSpareTasks {
		c.spareTasks = tasks[:0]
	}
	c.taskMu.Unlock()
	c.signalWriterLocked()
	c.mu.Unlock()
	fx.run()
	if cap(fx.more) <= maxSpareTasks {
		c.spareFx.Store(fx)
	}
}

// maxSpareTasks bounds the task and effect arrays kept for reuse.
const maxSpareTasks = 64

// signalWriterLocked wakes the writer goroutine for frames queued since
// the last signal, unless a writer is busy (it checks again when done).
func (c *Conn) signalWriterLocked() {
	if c.wakeWriter && !c.writing {
		c.wakeWriter = false
		select {
		case c.outWake <- struct{}{}:
		default:
		}
	}
}
