package main

import (
	"bytes"
	"context"
	"regexp"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func runCLI(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	var out, errOut bytes.Buffer
	code = run(ctx, args, &out, &errOut)
	return code, out.String(), errOut.String()
}

func TestHelp(t *testing.T) {
	for _, args := range [][]string{{"help"}, {"--help"}, {"-h"}} {
		code, out, errOut := runCLI(t, args...)
		if code != exitOK || !strings.Contains(out, "captp <command>") || !strings.Contains(out, "demo") || errOut != "" {
			t.Errorf("captp %s: exit %d, stdout %q, stderr %q; want usage on stdout and exit 0", args, code, out, errOut)
		}
	}
	for _, args := range [][]string{{"help", "demo"}, {"demo", "-h"}, {"demo", "--help"}} {
		code, out, errOut := runCLI(t, args...)
		if code != exitOK || !strings.Contains(out+errOut, "usage: captp demo") || !strings.Contains(out+errOut, "-timeout") {
			t.Errorf("captp %s: exit %d, output %q; want the demo's flags and exit 0", args, code, out+errOut)
		}
	}
}

func TestUsageErrors(t *testing.T) {
	for _, tt := range []struct {
		args []string
		want string
	}{
		{nil, "captp <command>"},
		{[]string{"frobnicate"}, `unknown command "frobnicate"`},
		{[]string{"help", "frobnicate"}, `unknown command "frobnicate"`},
		{[]string{"demo", "-nope"}, "flag provided but not defined: -nope"},
		{[]string{"demo", "extra"}, `unexpected arguments ["extra"]`},
	} {
		code, out, errOut := runCLI(t, tt.args...)
		if code != exitUsage || !strings.Contains(errOut, tt.want) || out != "" {
			t.Errorf("captp %q: exit %d, stdout %q, stderr %q; want exit %d and %q on stderr",
				tt.args, code, out, errOut, exitUsage, tt.want)
		}
	}
}

// TestDemo runs the whole demo in-process against the real core.
func TestDemo(t *testing.T) {
	code, out, errOut := runCLI(t, "demo", "-dir", t.TempDir(), "-timeout", "30s")
	t.Logf("demo output:\n%s", out)
	if code != exitOK {
		t.Fatalf("captp demo exited %d; stderr:\n%s", code, errOut)
	}
	for _, want := range []string{
		`^captp demo — two vats over unix:/.*/vat\.sock$`,
		`^\[server\] listening on unix:/.*/vat\.sock; bootstrap capability: Test "server"$`,
		// Whether a call is pipelined or, because the answer arrived before
		// the (slow, e.g. -race) client made it, sent to the returned
		// capability is timing; pipelined + round trips = calls either way.
		`^\[client\] bootstrap → Test "server"  \(2 calls, (1 pipelined, 1 round trip|2 round trips), .*\)$`,
		`^\[client\] echo\("hello"\) → "hello"  \(1 round trip, .*\)$`,
		`^\[client\] pipelined child\("a"\)\.child\("b"\)\.name\(\) → "b"  \(3 calls, (2 pipelined, 1 round trip|1 pipelined, 2 round trips|3 round trips), .*\)$`,
		`^\[client\] same chain awaiting each answer first → "b"  \(3 calls, 3 round trips, .*\)$`,
		`^\[client\] passed its own object to server\.callBack → server called back: "ping"  \(1 round trip, the server made 1 call to the client, .*\)$`,
		`^\[client\] fail\(overloaded\) → overloaded error: ".*too busy.*"  \(1 round trip, .*\)$`,
		`^\[client\] released everything; server objects alive: 1 .*client objects alive: 0$`,
		`^ +0 +0 +0 +0 +0 *$`, // conn.Stats, all zero
		`^ +call +\d+ +\d+ *$`,
		`^\[client\] hung up; \[server\] stopped; server objects alive: 0$`,
		`^done in `,
	} {
		if !regexp.MustCompile(`(?m)` + want).MatchString(out) {
			t.Errorf("demo output has no line matching %s", want)
		}
	}
}

func TestDemoFailsWhenSocketDirMissing(t *testing.T) {
	code, _, errOut := runCLI(t, "demo", "-dir", "/nonexistent/captp-demo-test")
	if code != exitFail || !strings.Contains(errOut, "captp demo: FAILED:") {
		t.Errorf("demo with a missing directory: exit %d, stderr %q; want exit %d and a FAILED message", code, errOut, exitFail)
	}
}
