package bench

import (
	"strings"
	"testing"
)

// A ratio target whose verdict would flip against a single run of either
// side is marked noisy and gives the range; one whose verdict holds is
// reported plainly. Met is decided from the medians either way.
func TestTargetsMarkNoisyRuns(t *testing.T) {
	r := &Report{Results: []*Result{
		{Transport: Unix2P, Impl: Raw, Metric: mSeqMedian, Unit: "µs", Runs: []float64{27.8, 40.4, 55.7, 30, 45}},
		{Transport: Unix2P, Impl: CaptpNative, Metric: mSeqMedian, Unit: "µs", Runs: []float64{56.4, 66.1, 73.5, 60, 70}},
		{Transport: Unix, Impl: Raw, Metric: mSeqMedian, Unit: "µs", Runs: []float64{11.9, 12.3, 12.4, 12.1, 12.2}},
		{Transport: Unix, Impl: CaptpNative, Metric: mSeqMedian, Unit: "µs", Runs: []float64{24.8, 25.5, 26.2, 25.0, 25.2}},
		{Transport: Unix, Impl: CaptpNative, Metric: mPipe2Ratio, Unit: "×", Runs: []float64{1.9, 1.1, 2.2, 1.8, 2.0}},
		{Transport: Unix2P, Impl: CaptpNative, Metric: mPipe2Ratio, Unit: "×", Runs: []float64{1.6, 1.7, 1.8, 1.5, 1.7}},
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
		t.Errorf("2-process target: noisy %v, met %v; want both (floor runs 27.8–55.7, median ratio 1.64)", noisy.Noisy, noisy.Met)
	}
	// 66.1/55.7 = 1.19 up to 66.1/27.8 = 2.38.
	if want := "1.64× (not robust: 1.19–2.38× against single runs)"; noisy.Measured != want {
		t.Errorf("2-process target measured %q; want %q", noisy.Measured, want)
	}
	quiet := find(Unix)
	if quiet.Noisy || quiet.Met || quiet.Measured != "2.07×" {
		t.Errorf("Unix target: noisy %v, met %v, measured %q; want quiet, not met, 2.07× (not met against any single run either)", quiet.Noisy, quiet.Met, quiet.Measured)
	}
	for _, c := range []struct {
		tr    Transport
		noisy bool
		want  string
	}{
		{Unix, true, "1.90× (not robust: 1.10–2.20× in single runs)"},
		{Unix2P, false, "1.70×"},
	} {
		found := false
		for _, tg := range r.Targets {
			if tg.Transport == c.tr && tg.Impl == CaptpNative && strings.HasPrefix(tg.Goal, "2-hop") {
				found = true
				if tg.Noisy != c.noisy || tg.Met || tg.Measured != c.want {
					t.Errorf("%s 2-hop target: noisy %v, met %v, measured %q; want noisy %v, not met, %q", c.tr, tg.Noisy, tg.Met, tg.Measured, c.noisy, c.want)
				}
			}
		}
		if !found {
			t.Errorf("no 2-hop target for %s", c.tr)
		}
	}
}
