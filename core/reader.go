package core

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync/atomic"
	"time"
)

// The read role. One goroutine at a time reads the transport and handles
// what it reads: normally the read loop. A native caller that waits for
// its Return on an otherwise quiet connection reads it itself instead
// (readForCaller), the way a plain request/response client does: then the
// goroutine that the netpoller wakes when the Return arrives is the one
// that wanted it. Handing each Return from the read loop to its caller
// costs a thread wake-up per call (Go's ready() wakes an idle thread,
// which finds nothing to do and sleeps again), which is most of what
// separates a sequential call from the raw socket round trip.
//
// The role moves between three states:
//   - roleLoop: the read loop has it (it may be blocked in a read);
//   - roleCaller: a caller in PendingCall.Wait has it;
//   - roleFree: nobody reads. The read loop leaves the role free when the
//     connection is quiet (no call of ours waiting for its Return,
//     nothing in progress for the peer, no recent call from the peer)
//     and a caller has just waited for a Return it could have read. A
//     caller that waits takes it, and reads the Returns of all the calls
//     outstanding until its own arrives; anything else that needs input
//     read (a waiter that cannot take it, a call go-capnp sent, Done, a
//     call blocked in flow control) gives it back to the read loop; and
//     the read loop takes it back by itself after
//     idleReadDelay, so that input nobody waits for (the peer's calls,
//     Resolve, Abort, the end of the stream) is read late, never lost.
const (
	roleLoop int32 = iota
	roleCaller
	roleFree
)

// idleReadDelay is how often the read loop checks a free read role; input
// that arrives once callers stop waits unread at most about twice this.
// A variable only so that tests can keep the role free.
var idleReadDelay = time.Millisecond

// peerCallQuiet is how long after a call from the peer the read loop keeps
// the role: a connection the peer calls on is read by the loop.
const peerCallQuiet = 10 * time.Millisecond

// readRole is the state of the read role, and what moves it.
type readRole struct {
	state atomic.Int32
	// back hands the role to the read loop (capacity 1: the role has one
	// holder, so at most one hand-off is ever pending).
	back chan struct{}
	// idle is the read loop's timer while the role is away (awaitRole).
	idle *time.Timer
	// callerWaited is set by a call whose caller could read its Return
	// itself (send): the loop then frees the role when the connection is
	// quiet.
	callerWaited atomic.Bool
	// takes counts the callers that took the role (see awaitRole).
	takes atomic.Uint64

	// reader is the question whose caller holds the role, if its context
	// can end; interrupted says its Read was interrupted. Under c.mu.
	reader      *question
	interrupted atomic.Bool

	// Owned by whoever holds the role.
	fr    *frameReader
	ended bool // reading failed or the connection ended: only the loop's exit is left
	// lastPeerCalls and lastPeerCall record when the peer last called
	// (see quietLocked).
	lastPeerCalls uint64
	lastPeerCall  time.Time
}

func (r *readRole) init() {
	r.back = make(chan struct{}, 1)
	r.idle = time.NewTimer(time.Hour)
	r.idle.Stop()
}

// giveToLoop hands the role, held by the caller, to the read loop.
func (r *readRole) giveToLoop() {
	r.state.Store(roleLoop)
	r.back <- struct{}{}
}

// wakeLoop gives a free role to the read loop: input is expected that no
// caller will read.
func (r *readRole) wakeLoop() {
	if r.state.Load() == roleFree && r.state.CompareAndSwap(roleFree, roleLoop) {
		r.back <- struct{}{}
	}
}

// freeIfQuiet leaves the role, which the caller holds, to whoever comes
// next if the connection is quiet, and reports whether it did. The state
// changes under c.mu: a call sent after the check finds the role free
// (and takes it or wakes the loop), one sent before makes it not quiet.
func (c *Conn) freeIfQuiet() bool {
	r := &c.read
	if r.fr.buffered() > 0 {
		return false
	}
	c.mu.Lock()
	quiet := c.quietLocked()
	if quiet {
		r.state.Store(roleFree)
	}
	c.unlock()
	return quiet
}

