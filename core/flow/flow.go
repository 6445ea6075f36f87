// Package flow is flow control for calls to a remote object: a
// flowcontrol.FlowLimiter (the interface go-capnp's capnp.Client consults
// on every call) whose window of bytes in flight either stays fixed or
// adapts to the link, and a Pool that caps the bytes in flight to all the
// objects of one connection together.
//
// A call is in flight from when it is sent until its Return arrives. For a
// streaming method (`-> stream`) the Return is the receiver's
// acknowledgement, so the window bounds what a slow receiver can be made
// to hold, and a sender that fills it waits: that is the backpressure.
//
// The adaptive window follows BBR (Cardwell et al., "BBR: congestion-based
// congestion control", ACM Queue 2016), the approach the C++ v2 branch and
// Cap'n Web took: it estimates the delivery rate (a maximum over the last
// ten round trips) and the minimum round-trip time, and keeps twice their
// product — the bandwidth-delay product — in flight, within
// [Config.MinWindow, Config.MaxWindow]. It starts from Config.Window and
// grows by what is acknowledged (doubling per round trip) until the rate
// stops growing. Because the window holds a queue at the receiver, the
// minimum RTT would drift upwards; every ten seconds the window drops to
// MinWindow for a round trip (at least 200 ms) to measure it again.
//
// Everything is driven by the calls and an injectable clock, so the
// window is a deterministic function of the call and acknowledgement
// times.
//
// Like go-capnp's limiters, StartMessage runs after the message has been
// sent (capnp.Client.SendCall measures the message by building it), so a
// sender can exceed the window by the one message it is waiting with.
package flow

import (
	"context"
	"fmt"
	"sync"
	"time"

	"capnproto.org/go/capnp/v3/flowcontrol"
)

// Mode selects the flow-control policy.
type Mode uint8

const (
	// Adaptive sizes each object's window to the measured bandwidth-delay
	// product. It is the default.
	Adaptive Mode = iota
	// Fixed keeps each object's window at Config.Window.
	Fixed
	// Off disables flow control: calls are sent as fast as they are made,
	// bounded only by the connection's outbound queue.
	Off
)

func (m Mode) String() string {
	switch m {
	case Adaptive:
		return "adaptive"
	case Fixed:
		return "fixed"
	case Off:
		return "off"
	}
	return fmt.Sprintf("Mode(%d)", uint8(m))
}

// Config configures flow control. Zero fields take the values in Defaults.
type Config struct {
	Mode Mode
	// Window is the fixed window in bytes (Fixed), or the starting window
	// (Adaptive).
	Window int
	// MinWindow and MaxWindow bound the adaptive window.
	MinWindow int
	MaxWindow int
	// ConnWindow bounds the bytes in flight to all objects of a Pool (one
	// connection) together.
	ConnWindow int
	// Clock returns monotonic time since an arbitrary origin. Nil: the
	// wall clock's monotonic reading. Tests inject one to make the
	// adaptive window reproducible.
	Clock func() time.Duration
}

// Defaults are used for every zero field of a Config.
var Defaults = Config{
	Mode:   Adaptive,
	Window: 1 << 20,
	// At least four 256 KiB stream chunks: go-capnp starts a message's
	// clock only after the message is written, so the measured RTT
	// misses the sender's own write time and the bandwidth-delay
	// product comes out low; below this a stream's pipeline runs dry.
	MinWindow:  1 << 20,
	MaxWindow:  8 << 20,
	ConnWindow: 16 << 20,
}

// WithDefaults returns c with every zero field set from Defaults, and the
// windows made consistent (MinWindow ≤ Window ≤ MaxWindow ≤ ConnWindow
// is not required of ConnWindow: a small connection budget is allowed).
func (c Config) WithDefaults() Config {
	d := Defaults
	if c.Window <= 0 {
		c.Window = d.Window
	}
	if c.MinWindow <= 0 {
		c.MinWindow = min(d.MinWindow, c.Window)
	}
	if c.MaxWindow <= 0 {
		c.MaxWindow = max(d.MaxWindow, c.Window)
	}
	if c.ConnWindow <= 0 {
		c.ConnWindow = max(d.ConnWindow, c.MaxWindow)
	}
	c.MinWindow = min(c.MinWindow, c.MaxWindow)
	c.Window = min(max(c.Window, c.MinWindow), c.MaxWindow)
	if c.Clock == nil {
		origin := time.Now()
		c.Clock = func() time.Duration { return time.Since(origin) }
	}
	return c
}

