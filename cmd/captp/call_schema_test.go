package main

import (
	"context"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/adapters/unix"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testimpl"
)

// captp call with -schema: any method of a schema, parameters and results
// in Cap'n Proto text form, pipelined paths, against a plain unix: address.
func TestCallWithSchema(t *testing.T) {
	if _, err := exec.LookPath("capnp"); err != nil {
		t.Skip("*** SKIPPING captp call -schema tests: the capnp compiler is missing; install the Debian package capnproto (make deps) ***")
	}
	sock := filepath.Join(t.TempDir(), "vat.sock")
	lis, err := unix.Listen("unix:" + sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- unix.Serve(ctx, lis, &core.Options{BootstrapClient: capnp.Client(testimpl.New("root", nil).Client())})
	}()
	defer func() { cancel(); <-done }()
	schema := filepath.Join("..", "..", "internal", "testcapnp", "test.capnp")
	addr := "unix:" + sock

	for _, tt := range []struct {
		name string
		args []string
		want string
	}{
		{"echo", []string{"Test.echo", `(data = "hi\n")`}, `(data = "hi\n")`},
		{"bare method name", []string{"name"}, `(name = "root")`},
		{"pipelined path", []string{"Test.child", `(name = "kid")`, ".name()"}, `(name = "kid")`},
		{"chain in one argument", []string{`Test.child(name = "a").child(name = "b").name()`}, `(name = "b")`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			args := append([]string{"call", addr}, tt.args...)
			args = append(args, "-schema", schema) // after the arguments, as the usage shows
			code, out, errOut := runCLI(t, args...)
			if code != exitOK || strings.TrimSpace(out) != tt.want {
				t.Fatalf("captp %q: exit %d, stdout %q, stderr %q; want %s", args, code, out, errOut, tt.want)
			}
		})
	}

	// Mistakes are usage errors that say what exists, before any dial.
	code, _, errOut := runCLI(t, "call", "-schema", schema, "unix:/nonexistent.sock", "Test.nope")
	if code != exitUsage || !strings.Contains(errOut, "nope") || !strings.Contains(errOut, "echo") {
		t.Errorf("unknown method: exit %d, stderr %q; want a usage error listing the methods", code, errOut)
	}
	code, _, errOut = runCLI(t, "call", "-schema", schema, "unix:/nonexistent.sock", "Test.echo", `(data = )`)
	if code != exitUsage || !strings.Contains(errOut, "1:") {
		t.Errorf("bad parameters: exit %d, stderr %q; want a usage error with a position", code, errOut)
	}
}
