package cppinterop

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/adapters/unix"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testimpl"
	"github.com/captp-go/captp/internal/testnative"
)

// transports are the address families every interop test runs over.
var transports = []string{"unix", "tcp"}

// testCtx bounds a test; every wait in these tests uses it.
func testCtx(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}

// testLogger logs through the test's output, shown with -v or on failure.
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelInfo})).
		With("test", t.Name())
}

// listenAddr returns an address to listen on for transport: a Unix socket
// in a fresh short directory (socket paths are limited to ~108 bytes, more
// than t.TempDir() may use) or TCP loopback with port 0.
func listenAddr(t *testing.T, transport string) string {
	t.Helper()
	switch transport {
	case "unix":
		dir, err := os.MkdirTemp("", "cppi")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		return "unix:" + filepath.Join(dir, "s.sock")
	case "tcp":
		return "127.0.0.1:0"
	}
	t.Fatalf("unknown transport %q", transport)
	return ""
}

// lockedBuffer collects a child's stderr.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// cppServer is a running test_server process.
type cppServer struct {
	addr   string // where it listens, in ParseAddr form
	pid    int
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	lines  chan string // stdout, line by line; closed at EOF
	stderr *lockedBuffer
}

// startCppServer runs test_server on transport and waits until it listens.
// Cleanup closes its stdin (it exits) and kills it if it lingers.
func startCppServer(t *testing.T, ctx context.Context, transport string) *cppServer {
	t.Helper()
	requireCpp(t)
	addr := listenAddr(t, transport)
	cmd := exec.Command(cppServerBin, addr)
	s := &cppServer{cmd: cmd, lines: make(chan string, 16), stderr: new(lockedBuffer)}
	cmd.Stderr = s.stderr
	var err error
	if s.stdin, err = cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting test_server: %v", err)
	}
	s.pid = cmd.Process.Pid
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		defer close(s.lines)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			s.lines <- sc.Text()
		}
	}()
	t.Cleanup(func() {
		s.stdin.Close()
		exited := make(chan error, 1)
		go func() {
			for range s.lines {
			}
			<-readerDone
			exited <- cmd.Wait()
		}()
		select {
		case err := <-exited:
			if err != nil {
				t.Errorf("test_server exited: %v\nstderr:\n%s", err, s.stderr.String())
			}
		case <-time.After(5 * time.Second):
			t.Errorf("test_server did not exit within 5s of stdin closing; killing pid %d\nstderr:\n%s", s.pid, s.stderr.String())
			cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Logf("test_server stderr:\n%s", s.stderr.String())
		}
	})
	line, err := s.readLine(ctx)
	if err != nil {
		t.Fatalf("test_server did not start: %v\nstderr:\n%s", err, s.stderr.String())
	}
	port, ok := strings.CutPrefix(line, "listening ")
	if !ok {
		t.Fatalf("test_server said %q, want \"listening PORT\"", line)
	}
	s.addr = addr
	if transport == "tcp" {
		s.addr = "127.0.0.1:" + port
	}
	return s
}

func (s *cppServer) readLine(ctx context.Context) (string, error) {
	select {
	case line, ok := <-s.lines:
		if !ok {
			return "", errors.New("test_server closed its stdout")
		}
		return line, nil
	case <-ctx.Done():
		return "", ctx.Err()
	}
}

// cppStats are test_server's counters.
type cppStats struct {
	Live, Started, Cancelled, Echoes int64
}

// stats asks test_server for its counters. The reply reflects every RPC
// message the server processed before it read the command.
func (s *cppServer) stats(ctx context.Context) (cppStats, error) {
	if _, err := io.WriteString(s.stdin, "stats\n"); err != nil {
		return cppStats{}, err
	}
	line, err := s.readLine(ctx)
	if err != nil {
		return cppStats{}, err
	}
	var st cppStats
	fields := map[string]*int64{"live": &st.Live, "started": &st.Started, "cancelled": &st.Cancelled, "echoes": &st.Echoes}
	rest, ok := strings.CutPrefix(line, "stats ")
	if !ok {
		return st, fmt.Errorf("test_server replied %q to stats", line)
	}
	for _, kv := range strings.Fields(rest) {
		k, v, _ := strings.Cut(kv, "=")
		p := fields[k]
		if p == nil {
			return st, fmt.Errorf("test_server: unknown stat %q in %q", k, line)
		}
		if *p, err = strconv.ParseInt(v, 10, 64); err != nil {
			return st, fmt.Errorf("test_server: stat %q: %w", kv, err)
		}
	}
	return st, nil
}

// waitStats polls stats until ok accepts them or ctx ends.
func (s *cppServer) waitStats(ctx context.Context, what string, ok func(cppStats) bool) (cppStats, error) {
	for {
		st, err := s.stats(ctx)
		if err != nil {
			return st, err
		}
		if ok(st) {
			return st, nil
		}
		select {
		case <-time.After(5 * time.Millisecond):
		case <-ctx.Done():
			return st, fmt.Errorf("waiting for %s: %w (last stats %+v)", what, ctx.Err(), st)
		}
	}
}