// A Pool is the flow-control budget of one connection: the limiters made
// by NewLimiter each have their own window, and together never have more
// than ConnWindow bytes in flight (except for one message larger than
// that, sent alone).
//
// Its mutex guards the pool and all its limiters, so that a message can
// be admitted against both budgets at once.
type Pool struct {
	cfg Config

	mu       sync.Mutex
	inFlight int
	peak     int
	waiters  []*waiter // FIFO
	scan     uint64    // generation of wakeLocked, see Limiter.skip
}

// NewPool returns a pool configured by cfg (zero fields take Defaults).
func NewPool(cfg Config) *Pool {
	return &Pool{cfg: cfg.WithDefaults()}
}

// Config returns the pool's configuration, defaults applied.
func (p *Pool) Config() Config { return p.cfg }

// PoolStats describes a pool.
type PoolStats struct {
	InFlight     int // bytes in flight now
	PeakInFlight int // most bytes in flight at once
	Waiting      int // senders waiting for room
}

// Stats returns the pool's current figures.
func (p *Pool) Stats() PoolStats {
	p.mu.Lock()
	defer p.mu.Unlock()
	return PoolStats{InFlight: p.inFlight, PeakInFlight: p.peak, Waiting: len(p.waiters)}
}

// NewLimiter returns a limiter for one object, drawing on the pool's
// budget, or nil when the mode is Off.
func (p *Pool) NewLimiter() *Limiter {
	if p.cfg.Mode == Off {
		return nil
	}
	l := &Limiter{p: p, window: p.cfg.Window}
	return l
}

// NewLimiter returns a limiter with a pool of its own: one object's flow
// control outside any connection (for example for a capability of
// another RPC implementation). Nil when cfg.Mode is Off.
func NewLimiter(cfg Config) *Limiter { return NewPool(cfg).NewLimiter() }

// A Limiter is the flow control of one object. It implements
// flowcontrol.FlowLimiter: set it on a capnp.Client with SetFlowLimiter,
// and the client's calls wait while the window is full. Several clients
// may share it; Release does nothing, so dropping one client does not
// affect the others.
type Limiter struct {
	p *Pool

	// Guarded by p.mu.
	inFlight int
	window   int
	waiting  int    // this limiter's waiters in p.waiters
	skip     uint64 // p.scan in which an earlier waiter of ours did not fit
	free     []*token
	est      estimator
	stats    Stats
}

var _ flowcontrol.FlowLimiter = (*Limiter)(nil)

// Stats describes a limiter.
type Stats struct {
	Window       int           // the current window in bytes
	InFlight     int           // bytes in flight now
	PeakInFlight int           // most bytes in flight at once
	Messages     uint64        // messages admitted
	Waits        uint64        // messages that had to wait for room
	Bandwidth    float64       // estimated delivery rate, bytes per second (Adaptive)
	MinRTT       time.Duration // estimated round-trip time without queueing (Adaptive)
}

// Stats returns the limiter's current figures.
func (l *Limiter) Stats() Stats {
	l.p.mu.Lock()
	defer l.p.mu.Unlock()
	s := l.stats
	s.Window = l.effectiveWindowLocked()
	s.InFlight = l.inFlight
	if l.p.cfg.Mode == Adaptive {
		s.Bandwidth = l.est.bandwidth() * float64(time.Second)
		s.MinRTT = l.est.minRTT
	}
	return s
}

// A token is one admitted message. Tokens are recycled so that a call
// costs no allocation here; done is bound once, when the token is made.
type token struct {
	l    *Limiter
	size int
	sent time.Duration
	// delivered and deliveredAt are the limiter's counters when the
	// message was sent, for the delivery-rate sample at its ack.
	delivered   int64
	deliveredAt time.Duration
	done        func()
}

// maxFreeTokens bounds the recycled tokens a limiter keeps.
const maxFreeTokens = 256

type waiter struct {
	l       *Limiter
	size    int
	sent    time.Duration
	ready   chan struct{}
	granted *token
}

// TryStartMessage is StartMessage when the message fits at once; it
// reports false, admitting nothing, when StartMessage would wait (a
// caller that holds back output it should send first, say).
func (l *Limiter) TryStartMessage(size uint64) (gotResponse func(), ok bool) {
	p := l.p
	p.mu.Lock()
	defer p.mu.Unlock()
	if t := l.admitNowLocked(l.clamp(size), p.cfg.Clock()); t != nil {
		return t.done, true
	}
	return nil, false
}

