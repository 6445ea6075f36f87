package main

import (
	"strings"
	"testing"
)

// The harness itself is tested in internal/bench; these check the
// command line.
func TestBenchHelp(t *testing.T) {
	code, out, errOut := runCLI(t, "help", "bench")
	for _, want := range []string{"usage: captp bench", "-short", "-json", "-profile", "-impl", "-transport"} {
		if code != exitOK || !strings.Contains(out+errOut, want) {
			t.Errorf("captp help bench: exit %d, output %q; want %q", code, out+errOut, want)
		}
	}
	if _, out, _ := runCLI(t, "help"); !strings.Contains(out, "bench ") || strings.Contains(out, "bench-server") {
		t.Errorf("captp help lists bench, and not the hidden bench-server: %q", out)
	}
}

func TestBenchUsageErrors(t *testing.T) {
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"bench", "extra"}, `unexpected arguments ["extra"]`},
		{[]string{"bench", "-impl", "corba"}, `unknown name "corba"`},
		{[]string{"bench", "-transport", "carrier-pigeon"}, `unknown name "carrier-pigeon"`},
	} {
		code, out, errOut := runCLI(t, tt.args...)
		if code != exitUsage || !strings.Contains(errOut, tt.want) || out != "" {
			t.Errorf("captp %q: exit %d, stdout %q, stderr %q; want exit %d and %q on stderr",
				tt.args, code, out, errOut, exitUsage, tt.want)
		}
	}
	if code, _, errOut := runCLI(t, "bench-server", "-impl", "corba", "-listen", "x"); code != 2 || !strings.Contains(errOut, "-impl") {
		t.Errorf("captp bench-server -impl corba: exit %d, stderr %q; want exit 2", code, errOut)
	}
}
