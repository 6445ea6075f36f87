package bench

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"
)

// TestNativeHarness runs captp-native (capnpc-captp's native stubs) on
// the in-process and two-process transports with tiny counts, flood
// included: every metric is there, the server child serves it, the flood
// is answered, and issue 5's targets are checked for it.
func TestNativeHarness(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	var progress bytes.Buffer
	transports := []Transport{Pipe, Unix, Unix2P}
	if raceEnabled {
		transports = []Transport{Unix, Unix2P}
	}
	cfg := Config{Counts: TinyCounts(), Impls: []Impl{Raw, CaptpNative}, Transports: transports, Progress: &progress}
	cfg.Counts.StreamBytes = 0
	rep, err := Run(ctx, cfg)
	if err != nil {
		t.Fatalf("Run: %v\nprogress:\n%s", err, progress.String())
	}
	for _, s := range rep.Skipped {
		t.Errorf("%s on %q did not run: %s", s.Impl, s.Transport, s.Reason)
	}
	for _, tr := range transports {
		for _, m := range []string{mSeqMedian, mRate64, mRate1024, mEcho1MiB, mAllocs64, mPipe2Ratio} {
			if res := rep.Find(tr, CaptpNative, m); res == nil || len(res.Runs) != cfg.Counts.Reps {
				t.Errorf("%s/captp-native: metric %s missing: %+v", tr, m, res)
			}
		}
	}
	if rep.Find(Unix2P, CaptpNative, mAllocs64Server) == nil {
		t.Error("two processes: no server-side allocation count for captp-native")
	}
	for _, f := range rep.Floods {
		if f.Impl == CaptpNative && f.Finish && !f.AllAnswered() {
			t.Errorf("captp-native flood: %+v; want every call answered", f)
		}
	}
	checked := map[Transport]int{}
	for _, tg := range rep.Targets {
		if tg.Impl == CaptpNative {
			checked[tg.Transport]++
		}
	}
	for _, tr := range transports {
		// latency and 1 MiB echo against raw, allocations, 2-hop
		if checked[tr] < 4 {
			t.Errorf("%s: %d targets checked for captp-native; want latency, allocations, 1 MiB echo and 2-hop", tr, checked[tr])
		}
	}
	var table bytes.Buffer
	if err := rep.WriteTable(&table); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(table.String(), "captp-native") {
		t.Errorf("the table does not show captp-native:\n%s", table.String())
	}
}