// StartMessage waits until a message of size bytes fits in the window
// and the pool's budget, or ctx is done. On success the caller must call
// gotResponse once, when the call's Return arrives.
func (l *Limiter) StartMessage(ctx context.Context, size uint64) (gotResponse func(), err error) {
	p := l.p
	n := l.clamp(size)
	p.mu.Lock()
	now := p.cfg.Clock()
	if t := l.admitNowLocked(n, now); t != nil {
		p.mu.Unlock()
		return t.done, nil
	}
	w := &waiter{l: l, size: n, sent: now, ready: make(chan struct{})}
	p.waiters = append(p.waiters, w)
	l.waiting++
	l.stats.Waits++
	p.mu.Unlock()

	select {
	case <-w.ready:
		return w.granted.done, nil
	case <-ctx.Done():
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if w.granted != nil {
		return w.granted.done, nil
	}
	for i, o := range p.waiters {
		if o == w {
			p.waiters = append(p.waiters[:i], p.waiters[i+1:]...)
			break
		}
	}
	l.waiting--
	p.wakeLocked() // our place in the queue may have held others back
	return nil, fmt.Errorf("flow control: waiting for %d bytes of window: %w", n, ctx.Err())
}

// Release does nothing: a limiter belongs to its object, not to any one
// client that uses it.
func (l *Limiter) Release() {}

// clamp is the size a message counts for: any oversize message goes
// alone.
func (l *Limiter) clamp(size uint64) int {
	return int(min(size, uint64(l.p.cfg.ConnWindow)+1))
}

// admitNowLocked admits n bytes if they fit without waiting (and nobody
// waits before them), else returns nil.
func (l *Limiter) admitNowLocked(n int, now time.Duration) *token {
	if l.waiting == 0 && l.fitsLocked(n) {
		return l.admitLocked(n, now)
	}
	return nil
}

// fitsLocked reports whether n more bytes fit this limiter's window and
// the pool's budget. An idle limiter or pool admits any message, so one
// larger than the window is sent alone rather than never.
func (l *Limiter) fitsLocked(n int) bool {
	p := l.p
	return (l.inFlight == 0 || l.inFlight+n <= l.effectiveWindowLocked()) &&
		(p.inFlight == 0 || p.inFlight+n <= p.cfg.ConnWindow)
}

func (l *Limiter) effectiveWindowLocked() int {
	if l.est.probing {
		return l.p.cfg.MinWindow
	}
	return l.window
}

func (l *Limiter) admitLocked(n int, sent time.Duration) *token {
	p := l.p
	var t *token
	if k := len(l.free); k > 0 {
		t, l.free = l.free[k-1], l.free[:k-1]
	} else {
		t = &token{l: l}
		t.done = t.ack
	}
	if l.inFlight == 0 {
		// Idle time is not delivery time: restart the rate interval.
		l.est.deliveredAt = sent
	}
	t.size, t.sent = n, sent
	t.delivered, t.deliveredAt = l.est.delivered, l.est.deliveredAt
	l.inFlight += n
	p.inFlight += n
	l.stats.PeakInFlight = max(l.stats.PeakInFlight, l.inFlight)
	p.peak = max(p.peak, p.inFlight)
	l.stats.Messages++
	return t
}

// ack is a token's gotResponse: the message is no longer in flight.
func (t *token) ack() {
	l := t.l
	p := l.p
	p.mu.Lock()
	defer p.mu.Unlock()
	l.inFlight -= t.size
	p.inFlight -= t.size
	if p.cfg.Mode == Adaptive {
		l.window = l.est.onAck(t, p.cfg.Clock(), l.window, &p.cfg)
	}
	if len(l.free) < maxFreeTokens {
		l.free = append(l.free, t)
	}
	p.wakeLocked()
}

// wakeLocked admits waiters in order while they fit. A waiter that does
// not fit its object's window holds back only that object's later
// waiters; one that does not fit the pool's budget holds back everyone,
// so that large messages are not starved by small ones.
func (p *Pool) wakeLocked() {
	if len(p.waiters) == 0 {
		return
	}
	p.scan++
	kept := p.waiters[:0]
	blocked := false
	for _, w := range p.waiters {
		l := w.l
		if blocked || l.skip == p.scan {
			kept = append(kept, w)
			continue
		}
		if !l.fitsLocked(w.size) {
			if l.inFlight == 0 || l.inFlight+w.size <= l.effectiveWindowLocked() {
				blocked = true // the pool is full
			}
			l.skip = p.scan
			kept = append(kept, w)
			continue
		}
		w.granted = l.admitLocked(w.size, w.sent)
		l.waiting--
		close(w.ready)
	}
	clear(p.waiters[len(kept):])
	p.waiters = kept
}
