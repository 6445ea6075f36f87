package core

import (
	"context"
	"sync"
	"time"
)

// callCtx is the context a delivered call runs under. It ends when the
// caller cancels (Finish before Return), when the answer is retired, or
// when the connection shuts down. It lives inside the answer and makes
// its Done channel only when asked, so a call whose method never looks
// at its context costs no allocation for it (context.WithCancel costs
// two per call).
type callCtx struct {
	mu         sync.Mutex
	done       chan struct{} // made on first Done
	err        error
	afterFuncs []*afterFunc
}

type afterFunc struct{ f func() }

var closedChan = func() chan struct{} { ch := make(chan struct{}); close(ch); return ch }()

func (cc *callCtx) Deadline() (time.Time, bool) { return time.Time{}, false }
func (cc *callCtx) Value(any) any               { return nil }

func (cc *callCtx) Done() <-chan struct{} {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if cc.done == nil {
		if cc.err != nil {
			return closedChan
		}
		cc.done = make(chan struct{})
	}
	return cc.done
}

func (cc *callCtx) Err() error {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	return cc.err
}

// AfterFunc lets context.WithCancel and context.AfterFunc on a callCtx
// register a callback instead of starting a goroutine to wait on Done.
func (cc *callCtx) AfterFunc(f func()) (stop func() bool) {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if cc.err != nil {
		go f()
		return func() bool { return false }
	}
	af := &afterFunc{f: f}
	cc.afterFuncs = append(cc.afterFuncs, af)
	return func() bool {
		cc.mu.Lock()
		defer cc.mu.Unlock()
		for i, x := range cc.afterFuncs {
			if x == af {
				cc.afterFuncs = append(cc.afterFuncs[:i], cc.afterFuncs[i+1:]...)
				return true
			}
		}
		return false
	}
}

func (cc *callCtx) String() string { return "captp call context" }

// cancel ends the context; later calls do nothing.
func (cc *callCtx) cancel() {
	cc.mu.Lock()
	if cc.err != nil {
		cc.mu.Unlock()
		return
	}
	cc.err = context.Canceled
	if cc.done != nil {
		close(cc.done)
	}
	fs := cc.afterFuncs
	cc.afterFuncs = nil
	cc.mu.Unlock()
	for _, af := range fs {
		go af.f()
	}
}
