package main

import (
	"bytes"
	"context"
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

// Every command answers -h, -help and --help (and captp help NAME) with
// its usage and a description on stdout, and exits 0.
func TestHelpEveryCommand(t *testing.T) {
	if len(commands) < 6 {
		t.Fatalf("only %d commands registered", len(commands))
	}
	for _, cmd := range commands {
		for _, args := range [][]string{{cmd.name, "-h"}, {cmd.name, "-help"}, {cmd.name, "--help"}, {"help", cmd.name}} {
			code, out, errOut := runCLI(t, args...)
			lines := strings.Split(strings.TrimSpace(out), "\n")
			if code != exitOK || errOut != "" || !strings.HasPrefix(out, "usage: captp "+cmd.name) || len(lines) < 3 {
				t.Errorf("captp %s: exit %d, stdout %q, stderr %q; want usage and a description on stdout, exit 0", strings.Join(args, " "), code, out, errOut)
			}
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
