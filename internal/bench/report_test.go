package bench

import (
	"strings"
	"testing"
)

// A ratio target whose runs spread widely on either side is marked noisy
// and gives both ranges; one whose runs agree is reported plainly. Met is
// decided from the medians either way.
func TestTargetsMarkNoisyRuns(t *testing.T) {
	r := &Report{Results: []*Result{
		{Transport: Unix2P, Impl: Raw, Metric: mSeqMedian, Unit: "µs", Runs: []float64{27.8, 40.4, 55.7, 30, 45}},
		{Transport: Unix2P, Impl: CaptpNative, Metric: mSeqMedian, Unit: "µs", Runs: []float64{56.4, 66.1, 73.5, 60, 70}},
		{Transport: Unix, Impl: Raw, Metric: mSeqMedian, Unit: "µs", Runs: []float64{11.7, 12.3, 13.4, 12, 12.5}},
		{Transport: Unix, Impl: CaptpNative, Metric: mSeqMedian, Unit: "µs", Runs: []float64{24, 25, 26.2, 24.5, 25.5}},
	}}
	r.finish()
	find := func(tr Transport) Target {
		t.Helper()
		for _, tg := range r.Targets {
			if tg.Transport == tr && tg.Impl == CaptpNative && strings.HasPrefix(tg.Goal, "sequential latency") {
				return tg
			}
		}
		t.Fatalf("no sequential latency target for %s", tr)
		return Target{}
	}
	noisy := find(Unix2P)
	if !noisy.Noisy || !noisy.Met {
		t.Errorf("2-process target: noisy %v, met %v; want both (floor runs 27.8–55.7, median ratio 1.6)", noisy.Noisy, noisy.Met)
	}
	if want := "raw 27.8–55.7, captp-native 56.4–73.5 µs"; !strings.Contains(noisy.Measured, want) {
		t.Errorf("2-process target measured %q; want it to contain %q", noisy.Measured, want)
	}
	quiet := find(Unix)
	if quiet.Noisy || quiet.Met || quiet.Measured != "2.03×" {
		t.Errorf("Unix target: noisy %v, met %v, measured %q; want quiet, not met, 2.03×", quiet.Noisy, quiet.Met, quiet.Measured)
	}
}
