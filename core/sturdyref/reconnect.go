package sturdyref

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/core"
)

// A Dialer opens a connection to the vat a sturdy ref names, over the
// transport and with the authentication the ref asks for. Adapters provide
// them (unix.SturdyDialer, netstack's Stack.SturdyDialer).
type Dialer func(ctx context.Context, ref Ref) (*core.Conn, error)

// ReconnectOptions configure a Reconnecting. Zero fields take defaults.
type ReconnectOptions struct {
	// MinBackoff is the wait after the first failed dial (default 50 ms);
	// each further failure doubles it, up to MaxBackoff (default 5 s),
	// with ±20% jitter so that many clients do not redial in step.
	MinBackoff, MaxBackoff time.Duration
	// DialTimeout bounds one dial attempt (default 10 s), so that a dial
	// that hangs (a peer that vanished without a reset) is retried.
	DialTimeout time.Duration
	// Logger receives connection losses and failed dials. Nil discards.
	Logger *slog.Logger
}

// ErrClosed is returned by a Reconnecting after Close.
var ErrClosed = errors.New("sturdyref: reconnecting client closed")

// Reconnecting holds a sturdy ref and a connection to its vat: it connects
// on first use, restores the capability, and after the connection is lost
// connects and restores again, so a long-lived client survives a server
// restart. It is safe for concurrent use; one dial runs at a time, and
// others wait for it.
type Reconnecting struct {
	ref         Ref
	dial        Dialer
	min         time.Duration
	max         time.Duration
	dialTimeout time.Duration
	log         *slog.Logger

	mu       sync.Mutex
	conn     *core.Conn
	client   capnp.Client  // restored on conn
	dialing  chan struct{} // closed when the dial in progress ends
	failures int
	nextDial time.Time
	connAt   time.Time // when conn was made
	closed   bool
}

// NewReconnecting returns a Reconnecting for ref; it does not connect yet.
func NewReconnecting(ref Ref, dial Dialer, opts *ReconnectOptions) *Reconnecting {
	if opts == nil {
		opts = &ReconnectOptions{}
	}
	r := &Reconnecting{ref: ref, dial: dial, min: opts.MinBackoff, max: opts.MaxBackoff, dialTimeout: opts.DialTimeout, log: opts.Logger}
	if r.dialTimeout <= 0 {
		r.dialTimeout = 10 * time.Second
	}
	if r.min <= 0 {
		r.min = 50 * time.Millisecond
	}
	if r.max < r.min {
		r.max = max(5*time.Second, r.min)
	}
	if r.log == nil {
		r.log = slog.New(slog.DiscardHandler)
	}
	return r
}

// Client returns the restored capability (a reference the caller
// releases), connecting first if there is no live connection. Failed dials
// are retried with backoff until one succeeds or ctx ends. The capability
// is a promise: a revoked or unknown service shows as the error of calls
// on it, not here.
func (r *Reconnecting) Client(ctx context.Context) (capnp.Client, error) {
	var lastErr error
	for {
		r.mu.Lock()
		if r.closed {
			r.mu.Unlock()
			return capnp.Client{}, ErrClosed
		}
		if r.conn != nil {
			select {
			case <-r.conn.Done():
				r.log.Info("sturdyref: connection lost", "vat", r.ref.Redacted(), "err", r.conn.Err())
				r.dropLocked()
			default:
				c := r.client.AddRef()
				r.mu.Unlock()
				return c, nil
			}
		}
		if ch := r.dialing; ch != nil {
			r.mu.Unlock()
			select {
			case <-ch:
				continue
			case <-ctx.Done():
				return capnp.Client{}, fmt.Errorf("sturdyref: connect to %s: %w", r.ref.Redacted(), ctx.Err())
			}
		}
		ch := make(chan struct{})
		r.dialing = ch
		wait := time.Until(r.nextDial)
		r.mu.Unlock()

		err := r.connect(ctx, wait)
		r.mu.Lock()
		r.dialing = nil
		close(ch)
		r.mu.Unlock()
		if err == nil {
			continue
		}
		if errors.Is(err, ErrClosed) {
			return capnp.Client{}, err
		}
		if ctx.Err() == nil || !errors.Is(err, ctx.Err()) {
			lastErr = err // a dial's error, not the wait's
		}
		if ctx.Err() != nil {
			if lastErr == nil {
				return capnp.Client{}, fmt.Errorf("sturdyref: connect to %s: %w", r.ref.Redacted(), ctx.Err())
			}
			return capnp.Client{}, fmt.Errorf("sturdyref: connect to %s: %w (last error: %v)", r.ref.Redacted(), ctx.Err(), lastErr)
		}
	}
}

