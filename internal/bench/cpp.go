package bench

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"
)

// CppInstallHint says what to install for the C++ reference.
const CppInstallHint = "install capnproto libcapnp-dev pkg-config g++ (make deps)"

// cppFlags are the g++ flags besides pkg-config's; part of the cache key.
// -O2: the reference at its best (Debian builds libcapnp with -O2).
var cppFlags = []string{"-std=c++17", "-O2", "-g0"}

// cppProgram is the built C++ bench program (interop/cpp/bench.c++).
type cppProgram struct{ bin string }

// sourceRoot finds the captp source tree: above the working directory,
// or where this package was compiled from.
func sourceRoot() (string, error) {
	var starts []string
	if wd, err := os.Getwd(); err == nil {
		starts = append(starts, wd)
	}
	if _, file, _, ok := runtime.Caller(0); ok {
		starts = append(starts, filepath.Dir(file))
	}
	for _, dir := range starts {
		for {
			if b, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil &&
				bytes.Contains(b, []byte("module github.com/captp-go/captp\n")) {
				if _, err := os.Stat(filepath.Join(dir, "interop", "cpp", "bench.c++")); err == nil {
					return dir, nil
				}
			}
			parent := filepath.Dir(dir)
			if parent == dir {
				break
			}
			dir = parent
		}
	}
	return "", errors.New("the captp source tree (interop/cpp/bench.c++) was not found; run from inside it")
}

func runTool(dir, name string, args ...string) (string, error) {
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String(), nil
}

// buildCpp returns the C++ bench program, building it into
// ~/.cache/captp-cpp/bench-<hash> when needed. skip is non-empty when the
// C++ reference cannot run here, and says why.
func buildCpp(cachedOnly bool) (bin, skip string, err error) {
	var missing []string
	for _, tool := range []string{"g++", "pkg-config", "capnp"} {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, tool)
		}
	}
	if !slices.Contains(missing, "pkg-config") {
		if _, err := runTool("", "pkg-config", "--exists", "capnp-rpc"); err != nil {
			missing = append(missing, "libcapnp-dev")
		}
	}
	if len(missing) > 0 {
		return "", "skipped: missing " + strings.Join(missing, ", ") + "; " + CppInstallHint, nil
	}
	root, err := sourceRoot()
	if err != nil {
		return "", "skipped: " + err.Error(), nil
	}
	src := filepath.Join(root, "interop", "cpp", "bench.c++")
	schema := filepath.Join(root, "internal", "testcapnp", "test.capnp")
	goCapnpDir, err := runTool(root, "go", "list", "-m", "-f", "{{.Dir}}", "capnproto.org/go/capnp/v3")
	if err != nil {
		return "", "", fmt.Errorf("locating go-capnp's std schemas: %w", err)
	}
	stdDir := filepath.Join(strings.TrimSpace(goCapnpDir), "std")
	pkgFlags, err := runTool("", "pkg-config", "--cflags", "--libs", "capnp-rpc")
	if err != nil {
		return "", "", err
	}

	h := sha256.New()
	for _, f := range []string{src, schema, filepath.Join(stdDir, "go.capnp")} {
		b, err := os.ReadFile(f)
		if err != nil {
			return "", "", err
		}
		fmt.Fprintf(h, "file %s %d\n", filepath.Base(f), len(b))
		h.Write(b)
	}
	for _, c := range [][]string{{"g++", "--version"}, {"capnp", "--version"}, {"pkg-config", "--modversion", "capnp-rpc"}} {
		out, err := runTool("", c[0], c[1:]...)
		if err != nil {
			return "", "", err
		}
		fmt.Fprintf(h, "tool %s\n", out)
	}
	fmt.Fprintf(h, "flags %q %q\n", cppFlags, pkgFlags)
	key := hex.EncodeToString(h.Sum(nil))[:24]

	cacheRoot, err := os.UserCacheDir()
	if err != nil {
		cacheRoot = os.TempDir()
	}
	cacheRoot = filepath.Join(cacheRoot, "captp-cpp")
	dir := filepath.Join(cacheRoot, "bench-"+key)
	bin = filepath.Join(dir, "bench")
	if fi, err := os.Stat(bin); err == nil && fi.Mode()&0o111 != 0 {
		return bin, "", nil
	}
	if cachedOnly {
		return "", "skipped: the C++ bench program is not built yet (run `make bench` or `captp bench` once)", nil
	}

	// Build privately, then rename into place: concurrent builds never
	// see a half-built entry.
	if err := os.MkdirAll(cacheRoot, 0o755); err != nil {
		return "", "", err
	}
	tmp, err := os.MkdirTemp(cacheRoot, "build-")
	if err != nil {
		return "", "", err
	}
	defer os.RemoveAll(tmp)
	if _, err := runTool(root, "capnp", "compile", "-I", stdDir, "-oc++:"+tmp,
		"--src-prefix="+filepath.Dir(schema), schema); err != nil {
		return "", "", err
	}
	args := append(slices.Clone(cppFlags), "-I", tmp, "test.capnp.c++", src, "-o", "bench")
	if _, err := runTool(tmp, "g++", append(args, strings.Fields(pkgFlags)...)...); err != nil {
		return "", "", err
	}
	if err := os.Rename(tmp, dir); err != nil {
		if fi, serr := os.Stat(bin); serr != nil || fi.Mode()&0o111 == 0 {
			return "", "", fmt.Errorf("installing the build into the cache: %w", err)
		}
	}
	return bin, "", nil
}

