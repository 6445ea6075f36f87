package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/captp-go/captp/internal/cppbuild"
)

// CppInstallHint says what to install for the C++ reference.
const CppInstallHint = cppbuild.InstallHint

// cppProgram is the built C++ bench program (interop/cpp/bench.c++).
type cppProgram struct{ bin string }

// buildCpp returns the C++ bench program, building it into the cache when
// needed. skip is non-empty when the C++ reference cannot run here, and
// says why.
func buildCpp(cachedOnly bool) (bin, skip string, err error) {
	bins, skip, err := cppbuild.Build(cppbuild.Spec{
		Name:     "bench",
		Programs: []string{"bench"},
		// -O2: the reference at its best (Debian builds libcapnp with -O2).
		Flags:      []string{"-std=c++17", "-O2", "-g0"},
		CachedOnly: cachedOnly,
	})
	if skip != "" {
		return "", "skipped: " + skip + "; " + CppInstallHint, nil
	}
	if err != nil {
		return "", "", err
	}
	return bins["bench"], "", nil
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