// readLoop reads and handles the peer's messages while it holds the read
// role, and waits for the role while a caller has it or it is free.
func (c *Conn) readLoop() {
	defer close(c.readerDone)
	r := &c.read
	r.fr = newFrameReader(c.rwc, c.lim)
	for {
		if r.ended {
			return
		}
		if !c.readOne() {
			return
		}
		if r.callerWaited.Load() && c.freeIfQuiet() {
			r.callerWaited.Store(false)
			c.awaitRole()
		}
	}
}

// awaitRole returns once the read loop holds the read role again. While
// the role is free it checks every idleReadDelay whether a caller took it
// since the last check, and takes it when none did: callers read whatever
// arrives while they come and go, and once they stop, the loop reads.
// (A timer reset per call would cost a wake-up of the netpoller each
// time, as much as the hand-off the role saves.)
func (c *Conn) awaitRole() {
	r := &c.read
	takes := r.takes.Load()
	r.idle.Reset(idleReadDelay)
	defer r.idle.Stop()
	defer c.flushLazy()
	for {
		select {
		case <-r.back:
			return
		case <-r.idle.C:
			c.flushLazy()
			if now := r.takes.Load(); now != takes {
				takes = now
				r.idle.Reset(idleReadDelay)
				continue
			}
		case <-c.ctx.Done():
			// Shutting down: take the role as soon as it is free; a
			// caller that has it gives it back once its read fails
			// (Close) or its call settles.
			if r.state.CompareAndSwap(roleFree, roleLoop) {
				return
			}
			<-r.back
			return
		}
		if r.state.CompareAndSwap(roleFree, roleLoop) {
			return
		}
		// A caller has it: it gives it back through r.back, or frees
		// it, and then the next check takes it.
		r.idle.Reset(idleReadDelay)
	}
}

// flushLazy wakes the writer for frames queued without waking it (a
// Finish after its Return or a Release, see noHasteLocked; corked calls,
// see corkableLocked).
func (c *Conn) flushLazy() {
	c.mu.Lock()
	if c.queuedLocked() > 0 {
		c.wakeWriter = true
	}
	c.unlock()
}

// readOne reads one message and handles it. It reports false once the
// connection has ended, for whichever goroutine holds the role.
func (c *Conn) readOne() bool {
	// Backpressure: a peer that sends calls without reading our replies
	// stops being read once they fill the outbound queue.
	c.waitQueue(context.Background())
	return c.handleNext()
}

// handleNext reads the next message and handles it, without waitQueue's
// backpressure (the caller has seen to that).
func (c *Conn) handleNext() bool {
	r := &c.read
	msg, err := r.fr.readMessage()
	c.inboundBusy.Store(r.fr.buffered() > 0)
	if err != nil {
		r.ended = true
		var fe *FrameError
		switch {
		case errors.As(err, &fe):
			c.abort(fmt.Errorf("framing: %w", err))
		case errors.Is(err, io.EOF):
			c.shutdown(errors.New("peer closed the connection"), false)
		default:
			c.shutdown(fmt.Errorf("read: %w", err), false)
		}
		return false
	}
	if !c.handleMessage(msg) {
		r.ended = true
		return false
	}
	if c.readerOwes.Load() {
		if complete, _ := r.fr.peekFrame(); !complete {
			c.payReaderDebt() // the next read may block: answer first
		}
	}
	return true
}

// quietLocked reports whether the connection expects no input that a
// waiting caller would not read itself: no call of ours outstanding
// (returned ones may be), no call of the peer's in progress, no embargo, and no call
// from the peer lately.
func (c *Conn) quietLocked() bool {
	r := &c.read
	if c.closing || len(c.answers) > 0 || c.inProgress > 0 || len(c.embargoes) > 0 ||
		len(c.questions) > 4 || len(c.provides) > 0 || c.queuedLocked() > c.lim.MaxQueuedBytes {
		return false
	}
	for _, q := range c.questions {
		if !q.settled {
			return false
		}
	}
	if c.peerCalls != r.lastPeerCalls {
		r.lastPeerCalls = c.peerCalls
		r.lastPeerCall = time.Now()
		return false
	}
	return r.lastPeerCall.IsZero() || time.Since(r.lastPeerCall) > peerCallQuiet
}

