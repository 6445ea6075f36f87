package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// checkLines fails t for each pattern no line of out matches.
func checkLines(t *testing.T, out string, patterns []string) {
	t.Helper()
	for _, want := range patterns {
		if !regexp.MustCompile(`(?m)` + want).MatchString(out) {
			t.Errorf("demo output has no line matching %s", want)
		}
	}
}

// atoi parses a number a pattern captured.
func atoi(t *testing.T, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// checkPipelining checks every pipelining report in out: the chain's 4
// calls, fewer round trips pipelined than awaited, and the saving said
// to be the difference. It returns how many reports there were.
func checkPipelining(t *testing.T, out string) int {
	t.Helper()
	re := regexp.MustCompile(`(?m)^    pipelined: 4 calls \((\d) pipelined\) in (\d) round trips?, .*; awaiting each answer: (\d) round trips, .*\n    pipelining saved (\d) round trips?( \(try \d: .*\))?$`)
	ms := re.FindAllStringSubmatch(out, -1)
	for _, m := range ms {
		pipelined, p, a, saved := atoi(t, m[1]), atoi(t, m[2]), atoi(t, m[3]), atoi(t, m[4])
		if a != 4 || p >= a || saved != a-p || saved <= 0 || pipelined+p != 4 {
			t.Errorf("pipelining report %q: want 4 awaited round trips, fewer pipelined, saved = the difference > 0", m[0])
		}
	}
	return len(ms)
}

// TestDemo runs the whole demo in-process against the real core and
// checks each scene's trace and counts, and that it leaves no goroutine
// and no temporary directory behind.
func TestDemo(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp) // the demo's own directory must be gone afterwards
	code, out, errOut := runCLI(t, "demo", "-timeout", "30s")
	t.Logf("demo output:\n%s", out)
	if code != exitOK {
		t.Fatalf("captp demo exited %d; stderr:\n%s", code, errOut)
	}
	if left, _ := os.ReadDir(tmp); len(left) > 0 {
		t.Errorf("the demo left %v in its temporary directory", left)
	}
	checkLines(t, out, []string{
		`^captp demo — a unikernel group in one process$`,
		`^  host   unix:` + regexp.QuoteMeta(tmp) + `/captp-demo-\d+/host\.sock  \(your entry point; -hold keeps it up for captp call\)$`,
		`^  host   capnp\+netstack://sha-256:.{6}…@10\.0\.0\.1:4000  \(netstack 10\.0\.0\.1, TLS identity, Level 3\)$`,
		`^  alice  capnp\+netstack://sha-256:.{6}…@10\.0\.0\.2:4000 `,
		`^  bob    capnp\+netstack://sha-256:.{6}…@10\.0\.0\.3:4000 `,
		`^  carol  capnp\+netstack://sha-256:.{6}…@10\.0\.0\.4:4000 `,

		`^\[1\] promise pipelining`,
		`^  you → host  child\("a"\)\.child\("b"\)\.child\("c"\)\.name\(\) → "c"$`,
		`^  host → alice  child\("a"\)\.child\("b"\)\.child\("c"\)\.name\(\) → "c"$`,

		`^\[2\] passing capabilities: host gives alice a capability on bob$`,
		`^  host → alice  callBack\(cb: bob's object, "hi bob"\) → "hi bob": alice called bob (directly \(Level 3 handoff\)|through the host)$`,
		`^    host  → alice   callBack$`,

		`^\[3\] a sturdy ref`,
		`^  carol saved "ledger": capnp\+netstack://sha-256:[A-Za-z0-9_-]{43}@10\.0\.0\.4:4000/[A-Za-z0-9_-]{43}$`,
		`^  bob restored the URI → name\(\) = "ledger"$`,
		`^  bob's connection to carol dropped$`,
		`^  bob redialed and restored the URI → name\(\) = "ledger"$`,
		`^    bob → carol   restore ×2, name ×2$`,

		`^\[4\] three-party handoff`,
		`^  while the handoff completes: bob → carol seq ×5, (\d) through alice's vine, (\d) direct$`,
		`^    alice → carol   bootstrap, \[provide\]$`,
		`^    bob   → carol   \[accept\], seq`,
		// From the counters: nothing through Alice once the handoff is done.
		`^  afterwards: bob → carol seq ×10, alice hangs up on carol, seq ×5: 15 direct, 0 through alice$`,
		`^    bob → carol   seq ×15$`,
		`^  carol got seq 0…19 in order$`,

		`^\[5\] a TamaGo guest in QEMU joins the group$`,
		`^  SKIPPED: no -guest-image; make demo builds boards/microvm/vat .*go tool tamago`,

		`^  you → host     unix          \d+ +0 +\d+ +[1-9]\d*$`,
		`^  alice → carol  netstack\+TLS  1        0 `,
		`^pipelining saved \d+ round trips in all$`,
		`^all connections closed; every vat's objects released \(distributed GC\); done in `,
	})
	if n := checkPipelining(t, out); n != 2 {
		t.Errorf("%d pipelining reports; want 2 (you → host, host → alice)", n)
	}
	if m := regexp.MustCompile(`(?m)^  while the handoff completes: bob → carol seq ×5, (\d) through alice's vine, (\d) direct$`).FindStringSubmatch(out); m != nil {
		if atoi(t, m[1])+atoi(t, m[2]) != 5 {
			t.Errorf("%q: the 5 calls must go one way or the other", m[0])
		}
	}
	// A summary per scene that ran (the guest's was skipped).
	sums := regexp.MustCompile(`(?m)^  (\d+) calls: (\d+) round trips?, (\d+) saved by pipelining; \d+ messages; `).FindAllStringSubmatch(out, -1)
	if len(sums) != 4 {
		t.Errorf("%d scene summaries; want 4", len(sums))
	}
	for _, m := range sums {
		if atoi(t, m[1]) != atoi(t, m[2])+atoi(t, m[3]) {
			t.Errorf("summary %q: calls must be round trips + pipelined", m[0])
		}
	}
	// Whether a call is pipelined or, because the answer arrived before
	// the (slow, e.g. -race) caller made it, sent to the returned
	// capability is timing: each chain must save at least one.
	if len(sums) > 0 && atoi(t, sums[0][3]) < 2 {
		t.Errorf("scene 1 saved %s round trips; want at least 2 (two chains of pipelined calls)", sums[0][3])
	}
	if strings.Count(out, "\n") > 80 {
		t.Errorf("the demo printed %d lines; it should fit in a screen or two", strings.Count(out, "\n"))
	}
}

