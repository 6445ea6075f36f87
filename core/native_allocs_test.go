//go:build unix && !race

package core_test

import (
	"context"
	"testing"
)

// Allocations per call on the native path, both sides in one process
// (issue 5's target is 6 per side): a regression here shows up in the
// benchmark's allocation figures. Not under -race, which allocates.
func TestNativeCallAllocations(t *testing.T) {
	boot, done := nativePair(t)
	defer done()
	ctx := context.Background()
	echo := func() {
		p := boot.Echo(ctx, payload16)
		if _, err := p.Data(ctx); err != nil {
			t.Fatal(err)
		}
		p.Release()
	}
	twoHop := func() {
		if err := nativeTwoHop(ctx, boot); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name string
		call func()
		max  float64
	}{
		{"echo", echo, 4},     // client 3, server 1 (5 until session 10 made the done channel lazy)
		{"2-hop", twoHop, 60}, // 54–57 since session 12 (62–63 before); it varies with which goroutine reads
	} {
		for range 100 {
			tc.call() // warm the pools
		}
		if got := testing.AllocsPerRun(500, tc.call); got > tc.max {
			t.Errorf("%s: %.1f allocations per call, both sides; want at most %.0f", tc.name, got, tc.max)
		} else {
			t.Logf("%s: %.1f allocations per call, both sides", tc.name, got)
		}
	}
}
