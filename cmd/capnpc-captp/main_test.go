package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

const repoRoot = "../.."

// requireCapnp skips the test, loudly, when the capnp compiler is
// missing.
func requireCapnp(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("capnp"); err != nil {
		t.Skip("SKIPPED: the capnp compiler is not installed; install the Debian package capnproto (make deps)")
	}
}

// goCmd runs the go command in the repository root.
func goCmd(t *testing.T, args ...string) string {
	t.Helper()
	cmd := exec.CommandContext(t.Context(), "go", args...)
	cmd.Dir = repoRoot
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}

// capnpStd is the std directory of the go-capnp module (go.capnp,
// stream.capnp).
func capnpStd(t *testing.T) string {
	t.Helper()
	return filepath.Join(goCmd(t, "list", "-m", "-f", "{{.Dir}}", "capnproto.org/go/capnp/v3"), "std")
}

// request returns the CodeGeneratorRequest `capnp compile -o-` writes
// for schema (a path from the repository root).
func request(t *testing.T, std, schema string) []byte {
	t.Helper()
	cmd := exec.CommandContext(t.Context(), "capnp", "compile", "-I", std, "-I", ".", "-o-", "--src-prefix="+filepath.Dir(schema), schema)
	cmd.Dir = repoRoot
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("capnp compile %s: %v\n%s", schema, err, stderr.String())
	}
	return out
}

// TestGolden: the committed stubs are what the generator writes now,
// and generating twice gives the same bytes.
func TestGolden(t *testing.T) {
	requireCapnp(t)
	std := capnpStd(t)
	for _, tc := range []struct {
		schema, pkg, committed string
	}{
		{"internal/testcapnp/test.capnp", "testnative", "internal/testnative/test.captp.go"},
		{"internal/testnative/inheritcapnp/inherit.capnp", "", "internal/testnative/inheritcapnp/inherit.captp.go"},
	} {
		t.Run(tc.schema, func(t *testing.T) {
			req := request(t, std, tc.schema)
			files, err := generateFromReader(bytes.NewReader(req), options{pkg: tc.pkg})
			if err != nil {
				t.Fatal(err)
			}
			again, err := generateFromReader(bytes.NewReader(req), options{pkg: tc.pkg})
			if err != nil {
				t.Fatal(err)
			}
			if len(files) != 1 || len(again) != 1 || filepath.Base(tc.committed) != files[0].Name {
				t.Fatalf("generated %d files (%+v); want one named %s", len(files), names(files), filepath.Base(tc.committed))
			}
			if !bytes.Equal(files[0].Content, again[0].Content) {
				t.Fatal("two generations differ")
			}
			want, err := os.ReadFile(filepath.Join(repoRoot, tc.committed))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(files[0].Content, want) {
				t.Fatalf("%s is stale (run make gen); generated:\n%s", tc.committed, files[0].Content)
			}
		})
	}
}

func names(files []File) []string {
	var s []string
	for _, f := range files {
		s = append(s, f.Name)
	}
	return s
}

// TestPlugin runs the built plugin the way the Makefile does, as a
// capnp compile -o plugin, and compares its file with the committed one.
func TestPlugin(t *testing.T) {
	requireCapnp(t)
	std := capnpStd(t)
	bin := filepath.Join(t.TempDir(), "capnpc-captp")
	goCmd(t, "build", "-o", bin, "./cmd/capnpc-captp")
	out := t.TempDir()
	const dir = "internal/testnative/inheritcapnp"
	cmd := exec.CommandContext(t.Context(), "capnp", "compile", "-I", std, "-I", ".", "-o"+bin+":"+out, "--src-prefix="+dir, dir+"/inherit.capnp")
	cmd.Dir = repoRoot
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("capnp compile: %v\n%s", err, b)
	}
	got, err := os.ReadFile(filepath.Join(out, "inherit.captp.go"))
	if err != nil {
		t.Fatal(err)
	}
	want, err := os.ReadFile(filepath.Join(repoRoot, dir, "inherit.captp.go"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("the plugin's output differs from the committed inherit.captp.go")
	}
}

