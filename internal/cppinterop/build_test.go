package cppinterop

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// installHint names what to install when the C++ toolchain is missing.
const installHint = "apt-get install capnproto libcapnp-dev pkg-config g++   (or: make deps)"

// cxxFlags are the g++ flags besides pkg-config's. Part of the cache key.
var cxxFlags = []string{"-std=c++17", "-O1", "-g0"}

// Built C++ programs, set by TestMain.
var (
	cppServerBin string
	cppClientBin string
	// cppSkip is why the C++ tests cannot run (tools missing); empty when
	// they can.
	cppSkip string
	// cppBuildErr is a failed build with the tools present: every test
	// that needs the programs fails with it.
	cppBuildErr error
)

func TestMain(m *testing.M) {
	flag.Parse()
	start := time.Now()
	cppServerBin, cppClientBin, cppSkip, cppBuildErr = buildPrograms()
	switch {
	case cppSkip != "":
		fmt.Fprintf(os.Stderr, "\n%s\nSKIPPING C++ interop tests: %s\n  install: %s\n%s\n\n",
			strings.Repeat("=", 72), cppSkip, installHint, strings.Repeat("=", 72))
	case cppBuildErr != nil:
		fmt.Fprintf(os.Stderr, "building the C++ interop programs failed:\n%v\n", cppBuildErr)
	case testing.Verbose():
		fmt.Fprintf(os.Stderr, "C++ interop programs ready in %v: %s\n",
			time.Since(start).Round(time.Millisecond), filepath.Dir(cppServerBin))
	}
	goleak.VerifyTestMain(m)
}

// requireCpp skips the test, loudly, when the toolchain is missing and
// fails it when the build failed.
func requireCpp(t *testing.T) {
	t.Helper()
	if cppSkip != "" {
		t.Skipf("SKIPPED, C++ toolchain missing: %s\n  install: %s", cppSkip, installHint)
	}
	if cppBuildErr != nil {
		t.Fatalf("building the C++ interop programs: %v", cppBuildErr)
	}
}

// repoRoot finds the module root from the package directory.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("go.mod not found above the package directory")
		}
		dir = parent
	}
}

// run runs a command and returns its standard output, or an error carrying
// its standard error.
func run(dir, name string, args ...string) (string, error) {
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String(), nil
}

// buildPrograms returns the paths of test_server and test_client, building
// them into the cache when needed. skip is non-empty when a tool is
// missing.
func buildPrograms() (server, client, skip string, err error) {
	var missing []string
	for _, tool := range []string{"g++", "pkg-config", "capnp"} {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, tool)
		}
	}
	if !slices.Contains(missing, "pkg-config") {
		if _, err := run("", "pkg-config", "--exists", "capnp-rpc"); err != nil {
			missing = append(missing, "libcapnp-dev (pkg-config capnp-rpc)")
		}
	}
	if len(missing) > 0 {
		return "", "", "missing " + strings.Join(missing, ", "), nil
	}

	root, err := repoRoot()
	if err != nil {
		return "", "", "", err
	}
	srcDir := filepath.Join(root, "interop", "cpp")
	schema := filepath.Join(root, "internal", "testcapnp", "test.capnp")
	// test.capnp imports /go.capnp, which ships with go-capnp.
	goCapnpDir, err := run(root, "go", "list", "-m", "-f", "{{.Dir}}", "capnproto.org/go/capnp/v3")
	if err != nil {
		return "", "", "", fmt.Errorf("locating go-capnp's std schemas: %w", err)
	}
	stdDir := filepath.Join(strings.TrimSpace(goCapnpDir), "std")
	pkgFlags, err := run("", "pkg-config", "--cflags", "--libs", "capnp-rpc")
	if err != nil {
		return "", "", "", err
	}

	// Cache key: sources, schemas, tool versions, flags.
	h := sha256.New()
	sources, err := filepath.Glob(filepath.Join(srcDir, "*"))
	if err != nil {
		return "", "", "", err
	}
	slices.Sort(sources)
	for _, f := range append(sources, schema, filepath.Join(stdDir, "go.capnp")) {
		b, err := os.ReadFile(f)
		if err != nil {
			return "", "", "", err
		}
		fmt.Fprintf(h, "file %s %d\n", filepath.Base(f), len(b))
		h.Write(b)
	}
	for _, c := range [][]string{{"g++", "--version"}, {"capnp", "--version"}, {"pkg-config", "--modversion", "capnp-rpc"}} {
		out, err := run("", c[0], c[1:]...)
		if err != nil {
			return "", "", "", err
		}
		fmt.Fprintf(h, "tool %s\n", out)
	}
	fmt.Fprintf(h, "flags %q %q\n", cxxFlags, pkgFlags)
	key := hex.EncodeToString(h.Sum(nil))[:24]

	cacheRoot, err := os.UserCacheDir()
	if err != nil {
		cacheRoot = os.TempDir()
	}
	cacheRoot = filepath.Join(cacheRoot, "captp-cpp")
	dir := filepath.Join(cacheRoot, key)
	server, client = filepath.Join(dir, "test_server"), filepath.Join(dir, "test_client")
	if isExecutable(server) && isExecutable(client) {
		return server, client, "", nil
	}

	// Build in a private directory, then rename it into place, so that
	// concurrent test processes never see a half-built cache entry.
	if err := os.MkdirAll(cacheRoot, 0o755); err != nil {
		return "", "", "", err
	}
	tmp, err := os.MkdirTemp(cacheRoot, "build-")
	if err != nil {
		return "", "", "", err
	}
	defer os.RemoveAll(tmp)
	if _, err := run(root, "capnp", "compile", "-I", stdDir, "-oc++:"+tmp,
		"--src-prefix="+filepath.Dir(schema), schema); err != nil {
		return "", "", "", err
	}
	flags := strings.Fields(pkgFlags)
	cxx := func(args ...string) error {
		all := append(append(slices.Clone(cxxFlags), "-I", tmp, "-I", srcDir), args...)
		_, err := run(tmp, "g++", append(all, flags...)...)
		return err
	}
	if err := cxx("-c", "test.capnp.c++", "-o", "test.capnp.o"); err != nil {
		return "", "", "", err
	}
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i, prog := range []string{"test_server", "test_client"} {
		wg.Go(func() {
			errs[i] = cxx(filepath.Join(srcDir, prog+".c++"), "test.capnp.o", "-o", prog)
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return "", "", "", err
	}
	if err := os.Rename(tmp, dir); err != nil && !isExecutable(server) {
		return "", "", "", fmt.Errorf("installing the build into the cache: %w", err)
	}
	return server, client, "", nil
}

func isExecutable(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0
}
