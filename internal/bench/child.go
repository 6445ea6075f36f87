package bench

import (
	"bufio"
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"
)

// ServerCommand is the argument that makes a program run ServerMain: the
// hidden `captp bench-server` subcommand, and the re-executed test binary
// in this package's tests.
const ServerCommand = "bench-server"

// ServerMain is the bench server child process: it serves one
// implementation's bench object on a Unix socket and answers commands on
// stdin, one per line, with one line on stdout:
//
//	stats   ->  "ok mallocs=N alloc_bytes=B cpu_ns=C heap_inuse=H"
//
// It prints "listening" once the socket is bound and exits when stdin
// closes. args are its flags: -impl raw|captp|go-capnp and -listen PATH.
func ServerMain(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet(ServerCommand, flag.ContinueOnError)
	fs.SetOutput(stderr)
	impl := fs.String("impl", "", "implementation to serve: raw, captp, captp-native or go-capnp")
	path := fs.String("listen", "", "Unix socket `path` to listen on")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	switch Impl(*impl) {
	case Raw, Captp, CaptpNative, GoCapnp:
	default:
		fmt.Fprintf(stderr, "%s: -impl must be raw, captp, captp-native or go-capnp, not %q\n", ServerCommand, *impl)
		return 2
	}
	if *path == "" || fs.NArg() > 0 {
		fmt.Fprintf(stderr, "%s: want -listen PATH and no arguments\n", ServerCommand)
		return 2
	}
	lis, err := net.Listen("unix", *path)
	if err != nil {
		fmt.Fprintf(stderr, "%s: %v\n", ServerCommand, err)
		return 1
	}
	var (
		mu     sync.Mutex
		stops  []func()
		closed bool
	)
	accepted := make(chan struct{})
	go func() {
		defer close(accepted)
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			if closed {
				mu.Unlock()
				c.Close()
				return
			}
			stops = append(stops, serveGo(Impl(*impl), c))
			mu.Unlock()
		}
	}()
	fmt.Fprintln(stdout, "listening")
	sc := bufio.NewScanner(stdin)
	for sc.Scan() {
		switch line := strings.TrimSpace(sc.Text()); line {
		case "stats":
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			fmt.Fprintf(stdout, "ok mallocs=%d alloc_bytes=%d cpu_ns=%d heap_inuse=%d\n",
				ms.Mallocs, ms.TotalAlloc, processCPU().Nanoseconds(), ms.HeapInuse)
		case "":
		default:
			fmt.Fprintf(stdout, "error unknown command: %s\n", line)
		}
	}
	lis.Close()
	<-accepted
	mu.Lock()
	closed = true
	all := stops
	mu.Unlock()
	for _, stop := range all {
		stop()
	}
	return 0
}

// child is a running child process speaking the line protocol of
// ServerMain and of the C++ bench program.
type child struct {
	name    string
	cmd     *exec.Cmd
	stdin   io.WriteCloser
	lines   chan string // stdout lines; closed at EOF
	stderr  *lockedBuffer
	exited  chan struct{}
	waitErr error
	onStop  []func()
	once    sync.Once
}

// lockedBuffer collects a child's stderr.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.b.Len() > 64<<10 {
		return len(p), nil
	}
	return b.b.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return strings.TrimSpace(b.b.String())
}

// startChild starts cmd and waits for its first line, which must be
// ready.
func startChild(ctx context.Context, name string, cmd *exec.Cmd, ready string) (*child, error) {
	c := &child{name: name, cmd: cmd, lines: make(chan string, 16), stderr: new(lockedBuffer), exited: make(chan struct{})}
	cmd.Stderr = c.stderr
	var err error
	if c.stdin, err = cmd.StdinPipe(); err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	go func() {
		defer close(c.lines)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			c.lines <- sc.Text()
		}
	}()
	go func() {
		// Wait after stdout is drained (the scanner sees EOF first).
		c.waitErr = cmd.Wait()
		close(c.exited)
	}()
	line, err := c.next(ctx, 30*time.Second)
	if err != nil {
		c.stop()
		return nil, err
	}
	if line != ready {
		c.stop()
		return nil, fmt.Errorf("%s said %q; want %q (stderr: %s)", name, line, ready, c.stderr)
	}
	return c, nil
}

// next returns the child's next line.
func (c *child) next(ctx context.Context, timeout time.Duration) (string, error) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case line, ok := <-c.lines:
		if !ok {
			<-c.exited
			return "", fmt.Errorf("%s exited (%v): %s", c.name, c.waitErr, c.stderr)
		}
		return line, nil
	case <-t.C:
		return "", fmt.Errorf("%s: no answer within %v (stderr: %s)", c.name, timeout, c.stderr)
	case <-ctx.Done():
		return "", ctx.Err()
	}
}

// command sends line and parses the "ok key=value ..." reply.
func (c *child) command(ctx context.Context, line string, timeout time.Duration) (map[string]int64, error) {
	if _, err := fmt.Fprintln(c.stdin, line); err != nil {
		return nil, fmt.Errorf("%s: %w (stderr: %s)", c.name, err, c.stderr)
	}
	reply, err := c.next(ctx, timeout)
	if err != nil {
		return nil, err
	}
	rest, ok := strings.CutPrefix(reply, "ok")
	if !ok {
		return nil, fmt.Errorf("%s: %q: %s", c.name, line, reply)
	}
	kv := map[string]int64{}
	for _, f := range strings.Fields(rest) {
		k, v, ok := strings.Cut(f, "=")
		if !ok {
			continue
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("%s: bad value in %q", c.name, reply)
		}
		kv[k] = n
	}
	return kv, nil
}

// usageOf reads the counters every reply carries.
func usageOf(kv map[string]int64) usage {
	return usage{mallocs: uint64(kv["mallocs"]), bytes: uint64(kv["alloc_bytes"]), cpu: time.Duration(kv["cpu_ns"])}
}

// usage asks the child for its counters.
func (c *child) usage() (usage, error) {
	kv, err := c.command(context.Background(), "stats", 30*time.Second)
	if err != nil {
		return usage{}, err
	}
	return usageOf(kv), nil
}

func (c *child) pid() int { return c.cmd.Process.Pid }

// kill kills the child at once.
func (c *child) kill() {
	c.cmd.Process.Kill()
}

// stop closes the child's stdin, which makes it exit, and kills it if it
// lingers.
func (c *child) stop() error {
	var err error
	c.once.Do(func() {
		c.stdin.Close()
		select {
		case <-c.exited:
		case <-time.After(5 * time.Second):
			c.kill()
			<-c.exited
			err = fmt.Errorf("%s did not exit when its stdin closed; killed", c.name)
		}
		for _, f := range c.onStop {
			f()
		}
	})
	return err
}

// sockDir returns a fresh short directory for a Unix socket (paths are
// limited to about 108 bytes).
func sockDir() (string, error) {
	return os.MkdirTemp("", "captp-bench-")
}

// startGoServer starts the bench server child for a Go implementation.
func startGoServer(ctx context.Context, cfg *Config, im Impl) (*child, string, error) {
	dir, err := sockDir()
	if err != nil {
		return nil, "", err
	}
	sock := filepath.Join(dir, "s.sock")
	cmd, err := cfg.childCommand("-impl", string(im), "-listen", sock)
	if err != nil {
		os.RemoveAll(dir)
		return nil, "", err
	}
	ch, err := startChild(ctx, string(im)+" bench server", cmd, "listening")
	if err != nil {
		os.RemoveAll(dir)
		return nil, "", err
	}
	ch.onStop = append(ch.onStop, func() { os.RemoveAll(dir) })
	return ch, sock, nil
}