// TestGeneratedCodeCompiles generates testdata/features.capnp (the
// generator's corner cases) with capnpc-go and capnpc-captp into a
// package inside the module, and into a second package with -package,
// and vets both.
func TestGeneratedCodeCompiles(t *testing.T) {
	requireCapnp(t)
	capnpcGo, err := exec.LookPath("capnpc-go")
	if err != nil {
		gobin := goCmd(t, "env", "GOPATH")
		capnpcGo = filepath.Join(strings.Split(gobin, string(os.PathListSeparator))[0], "bin", "capnpc-go")
		if _, err := os.Stat(capnpcGo); err != nil {
			t.Skip("SKIPPED: capnpc-go is not installed; run make capnpc-go")
		}
	}
	std := capnpStd(t)
	// The package's import path is the one features.capnp declares.
	pkgDir := "gentest"
	if _, err := os.Stat(pkgDir); err == nil {
		t.Fatalf("%s exists already (a crashed run?); remove it", pkgDir)
	}
	t.Cleanup(func() { os.RemoveAll(pkgDir) })
	if err := os.MkdirAll(filepath.Join(pkgDir, "native"), 0o755); err != nil {
		t.Fatal(err)
	}
	abs, err := filepath.Abs(pkgDir)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(t.Context(), "capnp", "compile", "-I", std, "-I", ".", "-o"+capnpcGo+":"+abs,
		"--src-prefix=cmd/capnpc-captp/testdata", "cmd/capnpc-captp/testdata/features.capnp")
	cmd.Dir = repoRoot
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("capnpc-go: %v\n%s", err, b)
	}
	req := request(t, std, "cmd/capnpc-captp/testdata/features.capnp")
	if err := run(bytes.NewReader(req), pkgDir, options{}); err != nil {
		t.Fatal(err)
	}
	if err := run(bytes.NewReader(req), filepath.Join(pkgDir, "native"), options{pkg: "native"}); err != nil {
		t.Fatal(err)
	}
	goCmd(t, "vet", "./cmd/capnpc-captp/gentest/...")

	src, err := os.ReadFile(filepath.Join(pkgDir, "features.captp.go"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"func (c Features_Native) Plain(ctx context.Context, params func(Req) error) Features_plain_NativeCall", // user-declared structs
		"func (c Features_Native) Other(",                            // $Go.name on a method
		"func (c Features_plain_NativeCall) Wait_() Features_Native", // clashes with PendingCall.Wait
		"ResultsReferencingPayload(data []byte)",                     // $Go.name on a Data field
		"func (c Features_box_NativeCall) N() Features_Nested_Native",
		"features.capnp:Features.generic has no native stub: it is a generic method",
		"Box (features.capnp:Box) is generic",
		"func (c Both_Native) Hi(",     // second superclass
		"case Features_Nested_TypeID:", // dispatched by Both
	} {
		if !strings.Contains(string(src), want) {
			t.Errorf("features.captp.go lacks %q", want)
		}
	}
	for _, bad := range []string{"Box_Native", "ResultsReferencingA(", "func (c Features_box_NativeCall) B()"} {
		if strings.Contains(string(src), bad) {
			t.Errorf("features.captp.go has %q", bad)
		}
	}
}

// TestBadRequests: bad input is an error, never a panic.
func TestBadRequests(t *testing.T) {
	for name, in := range map[string][]byte{
		"empty":     nil,
		"garbage":   []byte("not a capnp message at all"),
		"truncated": {0, 0, 0, 0, 8, 0, 0, 0, 0, 0},
	} {
		if _, err := generateFromReader(bytes.NewReader(in), options{}); err == nil {
			t.Errorf("%s input: no error", name)
		}
	}
	requireCapnp(t)
	std := capnpStd(t)
	req := request(t, std, "cmd/capnpc-captp/testdata/nopkg.capnp")
	if _, err := generateFromReader(bytes.NewReader(req), options{}); err == nil || !strings.Contains(err.Error(), "$Go.package") {
		t.Errorf("schema without $Go.package: %v", err)
	}
	// Every truncation of a real request fails cleanly or generates.
	req = request(t, std, "internal/testnative/inheritcapnp/inherit.capnp")
	for n := 0; n < len(req); n += 7 {
		generateFromReader(bytes.NewReader(req[:n]), options{}) //nolint:errcheck // must not panic
	}
	// So does a request with one byte changed, at positions spread over it.
	for i := 8; i < len(req); i += 29 {
		bad := bytes.Clone(req)
		bad[i] ^= 0xa5
		generateFromReader(bytes.NewReader(bad), options{}) //nolint:errcheck // must not panic
	}
}
