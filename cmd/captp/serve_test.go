package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/core/sturdyref"
)

// captpBinary builds this command into the test's temporary directory:
// the server side of these tests is a real process that is killed and
// started again.
func captpBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "captp")
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("building the captp binary needs the go command on PATH: %v", err)
	}
	if out, err := exec.Command(goBin, "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// serverProc is a `captp serve` process.
type serverProc struct {
	cmd  *exec.Cmd
	refs map[string]string // service name → sturdy ref URI
	addr string
	done chan struct{}
}

func startServe(t *testing.T, bin string, args ...string) *serverProc {
	t.Helper()
	p, err := tryServe(t, bin, args...)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// tryServe starts `captp serve` and waits until it serves; it may run in
// any goroutine.
func tryServe(t *testing.T, bin string, args ...string) (*serverProc, error) {
	cmd := exec.Command(bin, append([]string{"serve"}, args...)...)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &serverProc{cmd: cmd, refs: map[string]string{}, done: make(chan struct{})}
	t.Cleanup(p.kill)
	lines := make(chan string)
	go func() {
		defer close(p.done)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
		cmd.Wait()
	}()
	timeout := time.After(30 * time.Second)
	for {
		select {
		case line, ok := <-lines:
			if !ok {
				return nil, fmt.Errorf("captp serve %q exited before serving", args)
			}
			if a, ok := strings.CutPrefix(line, "serving on "); ok {
				p.addr = a
				go func() {
					for range lines {
					}
				}()
				return p, nil
			}
			if name, uri, ok := strings.Cut(line, " "); ok && name != "revoked" {
				p.refs[name] = uri
			}
		case <-timeout:
			p.kill()
			return nil, errors.New("captp serve did not start")
		}
	}
}

// kill ends the server the hard way (SIGKILL: no cleanup, like a crash).
func (p *serverProc) kill() {
	if p.cmd.Process != nil {
		p.cmd.Process.Kill()
	}
	<-p.done
}

func call(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	code, stdout, stderr = runCLI(t, append([]string{"call"}, args...)...)
	return code, strings.TrimSpace(stdout), stderr
}

func mustCall(t *testing.T, want string, args ...string) {
	t.Helper()
	code, out, errOut := call(t, args...)
	if code != exitOK || out != want {
		t.Fatalf("captp call %q: exit %d, stdout %q, stderr %q; want %q", args, code, out, errOut, want)
	}
}

func failCall(t *testing.T, wantErr string, args ...string) string {
	t.Helper()
	code, out, errOut := call(t, args...)
	if code != exitFail || out != "" || !strings.Contains(errOut, wantErr) {
		t.Fatalf("captp call %q: exit %d, stdout %q, stderr %q; want exit %d and %q", args, code, out, errOut, exitFail, wantErr)
	}
	return errOut
}

// The demonstration, from the command line over a Unix socket
// with TLS: a client holding a sturdy ref restores the capability after
// the server process is killed and started again (disk store, same
// identity); a wrong fingerprint, a forged ID and a revoked ID are
// refused.
func TestServeCallSurvivesRestart(t *testing.T) {
	bin := captpBinary(t)
	dir := t.TempDir()
	srv := startServe(t, bin, "-dir", dir)
	echo, counter := srv.refs["echo"], srv.refs["counter"]
	if !strings.HasPrefix(echo, "capnp://sha-256:") || !strings.HasPrefix(counter, "capnp://sha-256:") {
		t.Fatalf("refs %q", srv.refs)
	}
	mustCall(t, "echo", echo, "name")
	mustCall(t, "hello, vat", echo, "echo", "hello, vat")
	mustCall(t, "5", counter, "add", "5")
	mustCall(t, counter, counter, "save")

	// A long-lived client in this process holds the counter's ref.
	ref, err := sturdyref.Parse(counter)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	rc := sturdyref.NewReconnecting(ref, sturdyDialer(nil), &sturdyref.ReconnectOptions{MinBackoff: 20 * time.Millisecond})
	defer rc.Close()
	add := func(n string) (string, error) {
		var out string
		err := rc.Do(ctx, func(ctx context.Context, c capnp.Client) (err error) {
			out, err = sampleSchema.invoke(ctx, c, "add", []string{n})
			return err
		})
		return out, err
	}
	if got, err := add("1"); err != nil || got != "6" {
		t.Fatalf("add before restart: %q, %v", got, err)
	}

	srv.kill()
	restarted := make(chan *serverProc, 1)
	go func() {
		time.Sleep(200 * time.Millisecond) // the client retries meanwhile
		p, err := tryServe(t, bin, "-dir", dir)
		if err != nil {
			t.Error(err)
		}
		restarted <- p
	}()
	if got, err := add("1"); err != nil || got != "7" {
		t.Fatalf("add across the restart: %q, %v; want 7 (the total survives on disk)", got, err)
	}
	srv2 := <-restarted
	if srv2 == nil {
		t.FailNow()
	}
	if srv2.refs["counter"] != counter || srv2.refs["echo"] != echo {
		t.Fatalf("refs changed across the restart: %q then %q", srv.refs, srv2.refs)
	}
	mustCall(t, "7", counter, "get")

	// A wrong fingerprint is refused in the TLS handshake.
	other := strings.Replace(counter, ref.Fingerprint.String(), sturdyref.FingerprintOf([]byte("impostor")).String(), 1)
	failCall(t, "refusing the connection", other, "get")

	// A forged service ID and, after revocation, the real one fail alike.
	forged := ref
	forged.ServiceID = append([]byte{}, ref.ServiceID...)
	forged.ServiceID[0] ^= 1
	forgedErr := failCall(t, "Unknown persistent service ID", forged.String(), "get")
	srv2.kill()
	srv3 := startServe(t, bin, "-dir", dir, "-revoke", "counter", "-counter", "")
	if _, ok := srv3.refs["counter"]; ok {
		t.Fatal("revoked service still served")
	}
	revokedErr := failCall(t, "Unknown persistent service ID", counter, "get")
	if forgedErr != revokedErr {
		t.Errorf("forged and revoked IDs give different errors:\n%s\n%s", forgedErr, revokedErr)
	}
	mustCall(t, "echo", echo, "name")
	srv3.kill()
	// Hosting the name again mints a new ref; the old one stays dead.
	srv4 := startServe(t, bin, "-dir", dir)
	if srv4.refs["counter"] == counter {
		t.Fatal("a revoked ref came back")
	}
	failCall(t, "Unknown persistent service ID", counter, "get")
	mustCall(t, "0", srv4.refs["counter"], "get")
}

func freeTCPPort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// Over TCP the refs carry host:port; insecure mode says so in the URI.
func TestServeCallTCPAndInsecure(t *testing.T) {
	bin := captpBinary(t)
	srv := startServe(t, bin, "-dir", t.TempDir(), "-listen", freeTCPPort(t))
	if !strings.Contains(srv.refs["echo"], "@127.0.0.1:") {
		t.Fatalf("ref %q", srv.refs["echo"])
	}
	mustCall(t, "hi", srv.refs["echo"], "echo", "hi")

	insecure := startServe(t, bin, "-dir", t.TempDir(), "-insecure")
	if !strings.HasPrefix(insecure.refs["echo"], "capnp://insecure@/") {
		t.Fatalf("insecure ref %q", insecure.refs["echo"])
	}
	mustCall(t, "echo", insecure.refs["echo"], "name")
	// A TLS ref to the plain server fails.
	ref, _ := sturdyref.Parse(insecure.refs["echo"])
	ref.Insecure = false
	ref.Fingerprint = sturdyref.FingerprintOf([]byte("x"))
	failCall(t, "TLS handshake", ref.String(), "name")
}

// The netstack adapter from the command line: the server plays a guest
// VM behind a QEMU-style link socket (its vat runs on a userspace TCP/IP
// stack), the client dials the capnp+guest:// ref through it; the guest
// restarts and the ref still works.
func TestServeCallGuestLink(t *testing.T) {
	bin := captpBinary(t)
	dir := t.TempDir()
	link := filepath.Join(dir, "guest.sock")
	srv := startServe(t, bin, "-dir", dir, "-guest-link", link)
	counter := srv.refs["counter"]
	if !strings.HasPrefix(counter, "capnp+guest://sha-256:") || !strings.Contains(counter, "/guest.sock/10.0.2.15:4000/") {
		t.Fatalf("ref %q", counter)
	}
	mustCall(t, "3", counter, "add", "3")
	srv.kill()
	restarted := make(chan error, 1)
	go func() {
		time.Sleep(200 * time.Millisecond)
		_, err := tryServe(t, bin, "-dir", dir, "-guest-link", link)
		restarted <- err
	}()
	mustCall(t, "4", "-wait", counter, "add", "1")
	if err := <-restarted; err != nil {
		t.Fatal(err)
	}
}

func TestCallUsageErrors(t *testing.T) {
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"call"}, "want an address or sturdy ref URI, and a method"},
		{[]string{"call", "http://x"}, "want an address or sturdy ref URI, and a method"},
		{[]string{"call", "http://x", "name"}, "unknown scheme"},
		{[]string{"call", "capnp://insecure@/tmp/x.sock/", "frob"}, `unknown method "frob"`},
		{[]string{"call", "capnp://insecure@/tmp/x.sock/", "echo"}, "echo takes 1 argument(s), got 0"},
		{[]string{"serve"}, "-dir is required"},
		{[]string{"serve", "-dir", "x", "-echo", "a/b"}, `service name "a/b"`},
	} {
		code, out, errOut := runCLI(t, tt.args...)
		if code != exitUsage || !strings.Contains(errOut, tt.want) || out != "" {
			t.Errorf("captp %q: exit %d, stdout %q, stderr %q; want exit %d and %q", tt.args, code, out, errOut, exitUsage, tt.want)
		}
	}
}

func TestCallUnreachable(t *testing.T) {
	failCall(t, "no such file", "-timeout", "2s", "capnp://insecure@"+filepath.Join(t.TempDir(), "none.sock")+"/AA", "name")
	code, _, errOut := call(t, "-timeout", "300ms", "-wait", "capnp://insecure@"+filepath.Join(t.TempDir(), "none.sock")+"/AA", "name")
	if code != exitFail || !strings.Contains(errOut, "deadline exceeded") {
		t.Fatalf("-wait on an unreachable vat: exit %d, %q", code, errOut)
	}
}
