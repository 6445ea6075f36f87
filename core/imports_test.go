// js, wasip1 and tamago test binaries cannot rely on reading the source
// tree; the Linux run enforces the allowlist for every target.

//go:build !js && !wasip1 && !tamago

package core_test

import (
	"bufio"
	"go/ast"
	"go/build/constraint"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// importsModulePath is this module's path. Packages of the module that the
// core imports are held to the core's rules too.
const importsModulePath = "github.com/captp-go/captp"

// forbiddenImport reports why the core may not import path, or "" if it may.
func forbiddenImport(path string) string {
	under := func(root string) bool { return path == root || strings.HasPrefix(path, root+"/") }
	switch {
	case under("os"), under("net"), under("syscall"):
		return "operating system access: the core speaks to byte streams only"
	case path == "unsafe":
		return "unsafe"
	case under("capnproto.org/go/capnp/v3/rpc"):
		return "go-capnp's rpc package is a peer to test against, not a dependency"
	}
	return ""
}

// unsafeAllowed reports whether file name in dir may import path
// although forbiddenImport says no: unsafe in the core's fastdecode.go
// alone, which mirrors go-capnp's capnp.Ptr to hand out the results it
// decoded itself, and runs only while a layout check at start-up finds
// the mirror exact (TestFastDecodeLayoutMatchesGoCapnp).
func unsafeAllowed(dir, name, path string) bool {
	return path == "unsafe" && filepath.Clean(dir) == "." && name == "fastdecode.go"
}

// importViolation is one forbidden import, at "file:line".
type importViolation struct {
	pos, path, why string
}

// checkDirImports parses the non-test Go files of dir (imports only) and
// returns its forbidden imports, the module-local packages it imports and
// how many files it read.
func checkDirImports(dir string) (bad []importViolation, local []string, files int, err error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, nil, 0, err
	}
	fset := token.NewFileSet()
	for _, e := range entries {
		name := e.Name()
		if e.IsDir() || !strings.HasSuffix(name, ".go") || strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, filepath.Join(dir, name), nil, parser.ImportsOnly|parser.ParseComments)
		if err != nil {
			return nil, nil, 0, err
		}
		if ignoredFile(f.Comments, f.Package) {
			continue
		}
		files++
		for _, imp := range f.Imports {
			path, err := strconv.Unquote(imp.Path.Value)
			if err != nil {
				return nil, nil, 0, err
			}
			if why := forbiddenImport(path); why != "" && !unsafeAllowed(dir, name, path) {
				p := fset.Position(imp.Pos())
				bad = append(bad, importViolation{pos: p.Filename + ":" + strconv.Itoa(p.Line), path: path, why: why})
			}
			if rel, ok := strings.CutPrefix(path, importsModulePath+"/"); ok {
				local = append(local, rel)
			}
		}
	}
	return bad, local, files, nil
}

// ignoredFile reports whether the file says `//go:build ignore` (helper
// programs that are never part of the package).
func ignoredFile(comments []*ast.CommentGroup, pkg token.Pos) bool {
	for _, g := range comments {
		if g.Pos() >= pkg {
			break
		}
		for _, c := range g.List {
			if !constraint.IsGoBuild(c.Text) {
				continue
			}
			expr, err := constraint.Parse(c.Text)
			if tag, ok := expr.(*constraint.TagExpr); err == nil && ok && tag.Tag == "ignore" {
				return true
			}
		}
	}
	return false
}

// checkTreeImports checks every package directory under root (skipping
// testdata and hidden directories) and, transitively, every package of
// this module they import; moduleRoot is the module's directory.
func checkTreeImports(root, moduleRoot string) (bad []importViolation, files int, err error) {
	var queue []string
	err = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return err
		}
		if name := d.Name(); path != root && (name == "testdata" || strings.HasPrefix(name, ".") || strings.HasPrefix(name, "_")) {
			return filepath.SkipDir
		}
		queue = append(queue, filepath.Clean(path))
		return nil
	})
	if err != nil {
		return nil, 0, err
	}
	seen := map[string]bool{}
	for len(queue) > 0 {
		dir := queue[0]
		queue = queue[1:]
		abs, err := filepath.Abs(dir)
		if err != nil {
			return nil, 0, err
		}
		if seen[abs] {
			continue
		}
		seen[abs] = true
		b, local, n, err := checkDirImports(dir)
		if err != nil {
			return nil, 0, err
		}
		bad, files = append(bad, b...), files+n
		for _, rel := range local {
			queue = append(queue, filepath.Join(moduleRoot, filepath.FromSlash(rel)))
		}
	}
	return bad, files, nil
}

// TestCoreImportAllowlist enforces that the core never touches the
// operating system (see DESIGN.md): no os, net, syscall (or below), unsafe
// (but in fastdecode.go, see unsafeAllowed) or go-capnp's rpc package, in
// core, its subpackages, and the module's packages they import.
func TestCoreImportAllowlist(t *testing.T) {
	mod, err := os.Open(filepath.Join("..", "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(mod)
	sc.Scan()
	mod.Close()
	if got := strings.TrimSpace(sc.Text()); got != "module "+importsModulePath {
		t.Fatalf("../go.mod starts %q; update importsModulePath", got)
	}

	bad, files, err := checkTreeImports(".", "..")
	if err != nil {
		t.Fatal(err)
	}
	if files == 0 {
		t.Fatal("found no non-test Go files to check in core")
	}
	for _, v := range bad {
		t.Errorf("%s: imports %q: %s", v.pos, v.path, v.why)
	}

	t.Run("detects violations", func(t *testing.T) {
		dir := t.TempDir()
		write := func(name, src string) {
			t.Helper()
			if err := os.WriteFile(filepath.Join(dir, name), []byte(src), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		write("bad.go", `package p

import (
	"io"
	"os"
	"net/netip"
	"syscall/js"
	_ "unsafe"
	"capnproto.org/go/capnp/v3/rpc/transport"
	"capnproto.org/go/capnp/v3/std/capnp/rpc"
	"osfake"
)
`)
		write("bad_test.go", "package p\n\nimport \"os\"\n")
		write("gen.go", "//go:build ignore\n\npackage main\n\nimport \"os\"\n")
		write("sub.go", "package p\n\nimport \""+importsModulePath+"/sub\"\n")
		if err := os.Mkdir(filepath.Join(dir, "sub"), 0o755); err != nil {
			t.Fatal(err)
		}
		write("sub/sub.go", "package sub\n\nimport \"net\"\n")

		// dir stands for the module root and for the tree being checked.
		bad, files, err := checkTreeImports(dir, dir)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, v := range bad {
			rel, err := filepath.Rel(dir, v.pos)
			if err != nil {
				t.Fatal(err)
			}
			got = append(got, filepath.ToSlash(rel)+" "+v.path)
		}
		want := []string{
			"bad.go:5 os",
			"bad.go:6 net/netip",
			"bad.go:7 syscall/js",
			"bad.go:8 unsafe",
			"bad.go:9 capnproto.org/go/capnp/v3/rpc/transport",
			"sub/sub.go:3 net",
		}
		if !slices.Equal(got, want) || files != 3 {
			t.Errorf("checked %d files, flagged %q; want 3 files, %q", files, got, want)
		}
	})
}