// cppSession drives the C++ bench program: one process with both sides
// (pipe, unix), or a client process and a server process (unix-2proc).
type cppSession struct {
	client, server *child
}

func openCppSession(ctx context.Context, p *cppProgram, tr Transport) (session, error) {
	switch tr {
	case Pipe, Unix:
		mode := map[Transport]string{Pipe: "pipe", Unix: "socketpair"}[tr]
		c, err := startChild(ctx, "c++ bench (local)", exec.Command(p.bin, "local", mode), "ready")
		if err != nil {
			return nil, err
		}
		return &cppSession{client: c}, nil
	case Unix2P:
		srv, sock, err := startCppServer(ctx, p)
		if err != nil {
			return nil, err
		}
		c, err := startChild(ctx, "c++ bench client", exec.Command(p.bin, "client", "unix:"+sock), "ready")
		if err != nil {
			srv.stop()
			return nil, err
		}
		return &cppSession{client: c, server: srv}, nil
	}
	return nil, fmt.Errorf("unknown transport %q", tr)
}

// startCppServer starts `bench serve` on a fresh Unix socket.
func startCppServer(ctx context.Context, p *cppProgram) (*child, string, error) {
	dir, err := sockDir()
	if err != nil {
		return nil, "", err
	}
	sock := filepath.Join(dir, "s.sock")
	srv, err := startChild(ctx, "c++ bench server", exec.Command(p.bin, "serve", "unix:"+sock), "listening")
	if err != nil {
		os.RemoveAll(dir)
		return nil, "", err
	}
	srv.onStop = append(srv.onStop, func() { os.RemoveAll(dir) })
	return srv, sock, nil
}

func (s *cppSession) close() error {
	err := s.client.stop()
	if s.server != nil {
		err = errors.Join(err, s.server.stop())
	}
	return err
}

// run runs one command on the client and measures both sides.
func (s *cppSession) run(ctx context.Context, cmd string, n int) (result, error) {
	r := result{calls: n}
	var sv0 usage
	if s.server != nil {
		u, err := s.server.usage()
		if err != nil {
			return r, err
		}
		sv0 = u
	}
	before, err := s.client.command(ctx, "stats", 30*time.Second)
	if err != nil {
		return r, err
	}
	kv, err := s.client.command(ctx, cmd, 30*time.Minute)
	if err != nil {
		return r, err
	}
	r.elapsed = time.Duration(kv["elapsed_ns"])
	r.median, r.p99 = time.Duration(kv["median_ns"]), time.Duration(kv["p99_ns"])
	r.client = usageOf(kv).sub(usageOf(before))
	if s.server != nil {
		u, err := s.server.usage()
		if err != nil {
			return r, err
		}
		r.server, r.split = u.sub(sv0), true
	}
	return r, nil
}

func (s *cppSession) lat(ctx context.Context, n, size int) (result, error) {
	return s.run(ctx, fmt.Sprintf("lat %d %d", n, size), n)
}

func (s *cppSession) flight(ctx context.Context, n, k, size int) (result, error) {
	return s.run(ctx, fmt.Sprintf("flight %d %d %d", n, k, size), n)
}

func (s *cppSession) pipe2(ctx context.Context, n int) (result, error) {
	return s.run(ctx, fmt.Sprintf("pipe2 %d", n), n)
}
