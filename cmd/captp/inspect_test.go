package main

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/adapters/unix"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/inspect"
	"github.com/captp-go/captp/core/sturdyref"
	"github.com/captp-go/captp/internal/sample"
	"github.com/captp-go/captp/internal/serve"
)

func inspectCLI(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	return runCLI(t, append([]string{"inspect"}, args...)...)
}

// The scenario end to end: `captp serve -inspect` prints an inspect
// sturdy ref; while a client holds two of its capabilities, `captp inspect`
// lists them on the client's connection (text and JSON); once the client
// lets go, they are gone from the report. Refs that do not grant
// inspection fail with advice, and a vat restarted without -inspect no
// longer honours the old ref.
func TestInspectServe(t *testing.T) {
	bin := captpBinary(t)
	dir := t.TempDir()
	srv := startServe(t, bin, "-dir", dir, "-inspect")
	inspectRef := srv.refs["inspect"]
	if !strings.HasPrefix(inspectRef, "capnp://sha-256:") {
		t.Fatalf("no inspect ref among %q", srv.refs)
	}
	if data, err := os.ReadFile(filepath.Join(dir, "inspect.cap")); err != nil || strings.TrimSpace(string(data)) != inspectRef {
		t.Fatalf("inspect.cap = %q, %v; want the printed ref", data, err)
	}

	// A client in this process holds the echo and the counter over one
	// connection.
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	echoRef, err := sturdyref.Parse(srv.refs["echo"])
	if err != nil {
		t.Fatal(err)
	}
	counterRef, err := sturdyref.Parse(srv.refs["counter"])
	if err != nil {
		t.Fatal(err)
	}
	conn, err := sturdyDialer(nil)(ctx, echoRef)
	if err != nil {
		t.Fatal(err)
	}
	echo := sample.Echo(conn.Restore(ctx, echoRef.ServiceID))
	counter := sample.Counter(conn.Restore(ctx, counterRef.ServiceID))
	for _, c := range []interface{ Resolve(context.Context) error }{echo, counter} {
		if err := c.Resolve(ctx); err != nil {
			t.Fatal(err)
		}
	}

	// The client's connection: the one with two exports, both sample
	// servers. (The inspector's own connection is listed too.)
	var holder *inspect.ConnStatus
	deadline := time.Now().Add(20 * time.Second)
	for holder == nil {
		code, out, errOut := inspectCLI(t, "-json", inspectRef)
		if code != exitOK {
			t.Fatalf("captp inspect -json: exit %d, stderr %q", code, errOut)
		}
		var rep inspect.Report
		if err := json.Unmarshal([]byte(out), &rep); err != nil {
			t.Fatalf("captp inspect -json: %v\n%s", err, out)
		}
		for i, c := range rep.Conns {
			if len(c.Snapshot.Exports) == 2 && c.Snapshot.Stats.Answers == 0 {
				holder = &rep.Conns[i]
			}
		}
		if holder == nil {
			if time.Now().After(deadline) {
				t.Fatalf("no connection with the two held capabilities in\n%s", out)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	for _, e := range holder.Snapshot.Exports {
		if e.Refs != 1 || (!strings.Contains(e.What, "*sample.echo") && !strings.Contains(e.What, "*sample.counter")) {
			t.Errorf("export %+v: want a sample server held once", e)
		}
	}

	code, out, errOut := inspectCLI(t, inspectRef)
	if code != exitOK {
		t.Fatalf("captp inspect: exit %d, stderr %q", code, errOut)
	}
	for _, want := range []string{
		"captp serve capnp://", "connection #", "exports (our capabilities the peer holds): 2",
		"local server *sample.echo", "local server *sample.counter", "local server inspect.inspectorServer",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}
	// Flags may follow the ref.
	if code, out, errOut := inspectCLI(t, inspectRef, "-max", "1", "-json"); code != exitOK || !json.Valid([]byte(out)) {
		t.Errorf("captp inspect REF -max 1 -json: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	// The .cap file works as well as the URI.
	if code, out, errOut := inspectCLI(t, filepath.Join(dir, "inspect.cap")); code != exitOK || !strings.Contains(out, "*sample.counter") {
		t.Errorf("captp inspect DIR/inspect.cap: exit %d, stdout %q, stderr %q", code, out, errOut)
	}

	// -watch reports again and again until interrupted, which is a
	// normal end; with -json, one report per line.
	wctx, wcancel := context.WithTimeout(ctx, 600*time.Millisecond)
	var wout, werr strings.Builder
	code = run(wctx, []string{"inspect", "-watch", "100ms", "-json", inspectRef}, &wout, &werr)
	wcancel()
	reports := strings.Split(strings.TrimSpace(wout.String()), "\n")
	if code != exitOK || len(reports) < 2 {
		t.Errorf("captp inspect -watch: exit %d, %d reports, stderr %q; want exit 0 and several", code, len(reports), werr.String())
	}
	for _, r := range reports {
		if err := json.Unmarshal([]byte(r), new(inspect.Report)); err != nil {
			t.Errorf("captp inspect -watch -json line %q: %v", r, err)
		}
	}

	// Once the client lets go, its capabilities leave the report.
	echo.Release()
	counter.Release()
	conn.Close()
	for {
		_, out, _ := inspectCLI(t, inspectRef)
		if !strings.Contains(out, "*sample.") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the closed client's connection is still reported:\n%s", out)
		}
		time.Sleep(20 * time.Millisecond)
	}

	// Refs that do not grant inspection fail with advice.
	for _, tt := range []struct{ ref, want string }{
		{srv.refs["echo"], "that capability is not an Inspector"},
		{forgeRef(t, inspectRef), "unknown or revoked"},
	} {
		code, out, errOut := inspectCLI(t, tt.ref)
		if code != exitFail || out != "" || !strings.Contains(errOut, tt.want) || !strings.Contains(errOut, "captp serve -inspect") {
			t.Errorf("captp inspect %s: exit %d, stdout %q, stderr %q; want exit %d, %q and advice", tt.ref, code, out, errOut, exitFail, tt.want)
		}
	}

	// Restarted without -inspect, the vat revokes the ref.
	srv.kill()
	srv2 := startServe(t, bin, "-dir", dir)
	if _, ok := srv2.refs["inspect"]; ok {
		t.Fatal("inspect ref printed without -inspect")
	}
	if _, err := os.Stat(filepath.Join(dir, "inspect.cap")); !os.IsNotExist(err) {
		t.Errorf("inspect.cap left behind without -inspect: %v", err)
	}
	code, _, errOut = inspectCLI(t, inspectRef)
	if code != exitFail || !strings.Contains(errOut, "does not allow inspection") || !strings.Contains(errOut, "captp serve -inspect") {
		t.Errorf("old inspect ref after a restart without -inspect: exit %d, stderr %q", code, errOut)
	}
}

// forgeRef flips a bit of ref's service ID.
func forgeRef(t *testing.T, ref string) string {
	t.Helper()
	r, err := sturdyref.Parse(ref)
	if err != nil {
		t.Fatal(err)
	}
	r.ServiceID = append([]byte{}, r.ServiceID...)
	r.ServiceID[0] ^= 1
	return r.String()
}

func TestInspectUsageErrors(t *testing.T) {
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"inspect"}, "want one sturdy ref"},
		{[]string{"inspect", "a", "b"}, "want one sturdy ref"},
		{[]string{"inspect", "http://x"}, "unknown scheme"},
		{[]string{"inspect", "-watch", "-1s", "unix:/x"}, "must not be negative"},
		{[]string{"inspect", "unix:/x", "-nope"}, "flag provided but not defined: -nope"},
		{[]string{"serve", "-dir", "x", "-echo", "inspect"}, "reserved for -inspect"},
	} {
		code, out, errOut := runCLI(t, tt.args...)
		if code != exitUsage || !strings.Contains(errOut, tt.want) || out != "" {
			t.Errorf("captp %q: exit %d, stdout %q, stderr %q; want exit %d and %q", tt.args, code, out, errOut, exitUsage, tt.want)
		}
	}
}

// An unreachable vat and a missing .cap file say what to check.
func TestInspectUnreachable(t *testing.T) {
	for _, tt := range []struct{ arg, want string }{
		{"capnp://insecure@" + filepath.Join(t.TempDir(), "none.sock") + "/AA", "is it running?"},
		{"unix:" + filepath.Join(t.TempDir(), "none.sock"), "cannot reach the vat"},
		{filepath.Join(t.TempDir(), "inspect.cap"), "captp serve -inspect"},
	} {
		code, out, errOut := inspectCLI(t, "-timeout", "2s", tt.arg)
		if code != exitFail || out != "" || !strings.Contains(errOut, tt.want) {
			t.Errorf("captp inspect %s: exit %d, stdout %q, stderr %q; want %q", tt.arg, code, out, errOut, tt.want)
		}
	}
}

// A plain address works for a vat whose bootstrap capability is an
// Inspector (a private admin socket), and the report lists the vat's
// tracked connections.
func TestInspectPlainAddress(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "admin.sock")
	lis, err := unix.Listen("unix:" + sock)
	if err != nil {
		t.Fatal(err)
	}
	reg := inspect.NewRegistry(&inspect.Options{Name: "admin vat"})
	ctx, cancel := context.WithCancel(t.Context())
	served := make(chan error, 1)
	go func() {
		sctx := serve.WithAcceptHook(ctx, func(c *core.Conn, peer string) { reg.Track(c, "admin client") })
		served <- unix.Serve(sctx, lis, &core.Options{BootstrapClient: capnp.Client(reg.Inspector())})
	}()
	defer func() {
		cancel()
		<-served
	}()
	code, out, errOut := inspectCLI(t, "unix:"+sock)
	if code != exitOK || !strings.HasPrefix(out, "admin vat: up ") || !strings.Contains(out, "peer admin client") {
		t.Fatalf("captp inspect unix:…: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
}

// What the vat sends is printed without its control characters: a
// hostile vat cannot drive the terminal.
func TestInspectPrintsNoControls(t *testing.T) {
	const esc = "\x1b[2J\x1b]0;owned\a"
	rep := inspect.Report{
		Vat: inspect.VatStatus{Name: "vat" + esc},
		Conns: []inspect.ConnStatus{{Label: "peer" + esc, Snapshot: core.Snapshot{
			Stats:     core.Stats{Questions: 1, Exports: 1},
			Err:       "ended" + esc,
			Questions: []core.QuestionInfo{{Method: "m" + esc}},
			Exports:   []core.ExportInfo{{What: "w" + esc}},
		}}},
	}
	var b strings.Builder
	printReport(&b, rep)
	out := b.String()
	if strings.ContainsAny(out, "\x1b\a") {
		t.Fatalf("report printed with control characters: %q", out)
	}
	for _, s := range []string{"vat?[2J", "peer?[2J", "ended?[2J", "m?[2J", "w?[2J"} {
		if !strings.Contains(out, s) {
			t.Errorf("report lacks %q: %q", s, out)
		}
	}
}
