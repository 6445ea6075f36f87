// Package cppbuild builds the project's C++ programs (interop/cpp) against
// Debian's libcapnp, for the interop tests and the benchmarks, and caches
// them under the user cache dir by a hash of sources, tools and flags.
package cppbuild

import (
	"bytes"
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
	"sync"
)

// InstallHint says what to install when the C++ toolchain is missing.
const InstallHint = "apt-get install capnproto libcapnp-dev pkg-config g++   (or: make deps)"

// Spec says what to build.
type Spec struct {
	// Name prefixes the cache entry ("interop", "bench").
	Name string
	// Programs are source base names in interop/cpp (without ".c++");
	// each is linked with the compiled test schema.
	Programs []string
	// Flags are g++ flags besides pkg-config's.
	Flags []string
	// CachedOnly reports a skip instead of building when the programs are
	// not in the cache yet.
	CachedOnly bool
}

// Build returns each program's binary, building them when needed. skip is
// non-empty, and says why, when the C++ reference cannot be built here.
func Build(s Spec) (bins map[string]string, skip string, err error) {
	var missing []string
	for _, tool := range []string{"g++", "pkg-config", "capnp"} {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, tool)
		}
	}
	if !slices.Contains(missing, "pkg-config") {
		if _, err := Run("", "pkg-config", "--exists", "capnp-rpc"); err != nil {
			missing = append(missing, "libcapnp-dev (pkg-config capnp-rpc)")
		}
	}
	if len(missing) > 0 {
		return nil, "missing " + strings.Join(missing, ", "), nil
	}
	root, err := Root()
	if err != nil {
		return nil, "", err
	}
	srcDir := filepath.Join(root, "interop", "cpp")
	schema := filepath.Join(root, "internal", "testcapnp", "test.capnp")
	// test.capnp imports /go.capnp, which ships with go-capnp.
	goCapnpDir, err := Run(root, "go", "list", "-m", "-f", "{{.Dir}}", "capnproto.org/go/capnp/v3")
	if err != nil {
		return nil, "", fmt.Errorf("locating go-capnp's std schemas: %w", err)
	}
	stdDir := filepath.Join(strings.TrimSpace(goCapnpDir), "std")
	pkgFlags, err := Run("", "pkg-config", "--cflags", "--libs", "capnp-rpc")
	if err != nil {
		return nil, "", err
	}

	// Cache key: sources, schemas, tool versions, flags, programs.
	h := sha256.New()
	sources, err := filepath.Glob(filepath.Join(srcDir, "*"))
	if err != nil {
		return nil, "", err
	}
	slices.Sort(sources)
	for _, f := range append(sources, schema, filepath.Join(stdDir, "go.capnp")) {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, "", err
		}
		fmt.Fprintf(h, "file %s %d\n", filepath.Base(f), len(b))
		h.Write(b)
	}
	for _, c := range [][]string{{"g++", "--version"}, {"capnp", "--version"}, {"pkg-config", "--modversion", "capnp-rpc"}} {
		out, err := Run("", c[0], c[1:]...)
		if err != nil {
			return nil, "", err
		}
		fmt.Fprintf(h, "tool %s\n", out)
	}
	fmt.Fprintf(h, "flags %q %q programs %q\n", s.Flags, pkgFlags, s.Programs)
	key := hex.EncodeToString(h.Sum(nil))[:24]

	cacheRoot, err := os.UserCacheDir()
	if err != nil {
		cacheRoot = os.TempDir()
	}
	cacheRoot = filepath.Join(cacheRoot, "captp-cpp")
	dir := filepath.Join(cacheRoot, s.Name+"-"+key)
	bins = make(map[string]string, len(s.Programs))
	built := true
	for _, p := range s.Programs {
		bins[p] = filepath.Join(dir, p)
		built = built && isExecutable(bins[p])
	}
	if built {
		return bins, "", nil
	}
	if s.CachedOnly {
		return nil, "the C++ programs are not built yet", nil
	}

	// Build in a private directory, then rename it into place, so that
	// concurrent processes never see a half-built cache entry.
	if err := os.MkdirAll(cacheRoot, 0o755); err != nil {
		return nil, "", err
	}
	tmp, err := os.MkdirTemp(cacheRoot, "build-")
	if err != nil {
		return nil, "", err
	}
	defer os.RemoveAll(tmp)
	if _, err := Run(root, "capnp", "compile", "-I", stdDir, "-oc++:"+tmp,
		"--src-prefix="+filepath.Dir(schema), schema); err != nil {
		return nil, "", err
	}
	flags := strings.Fields(pkgFlags)
	cxx := func(args ...string) error {
		all := append(append(slices.Clone(s.Flags), "-I", tmp, "-I", srcDir), args...)
		_, err := Run(tmp, "g++", append(all, flags...)...)
		return err
	}
	if err := cxx("-c", "test.capnp.c++", "-o", "test.capnp.o"); err != nil {
		return nil, "", err
	}
	var wg sync.WaitGroup
	errs := make([]error, len(s.Programs))
	for i, prog := range s.Programs {
		wg.Go(func() {
			errs[i] = cxx(filepath.Join(srcDir, prog+".c++"), "test.capnp.o", "-o", prog)
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, "", err
	}
	if err := os.Rename(tmp, dir); err != nil && !isExecutable(bins[s.Programs[0]]) {
		return nil, "", fmt.Errorf("installing the build into the cache: %w", err)
	}
	return bins, "", nil
}

// Root finds the captp source tree: above the working directory, or where
// this package was compiled from.
func Root() (string, error) {
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
				if _, err := os.Stat(filepath.Join(dir, "interop", "cpp")); err == nil {
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
	return "", errors.New("the captp source tree (interop/cpp) was not found; run from inside it")
}

// Run runs a command in dir and returns its standard output; a failure
// carries the command line and its standard error.
func Run(dir, name string, args ...string) (string, error) {
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String(), nil
}

func isExecutable(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0
}
