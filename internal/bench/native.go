package bench

import (
	"context"
	"fmt"
	"time"

	"github.com/captp-go/captp/internal/testnative"
)

// nativeSession drives captp's native call path: internal/testnative's
// client, thin wrappers over the stubs capnpc-captp generates (core.Call),
// against its generated server (a core.Handler).
type nativeSession struct {
	boot    testnative.Test
	m       meter
	cleanup func()
}

func (s *nativeSession) close() error { s.cleanup(); return nil }

func checkNative(ctx context.Context, c testnative.EchoCall, size int) error {
	d, err := c.Data(ctx)
	if err != nil {
		return err
	}
	if len(d) != size {
		return fmt.Errorf("echo returned %d bytes; want %d", len(d), size)
	}
	return nil
}

func (s *nativeSession) lat(ctx context.Context, n, size int) (result, error) {
	data := payload(size)
	return s.m.timedCalls(n, func() error {
		c := s.boot.Echo(ctx, data)
		defer c.Release()
		return checkNative(ctx, c, size)
	})
}

func (s *nativeSession) flight(ctx context.Context, n, k, size int) (result, error) {
	data := payload(size)
	ring := make([]testnative.EchoCall, k)
	r := result{calls: n}
	mk, err := s.m.start()
	if err != nil {
		return r, err
	}
	start := time.Now()
	issued := 0
	for ; issued < n && issued < k; issued++ {
		ring[issued] = s.boot.Echo(ctx, data)
	}
	var firstErr error
	for done := range n {
		p := &ring[done%k]
		if err := checkNative(ctx, *p, size); err != nil && firstErr == nil {
			firstErr = err
		}
		p.Release()
		if issued < n {
			*p = s.boot.Echo(ctx, data)
			issued++
		}
	}
	r.elapsed = time.Since(start)
	if firstErr != nil {
		return r, firstErr
	}
	return r, s.m.stop(mk, &r)
}

func (s *nativeSession) pipe2(ctx context.Context, n int) (result, error) {
	data := payload(16)
	return s.m.timedCalls(n, func() error {
		c := s.boot.Child(ctx, "x")
		defer c.Release()
		child := c.Child()
		defer child.Release()
		e := child.Echo(ctx, data)
		defer e.Release()
		return checkNative(ctx, e, 16)
	})
}