// runCppClient runs test_client against addr with one scenario and
// returns its output lines. onSync handles "SYNC tag" lines while the
// client waits (a non-nil error fails the scenario). The client must end
// with "PASS scenario".
func runCppClient(t *testing.T, ctx context.Context, addr, scenario string, onSync func(tag string) error) []string {
	t.Helper()
	requireCpp(t)
	cmd := exec.CommandContext(ctx, cppClientBin, addr, scenario)
	cmd.WaitDelay = 2 * time.Second
	stderr := new(lockedBuffer)
	cmd.Stderr = stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting test_client: %v", err)
	}
	var lines []string
	var syncErr error
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		line := sc.Text()
		lines = append(lines, line)
		tag, ok := strings.CutPrefix(line, "SYNC ")
		if !ok {
			continue
		}
		reply := "ok\n"
		if onSync == nil {
			syncErr = fmt.Errorf("unexpected SYNC %s", tag)
		} else {
			syncErr = onSync(tag)
		}
		if syncErr != nil {
			reply = "failed: " + strings.ReplaceAll(syncErr.Error(), "\n", " ") + "\n"
		}
		if _, err := io.WriteString(stdin, reply); err != nil {
			t.Errorf("answering SYNC %s: %v", tag, err)
		}
	}
	stdin.Close()
	err = cmd.Wait()
	out := strings.Join(lines, "\n")
	if syncErr != nil {
		t.Errorf("scenario %s: %v", scenario, syncErr)
	}
	if err != nil || !slices.Contains(lines, "PASS "+scenario) {
		t.Fatalf("test_client %s %s: %v\nstdout:\n%s\nstderr:\n%s", addr, scenario, err, out, stderr.String())
	}
	t.Logf("test_client %s:\n%s", scenario, out)
	return lines
}

// goServer serves a testimpl object as the bootstrap capability with
// core.NewConn on every accepted connection, keeping the connections so
// tests can look at their tables.
type goServer struct {
	addr string
	live liveCounter
	// newRoot returns a reference to the bootstrap object for a new
	// connection, and what its SYNC points watch.
	newRoot func() (capnp.Client, blockWatcher)
	lis     net.Listener

	mu    sync.Mutex
	conns []*core.Conn
	obj   blockWatcher  // the last connection's bootstrap object
	added chan struct{} // closed and replaced on every new connection
}

// liveCounter counts the Go server's live Test objects.
type liveCounter interface {
	Count() int64
	Wait(ctx context.Context, n int64) error
	WaitZero(ctx context.Context) error
}

// blockWatcher tells when an object's block() calls start and see their
// cancellation.
type blockWatcher interface {
	BlockStarted() <-chan struct{}
	BlockCancelled() <-chan struct{}
}

// startGoServer serves one testimpl object (capnpc-go's generated
// server) to every connection.
func startGoServer(t *testing.T, transport string) *goServer {
	live := new(testimpl.Live)
	obj := testimpl.New("server", live)
	return startServer(t, transport, live, func() (capnp.Client, blockWatcher) { return capnp.Client(obj.Client()), obj })
}

// startGoNativeServer serves each connection a new testnative object
// (capnpc-captp's native stubs on core.Handler), as are its children.
func startGoNativeServer(t *testing.T, transport string) *goServer {
	live := new(testnative.Live)
	return startServer(t, transport, live, func() (capnp.Client, blockWatcher) {
		c, o := testnative.New("server", &live.N)
		return c, o
	})
}

func startServer(t *testing.T, transport string, live liveCounter, newRoot func() (capnp.Client, blockWatcher)) *goServer {
	t.Helper()
	lis, err := unix.Listen(listenAddr(t, transport))
	if err != nil {
		t.Fatal(err)
	}
	s := &goServer{
		addr:    unix.FormatAddr(lis.Addr()),
		live:    live,
		newRoot: newRoot,
		lis:     lis,
		added:   make(chan struct{}),
	}
	log := testLogger(t)
	acceptDone := make(chan struct{})
	go func() {
		defer close(acceptDone)
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			root, obj := s.newRoot()
			conn := core.NewConn(c, &core.Options{
				BootstrapClient: root,
				Logger:          log,
			})
			s.mu.Lock()
			s.conns = append(s.conns, conn)
			s.obj = obj
			close(s.added)
			s.added = make(chan struct{})
			s.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		lis.Close()
		<-acceptDone
		s.mu.Lock()
		conns := s.conns
		s.mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := s.live.WaitZero(ctx); err != nil {
			t.Errorf("Go server: %d Test objects still live after every connection closed", s.live.Count())
		}
	})
	return s
}

// lastConn returns the most recently accepted connection.
// lastObj is the last connection's bootstrap object.
func (s *goServer) lastObj() blockWatcher {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.obj
}

func (s *goServer) lastConn() *core.Conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.conns) == 0 {
		return nil
	}
	return s.conns[len(s.conns)-1]
}
