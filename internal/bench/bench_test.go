package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// TestMain runs the bench server when the harness re-executes this test
// binary as its child process (see Config.ChildCommand).
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == ServerCommand {
		os.Exit(ServerMain(os.Args[2:], os.Stdin, os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// TestHarness runs every implementation on every transport with tiny
// counts: the harness works end to end, and its table and JSON carry
// every metric. The C++ reference takes part when its program is already
// built (building it takes longer than this test may).
func TestHarness(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	var progress bytes.Buffer
	cfg := Config{Counts: TinyCounts(), CppCachedOnly: true, Progress: &progress}
	defer func() { t.Logf("progress:\n%s", progress.String()) }()
	transports := AllTransports
	if raceEnabled {
		// The in-memory pipe adds nothing the Unix socket does not
		// cover, and the race detector makes every run slow. The
		// netstack section has a test of its own.
		transports = []Transport{Unix, Unix2P}
		cfg.Transports = transports
	}
	start := time.Now()
	rep, err := Run(ctx, cfg)
	if err != nil {
		t.Fatalf("Run: %v\nprogress:\n%s", err, progress.String())
	}
	t.Logf("harness ran in %v", time.Since(start).Round(time.Millisecond))

	var table bytes.Buffer
	if err := rep.WriteTable(&table); err != nil {
		t.Fatal(err)
	}
	t.Logf("table:\n%s", table.String())
	for _, s := range rep.Skipped {
		if s.Impl != Cpp || !strings.HasPrefix(s.Reason, "skipped:") {
			t.Errorf("%s on %q did not run: %s", s.Impl, s.Transport, s.Reason)
		}
	}
	for _, tr := range transports {
		if netTransport(tr) {
			continue // checked by checkNetstack
		}
		for _, im := range []Impl{Raw, Captp, GoCapnp} {
			for _, m := range []string{mSeqMedian, mRate64, mRate1024, mEcho1MiB, mAllocs64, mCPU64} {
				res := rep.Find(tr, im, m)
				if res == nil || len(res.Runs) != cfg.Counts.Reps || res.Median <= 0 && m != mAllocs64 {
					t.Errorf("%s/%s: metric %s missing or empty: %+v", tr, im, m, res)
				}
			}
			if im != Raw && rep.Find(tr, im, mPipe2Ratio) == nil {
				t.Errorf("%s/%s: no pipelining figure", tr, im)
			}
		}
		if res := rep.Find(tr, Captp, mSeqMedian); res != nil && (res.VsRaw == nil || res.VsGoCapnp == nil) {
			t.Errorf("%s: captp's latency has no ratio to the floor or go-capnp: %+v", tr, res)
		}
	}
	for _, im := range []Impl{Raw, Captp} {
		for _, m := range []string{mStreamRate, mStreamHeap} {
			if res := rep.Find(Unix, im, m); res == nil || len(res.Runs) != cfg.Counts.Reps {
				t.Errorf("stream/%s: metric %s missing: %+v", im, m, res)
			}
		}
	}
	if res := rep.Find(Unix, Captp, mStreamRate); res != nil && res.VsRaw == nil {
		t.Errorf("the stream has no ratio to the raw floor: %+v", res)
	}
	if !strings.Contains(table.String(), "ByteStream ≥ 0.5× raw") {
		t.Errorf("the table lacks the stream target")
	}
	if !raceEnabled {
		checkNetstack(t, cfg, rep, table.String())
	}
	if rep.Find(Unix2P, Captp, mAllocs64Server) == nil {
		t.Error("two processes: no server-side allocation count")
	}
	if n := len(rep.Floods); n < 4 {
		t.Errorf("%d floods; want captp and go-capnp, finished and not", n)
	}
	for _, f := range rep.Floods {
		if f.Impl == Captp && f.Finish && !f.AllAnswered() {
			t.Errorf("captp flood: %+v; want every call answered", f)
		}
	}
	if !strings.Contains(table.String(), "×go-capnp") || !strings.Contains(table.String(), "targets") {
		t.Errorf("the table lacks ratios or targets")
	}

	var js bytes.Buffer
	if err := rep.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(js.Bytes(), &back); err != nil {
		t.Fatalf("JSON does not read back: %v", err)
	}
	if len(back.Results) != len(rep.Results) {
		t.Errorf("JSON has %d results; want %d", len(back.Results), len(rep.Results))
	}
}

// TestNetstackSection runs only the netstack section (kernel loopback TCP
// and netstack), with tiny counts, and checks that it leaves no goroutine
// behind: every connection and Network is closed.
func TestNetstackSection(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	var progress bytes.Buffer
	// go-capnp is selected but does not run on these transports.
	cfg := Config{Counts: TinyCounts(), Transports: []Transport{TCP, Netstack}, Impls: []Impl{Raw, Captp, GoCapnp},
		NoFlood: true, Progress: &progress}
	defer func() { t.Logf("progress:\n%s", progress.String()) }()
	start := time.Now()
	rep, err := Run(ctx, cfg)
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	t.Logf("section ran in %v", time.Since(start).Round(time.Millisecond))
	var table bytes.Buffer
	if err := rep.WriteTable(&table); err != nil {
		t.Fatal(err)
	}
	t.Logf("table:\n%s", table.String())
	for _, s := range rep.Skipped {
		t.Errorf("%s on %q did not run: %s", s.Impl, s.Transport, s.Reason)
	}
	checkNetstack(t, cfg, rep, table.String())
	for _, res := range rep.Results {
		if !netTransport(res.Transport) || res.Impl == GoCapnp {
			t.Errorf("only the netstack section's raw and captp should have run: %+v", res)
		}
	}
	if strings.Contains(table.String(), "pipelined") {
		t.Errorf("the table describes the workload matrix, which did not run")
	}

	var js bytes.Buffer
	if err := rep.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(js.Bytes(), &back); err != nil {
		t.Fatalf("JSON does not read back: %v", err)
	}
	if len(back.Targets) != len(rep.Targets) || !strings.Contains(js.String(), `"vs_tcp"`) {
		t.Errorf("JSON lacks the netstack targets or ratios:\n%s", js.String())
	}
}

// checkNetstack checks the netstack section of a report: round trip and
// bulk figures for raw and captp over kernel TCP and netstack, netstack's
// ratios to TCP, and both issue 7 targets in the report and its table.
func checkNetstack(t *testing.T, cfg Config, rep *Report, table string) {
	t.Helper()
	for _, tr := range []Transport{TCP, Netstack} {
		for _, im := range []Impl{Raw, Captp} {
			for _, m := range []string{mSeqMedian, mSeqP99, mStreamRate} {
				res := rep.Find(tr, im, m)
				if res == nil || len(res.Runs) != cfg.Counts.Reps || res.Median <= 0 {
					t.Errorf("%s/%s: metric %s missing or empty: %+v", tr, im, m, res)
					continue
				}
				if tr == Netstack && res.VsTCP == nil {
					t.Errorf("%s/%s: %s has no ratio to kernel TCP", tr, im, m)
				}
			}
		}
	}
	if res := rep.Find(Netstack, Captp, mStreamRate1500); res == nil || len(res.Runs) != cfg.Counts.Reps {
		t.Errorf("netstack: no bulk figure at MTU 1,500: %+v", res)
	}
	if rep.Find(TCP, GoCapnp, mSeqMedian) != nil {
		t.Error("go-capnp ran in the netstack section")
	}
	goals := map[string]bool{}
	for _, tg := range rep.Targets {
		if tg.Transport == Netstack {
			goals[tg.Goal] = true
		}
	}
	for _, goal := range []string{"netstack round trip ≤ 3× kernel TCP", "netstack bulk ≥ 1 GB/s at MTU 65,535"} {
		if !goals[goal] || !strings.Contains(table, goal) {
			t.Errorf("target %q missing from the report or its table", goal)
		}
	}
	if !strings.Contains(table, "== netstack:") || !strings.Contains(table, "×tcp") {
		t.Errorf("the table lacks the netstack section")
	}
}