func TestDemoFailsWhenSocketDirMissing(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	code, _, errOut := runCLI(t, "demo", "-dir", "/nonexistent/captp-demo-test")
	if code != exitFail || !strings.Contains(errOut, "captp demo: FAILED:") {
		t.Errorf("demo with a missing directory: exit %d, stderr %q; want exit %d and a FAILED message", code, errOut, exitFail)
	}
}

// A demo that runs out of time fails with the reason and still cleans
// up: no goroutine, no directory.
func TestDemoTimeoutCleansUp(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp)
	for _, timeout := range []string{"1ms", "20ms"} {
		code, _, errOut := runCLI(t, "demo", "-timeout", timeout)
		if code != exitFail || !strings.Contains(errOut, "demo did not finish within "+timeout) {
			t.Errorf("demo -timeout %s: exit %d, stderr %q; want exit %d and the timeout", timeout, code, errOut, exitFail)
		}
	}
	if left, _ := os.ReadDir(tmp); len(left) > 0 {
		t.Errorf("the failed demo left %v in its temporary directory", left)
	}
}

func TestDemoMissingGuestImageFails(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	code, _, errOut := runCLI(t, "demo", "-guest-image", filepath.Join(t.TempDir(), "none.elf"))
	if code != exitFail || !strings.Contains(errOut, "guest image") {
		t.Errorf("demo with a missing guest image: exit %d, stderr %q; want exit %d and a guest image error", code, errOut, exitFail)
	}
}

// demoBuffer is a bytes.Buffer safe to read while the demo writes it.
type demoBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *demoBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *demoBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// With -hold the host vat stays on its socket after the scenes, and
// captp call reaches it there with the test schema.
func TestDemoHoldServesCaptpCall(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	dir := t.TempDir()
	var out demoBuffer
	done := make(chan error, 1)
	go func() { done <- runDemo(ctx, &out, demoConfig{dir: dir, timeout: 30 * time.Second, hold: true}) }()
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(out.String(), "holding the group") {
		select {
		case err := <-done:
			t.Fatalf("demo ended before holding: %v\n%s", err, out.String())
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			cancel()
			<-done
			t.Fatalf("demo never said it was holding:\n%s", out.String())
		}
	}
	addr := "unix:" + filepath.Join(dir, "host.sock")
	if !strings.Contains(out.String(), "captp call "+addr+" ") {
		t.Errorf("the hold message does not show captp call on %s:\n%s", addr, out.String())
	}
	code, callOut, callErr := runCLI(t, "call", addr, `Test.child(name = "x").name()`, "-schema", "../../internal/testcapnp/test.capnp")
	if code != exitOK || strings.TrimSpace(callOut) != `(name = "x")` {
		t.Errorf("captp call on the held host: exit %d, stdout %q, stderr %q; want (name = \"x\")", code, callOut, callErr)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("demo after the hold: %v\n%s", err, out.String())
	}
	checkLines(t, out.String(), []string{`^all connections closed; every vat's objects released`})
}

// TestGuestDemo runs the demo with a TamaGo guest in QEMU: the pipelined
// chain to the guest and capabilities between the guest and alice,
// relayed by the host.
func TestGuestDemo(t *testing.T) {
	img := os.Getenv("CAPTP_GUEST_IMAGE")
	if img == "" {
		t.Skip("SKIPPED: the demo's guest scene needs a TamaGo image: run `make tamago-test` (needs the tamago-go toolchain, see README) or set CAPTP_GUEST_IMAGE=/path/to/vat.elf")
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("SKIPPED: the demo's guest scene needs qemu-system-x86_64: apt-get install qemu-system-x86 (make deps)")
	}
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	code, out, errOut := runCLI(t, "demo", "-guest-image", img, "-timeout", "50s")
	t.Logf("demo output:\n%s", out)
	if code != exitOK {
		t.Fatalf("captp demo -guest-image exited %d; stderr:\n%s", code, errOut)
	}
	checkLines(t, out, []string{
		`^  guest  TamaGo ` + regexp.QuoteMeta(filepath.Base(img)) + ` in QEMU microvm \(TCG\), booting$`,
		`^\[5\] a TamaGo guest in QEMU joins the group$`,
		`^  guest booted in .* \(QEMU microvm, TCG\); host dials it over virtio-net$`,
		`^  host → guest  child\("a"\)\.child\("b"\)\.child\("c"\)\.name\(\) → "c"$`,
		`^  host → guest  callBack\(cb: alice's object\) → guest called alice\.echo, through the host$`,
		`^    guest → host    echo$`,
		`^    alice → host    echo$`,
		`^  host → guest   virtio-net `,
		`^all connections closed; every vat's objects released`,
	})
	if strings.Contains(out, "SKIPPED") {
		t.Errorf("the guest scene was skipped with -guest-image")
	}
	if n := checkPipelining(t, out); n != 3 {
		t.Errorf("%d pipelining reports; want 3 (you → host, host → alice, host → guest)", n)
	}
}