// readForCaller reads and handles input on the calling goroutine until
// q, a native question, settles, if the read role is free; it reports
// whether q settled so. It reads only frames that fit the frame buffer,
// one Read at a time, and completes a frame before it handles it, so
// that it can stop between any two reads: when the next frame is large
// (left to the read loop, which reads those into their own buffers), or
// when q settles otherwise, cancelled through its context, which
// interrupts the Read (interruptReaderLocked).
func (c *Conn) readForCaller(q *question) bool {
	r := &c.read
	if r.state.Load() != roleFree || !r.state.CompareAndSwap(roleFree, roleCaller) {
		return false
	}
	r.takes.Add(1)
	if q.sentCtx != nil {
		c.mu.Lock()
		r.reader = q
		c.unlock()
	}
	nq := q.native
	empty := 0
	for {
		if nq.isDone() {
			c.leaveRole(true)
			return true
		}
		if r.ended {
			c.leaveRole(false)
			return false
		}
		complete, fits := r.fr.peekFrame()
		if complete && c.outputBacklogged() {
			// Handling it would wait for the writer (waitQueue), which
			// the caller's context cannot interrupt: the loop waits.
			c.leaveRole(false)
			return false
		}
		if complete {
			c.handleNext()
			continue
		}
		if !fits {
			c.leaveRole(false)
			return false
		}
		n, err := r.fr.readSome()
		switch {
		case err != nil && r.interrupted.Load():
			<-nq.doneChan() // being cancelled: settled right after the interrupt
		case err != nil:
			r.fr.rerr = err // readOne reports it after what is buffered
		case n == 0:
			if empty++; empty >= maxEmptyReads {
				r.fr.rerr = io.ErrNoProgress
			}
		default:
			empty = 0
		}
	}
}

// outputBacklogged reports whether the outbound queue is over its bound,
// so that a reader would stop reading until the writer drains it.
func (c *Conn) outputBacklogged() bool {
	c.mu.Lock()
	defer c.unlock()
	return c.queuedLocked() > c.lim.MaxQueuedBytes
}

// leaveRole ends a caller's turn with the read role: the role is left
// free if mayFree and the connection is quiet, else given to the read
// loop. An interrupted read's deadline is cleared first.
func (c *Conn) leaveRole(mayFree bool) {
	r := &c.read
	c.mu.Lock()
	if r.interrupted.Load() {
		_ = c.deadliner.SetReadDeadline(time.Time{})
		r.interrupted.Store(false)
	}
	r.reader = nil
	free := mayFree && !r.ended && r.fr.buffered() == 0 && c.quietLocked()
	if free {
		r.state.Store(roleFree)
	}
	c.unlock()
	if !free {
		r.giveToLoop()
	}
}

// interruptReaderLocked stops the Read of q's caller, if it has the read
// role: q settled otherwise (its context ended).
func (c *Conn) interruptReaderLocked(q *question) {
	r := &c.read
	if r.reader == q && !r.interrupted.Load() {
		r.interrupted.Store(true)
		_ = c.deadliner.SetReadDeadline(longAgo)
	}
}

// longAgo is a read deadline that has passed.
var longAgo = time.Unix(1, 0)

// readDeadliner is what a transport needs for callers with contexts that
// can end to read their own Returns: a Read it can interrupt.
type readDeadliner interface {
	SetReadDeadline(t time.Time) error
}

// canReadFor reports whether the caller of q, waiting with ctx, may take
// the read role: a read can be interrupted when the call is cancelled,
// and ctx ends only with it (or never).
func (c *Conn) canReadFor(q *question, ctx context.Context) bool {
	if d := ctx.Done(); d != nil && (q.sentCtx == nil || d != q.sentCtx.Done()) {
		return false
	}
	return q.sentCtx == nil || c.deadliner != nil
}

// othersSettledLocked reports whether every question but q has settled: a
// caller waiting for q alone can read its Return itself.
func (c *Conn) othersSettledLocked(q *question) bool {
	if len(c.questions) > 4 {
		return false
	}
	for _, o := range c.questions {
		if o != q && !o.settled {
			return false
		}
	}
	return true
}