// connect waits out the backoff, dials and restores; on success the new
// connection is installed.
func (r *Reconnecting) connect(ctx context.Context, wait time.Duration) error {
	if wait > 0 {
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		}
	}
	dctx, cancel := context.WithTimeout(ctx, r.dialTimeout)
	conn, err := r.dial(dctx, r.ref)
	cancel()
	if err != nil {
		r.mu.Lock()
		d := r.backoffLocked()
		r.mu.Unlock()
		r.log.Info("sturdyref: dial failed", "vat", r.ref.Redacted(), "err", err, "retry_in", d)
		return err
	}
	// The restore outlives ctx, which bounds this attempt only.
	client := conn.Restore(context.WithoutCancel(ctx), r.ref.ServiceID)
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		client.Release()
		conn.Close()
		return ErrClosed
	}
	r.conn, r.client = conn, client
	r.connAt = time.Now()
	r.nextDial = time.Time{}
	r.mu.Unlock()
	return nil
}

// backoffLocked records a failure and sets when the next dial may start.
func (r *Reconnecting) backoffLocked() time.Duration {
	r.failures++
	d := min(r.max, r.min<<min(r.failures-1, 20))
	d = time.Duration(float64(d) * (0.8 + 0.4*rand.Float64()))
	r.nextDial = time.Now().Add(d)
	return d
}

// dropLocked forgets the current connection (closing it if it is still
// up) so the next use dials again: at once if the connection lived a
// while, after a backoff if it died young (a vat that accepts and then
// drops every connection must not be redialled in a tight loop).
func (r *Reconnecting) dropLocked() {
	if time.Since(r.connAt) < r.max {
		r.backoffLocked()
	} else {
		r.failures = 0
	}
	conn, client := r.conn, r.client
	r.conn, r.client = nil, capnp.Client{}
	r.mu.Unlock()
	client.Release()
	conn.Close()
	r.mu.Lock()
}

// Do calls f with the capability, and if f fails because the connection
// was lost (a disconnected error), reconnects and calls f again, until f
// succeeds, fails otherwise, or ctx ends. f may therefore run more than
// once: use Do for calls that are safe to repeat. f must not keep the
// client after it returns.
func (r *Reconnecting) Do(ctx context.Context, f func(ctx context.Context, c capnp.Client) error) error {
	for {
		c, err := r.Client(ctx)
		if err != nil {
			return err
		}
		err = f(ctx, c)
		if err == nil || !capnp.IsDisconnected(err) || ctx.Err() != nil {
			c.Release()
			return err
		}
		r.log.Info("sturdyref: call failed with the connection, reconnecting", "vat", r.ref.Redacted(), "err", err)
		r.invalidate(c)
		c.Release()
	}
}

// invalidate drops the connection that c came from if it is still the
// current one: its calls fail as disconnected even if its Done has not
// fired yet.
func (r *Reconnecting) invalidate(c capnp.Client) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.conn != nil && r.client.IsSame(c) {
		r.dropLocked()
	}
}

// Close closes the connection and releases the capability; later calls
// return ErrClosed.
func (r *Reconnecting) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	if r.conn != nil {
		r.dropLocked()
	}
	r.mu.Unlock()
	return nil
}
