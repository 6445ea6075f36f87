package core

import (
	"context"

	"capnproto.org/go/capnp/v3"
)

// pendingWork is something a manual Conn must finish later: exactly one of
// its variants is set. A normal Conn uses a goroutine for each instead.
type pendingWork struct {
	// done/run: run once done is closed (a forwarded call's answer).
	done <-chan struct{}
	run  func()

	// promise/client/ctx: send Resolve once the exported promise settles.
	promise *export
	client  capnp.Client
	ctx     context.Context

	// cancel: cancel the question once its caller's context ends.
	cancel *question
}

// whenDone runs f once done is closed: in a goroutine normally, from poll
// in manual mode.
func (c *Conn) whenDone(done <-chan struct{}, f func()) {
	if !c.manual {
		go func() {
			<-done
			f()
		}()
		return
	}
	c.mu.Lock()
	c.pending = append(c.pending, pendingWork{done: done, run: f})
	c.unlock()
}

// ready reports, without blocking, whether w can run now; settled means
// it never will (and should be dropped).
func (w *pendingWork) ready() (run, drop bool) {
	switch {
	case w.run != nil:
		select {
		case <-w.done:
			return true, true
		default:
			return false, false
		}
	case w.promise != nil:
		if w.ctx.Err() != nil {
			return false, true
		}
		snap := w.client.Snapshot()
		defer snap.Release()
		// A snapshot is as resolved as it can get without waiting, so it
		// is still a promise only while the promise is unresolved.
		h, stuck := stuckOn(snap)
		settled := !snap.IsPromise() || (stuck && h.isSettled())
		return settled, settled
	case w.cancel != nil:
		if w.cancel.settled {
			return false, true
		}
		if w.cancel.ctx.Err() != nil {
			return true, true
		}
		return false, false
	}
	return false, true
}

// poll runs, in order, every pending piece of work that is ready. It
// reports whether it did anything. Only manual Conns have pending work.
func (c *Conn) poll() bool {
	c.mu.Lock()
	work := c.pending
	c.pending = nil
	c.unlock()
	did := false
	var keep []pendingWork
	for i := range work {
		w := &work[i]
		c.mu.Lock()
		run, drop := w.ready()
		c.unlock()
		if run {
			did = true
			switch {
			case w.run != nil:
				w.run()
			case w.promise != nil:
				c.resolveExport(w.promise, w.client)
			case w.cancel != nil:
				w.cancel.cancel(w.cancel.ctx.Err())
			}
		}
		if drop {
			if w.promise != nil {
				w.client.Release()
			}
			continue
		}
		keep = append(keep, *w)
	}
	c.mu.Lock()
	c.pending = append(keep, c.pending...)
	c.unlock()
	return did
}

// finishManualShutdown is finishShutdown for a manual Conn: there are no
// goroutines to wait for.
func (c *Conn) finishManualShutdown() {
	c.mu.Lock()
	boot := c.bootstrap
	c.bootstrap = capnp.Client{}
	// Forwarded calls still complete (their questions were rejected just
	// now); promise watches are moot.
	var keep []pendingWork
	for _, w := range c.pending {
		if w.promise != nil {
			defer w.client.Release()
			continue
		}
		keep = append(keep, w)
	}
	c.pending = keep
	c.unlock()
	boot.Release()
	close(c.done)
}

// takeOutput returns the frames queued for the peer (manual mode).
func (c *Conn) takeOutput() []byte {
	c.mu.Lock()
	defer c.unlock()
	out := c.out
	c.out = nil
	return out
}
