package cppinterop

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/captp-go/captp/internal/cppbuild"
)

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
			strings.Repeat("=", 72), cppSkip, cppbuild.InstallHint, strings.Repeat("=", 72))
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
		t.Skipf("SKIPPED, C++ toolchain missing: %s\n  install: %s", cppSkip, cppbuild.InstallHint)
	}
	if cppBuildErr != nil {
		t.Fatalf("building the C++ interop programs: %v", cppBuildErr)
	}
}

// buildPrograms returns the paths of test_server and test_client,
// building them into the cache when needed. skip is non-empty when a tool
// is missing.
func buildPrograms() (server, client, skip string, err error) {
	bins, skip, err := cppbuild.Build(cppbuild.Spec{
		Name:     "interop",
		Programs: []string{"test_server", "test_client"},
		Flags:    []string{"-std=c++17", "-O1", "-g0"},
	})
	if skip != "" || err != nil {
		return "", "", skip, err
	}
	return bins["test_server"], bins["test_client"], "", nil
}
