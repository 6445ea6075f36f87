package capnptext

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/std/capnp/schema"
)

func TestLookup(t *testing.T) {
	s := testSchema(t)
	if got := s.Files(); len(got) != 1 || got[0] != "test.capnp" {
		t.Errorf("Files() = %q, want [test.capnp]", got)
	}
	all := lookup(t, s, "All")
	if all.DisplayName != "test.capnp:All" || all.ShortName != "All" || all.Kind != KindStruct {
		t.Errorf("All: %q %q %v", all.DisplayName, all.ShortName, all.Kind)
	}
	if full := lookup(t, s, "test.capnp:All"); full != all {
		t.Error("full and short names find different nodes")
	}
	if s.Node(all.ID) != all {
		t.Error("Node(id) does not find All")
	}
	nested := lookup(t, s, "Outer.Nested")
	if nested.DisplayName != "test.capnp:Outer.Nested" {
		t.Errorf("nested: %q", nested.DisplayName)
	}
	color := lookup(t, s, "Color")
	if strings.Join(color.Enumerants, ",") != "red,green,blue" {
		t.Errorf("Color enumerants %q", color.Enumerants)
	}
	if _, err := s.Lookup("Nope"); err == nil || !strings.Contains(err.Error(), "Nope") {
		t.Errorf("Lookup(Nope) error = %v", err)
	}
	// Implicit parameter and result structs are indexed too.
	if p := lookup(t, s, "Dir.getFile$Params"); p.Struct == nil || len(p.Struct.Fields) != 1 || p.Struct.Fields[0].Name != "name" {
		t.Errorf("Dir.getFile$Params: %+v", p)
	}
	var names []string
	for _, n := range s.Interfaces() {
		names = append(names, n.ShortName)
	}
	if got := strings.Join(names, ","); got != "Base,Dir,File,Other,Store" {
		t.Errorf("Interfaces() = %s", got)
	}
}

// The layout facts below follow from the spec's layout rules for the test
// schema (and are checked against the compiler by TestLayoutMatchesCompiler).
func TestObjectSize(t *testing.T) {
	s := testSchema(t)
	for name, want := range map[string]capnp.ObjectSize{
		"Inner":    {DataSize: 8, PointerCount: 1},
		"Info":     {DataSize: 0, PointerCount: 2},
		"HasCaps":  {DataSize: 8, PointerCount: 2},
		"Defaults": {DataSize: 32, PointerCount: 4},
	} {
		if got := lookup(t, s, name).ObjectSize(); got != want {
			t.Errorf("%s.ObjectSize() = %v, want %v", name, got, want)
		}
	}
}

func TestResolve(t *testing.T) {
	s := testSchema(t)
	dir, file, base, store := lookup(t, s, "Dir"), lookup(t, s, "File"), lookup(t, s, "Base"), lookup(t, s, "Store")
	for _, tc := range []struct {
		name    string
		iface   *Node
		ordinal uint16
	}{
		{"Dir.getFile", dir, 0},
		{"Dir.stat", dir, 3},
		{"test.capnp:Dir.list", dir, 1},
		{"File.read", file, 1},
		{"Store.put", store, 0},
		// Inherited methods keep their declaring interface's id and ordinal.
		{"Store.getFile", dir, 0},
		{"Store.read", file, 1},
		{"Store.ping", base, 0},
		{"Dir.ping", base, 0},
		// Bare names when unambiguous.
		{"getFile", dir, 0},
		{"ping", base, 0},
		{"put", store, 0},
	} {
		m, err := s.Resolve(tc.name)
		if err != nil {
			t.Errorf("Resolve(%q): %v", tc.name, err)
			continue
		}
		if m.Interface != tc.iface || m.ID != tc.ordinal {
			t.Errorf("Resolve(%q) = %s #%d, want %s #%d", tc.name, m.Interface.ShortName, m.ID, tc.iface.ShortName, tc.ordinal)
		}
		cm := m.CapnpMethod()
		if cm.InterfaceID != tc.iface.ID || cm.MethodID != tc.ordinal {
			t.Errorf("Resolve(%q).CapnpMethod() = %+v", tc.name, cm)
		}
	}
	m, err := s.Resolve("Store.put")
	if err != nil {
		t.Fatal(err)
	}
	if m.Params != lookup(t, s, "All") || m.Results != lookup(t, s, "Inner") {
		t.Errorf("Store.put params %s results %s, want All and Inner", m.Params, m.Results)
	}
	m, err = s.Resolve("File.read")
	if err != nil {
		t.Fatal(err)
	}
	if m.Params.DisplayName != "test.capnp:File.read$Params" || m.Results.DisplayName != "test.capnp:File.read$Results" {
		t.Errorf("File.read params %s results %s", m.Params, m.Results)
	}

	for _, tc := range []struct{ name, wantErr string }{
		// A wrong method lists the methods, inherited ones included.
		{"Store.nope", "put, getFile, list, sub, stat, both, mixed, hold, size, read, ping"},
		// A wrong interface lists the interfaces.
		{"Nope.size", "interfaces: Base, Dir, File, Other, Store"},
		{"All.size", "struct, not an interface"},
		// Ambiguous bare names say which exist.
		{"size", "File.size, Other.size"},
		{"nope", "interfaces: Base, Dir, File, Other, Store"},
	} {
		_, err := s.Resolve(tc.name)
		if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
			t.Errorf("Resolve(%q) error = %v, want it to contain %q", tc.name, err, tc.wantErr)
		}
	}
	// Store inherits from Dir and File, which both inherit Base: ping once.
	count := 0
	for _, m := range store.Methods() {
		if m.Name == "ping" {
			count++
		}
	}
	if count != 1 {
		t.Errorf("Store.Methods() has ping %d times", count)
	}
}

func TestParseRejectsGarbage(t *testing.T) {
	good, err := os.ReadFile(testSchemaBin)
	if err != nil {
		t.Fatal(err)
	}
	for name, data := range map[string][]byte{
		"empty":     nil,
		"short":     good[:7],
		"truncated": good[:len(good)/2],
		"junk":      bytes.Repeat([]byte{0xff}, 64),
	} {
		if _, err := Parse(data); err == nil {
			t.Errorf("Parse(%s) succeeded", name)
		}
	}
}

// FuzzParseSchema feeds corrupted compiled schemas to Parse: errors are
// fine, panics are not, and what parses must be usable.
func FuzzParseSchema(f *testing.F) {
	good, err := os.ReadFile(testSchemaBin)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good, 100, byte(1))
	f.Fuzz(func(t *testing.T, data []byte, at int, x byte) {
		if len(data) > 0 {
			if at < 0 {
				at = -at
			}
			data = append([]byte(nil), data...)
			data[at%len(data)] ^= x
		}
		s, err := Parse(data)
		if err != nil {
			return
		}
		for _, n := range s.nodes {
			if n.Struct != nil {
				if st, err := EncodeNew(n, "()"); err == nil {
					_, _ = Format(st, n)
				}
			}
			for _, m := range n.Methods() {
				_, _ = s.Chain(m.Interface.ShortName+"."+m.Name, "", ".x().y()")
			}
		}
	})
}

func TestLoadWithoutCompiler(t *testing.T) {
	_, err := Load(context.Background(), &LoadOptions{Compiler: "capnp-definitely-not-installed"}, "testdata/test.capnp")
	if !errors.Is(err, ErrNoCompiler) || !strings.Contains(err.Error(), "capnproto") {
		t.Errorf("Load without compiler: %v", err)
	}
}

func TestLoad(t *testing.T) {
	needCapnp(t)
	s, err := Load(context.Background(), nil, "testdata/test.capnp")
	if err != nil {
		t.Fatal(err)
	}
	ref := testSchema(t)
	if len(s.nodes) != len(ref.nodes) {
		t.Errorf("Load found %d nodes, the committed request %d", len(s.nodes), len(ref.nodes))
	}
	for id, n := range ref.nodes {
		if m := s.nodes[id]; m == nil || m.DisplayName != n.DisplayName {
			t.Errorf("node %s missing or renamed after Load", n.DisplayName)
		}
	}
	// Compiler errors come back with the compiler's message.
	dir := t.TempDir()
	bad := dir + "/bad.capnp"
	if err := os.WriteFile(bad, []byte("@0xc4a1f0e2b3d49a02;\nstruct X { a @0 :Nope; }\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(context.Background(), nil, bad); err == nil || !strings.Contains(err.Error(), "Nope") {
		t.Errorf("Load(bad.capnp) error = %v", err)
	}
	// A schema importing /go.capnp compiles with the default import paths.
	gofile := dir + "/withgo.capnp"
	src := "@0xc4a1f0e2b3d49a03;\nusing Go = import \"/go.capnp\";\n$Go.package(\"x\");\n$Go.import(\"x\");\nstruct Y { b @0 :Bool; }\n"
	if err := os.WriteFile(gofile, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	gs, err := Load(context.Background(), nil, gofile)
	if err != nil {
		t.Fatalf("Load(withgo.capnp): %v (import paths %q)", err, DefaultImportPaths())
	}
	if n, err := gs.Lookup("withgo.capnp:Y"); err != nil || n.Kind != KindStruct {
		t.Errorf("withgo.capnp:Y: %v", err)
	}
}

// TestCompiledSchemaUpToDate compares the committed compiled schema with a
// fresh compile, by content (ids, names, layouts, methods) rather than by
// bytes, which carry the compiler's version.
func TestCompiledSchemaUpToDate(t *testing.T) {
	needCapnp(t)
	fresh, err := Parse(capnpTool(t, nil, "compile", "-o-", "--src-prefix=testdata", "testdata/test.capnp"))
	if err != nil {
		t.Fatal(err)
	}
	if got, want := describeSchema(fresh), describeSchema(testSchema(t)); got != want {
		t.Errorf("%s is stale; regenerate it: capnp compile -o- --src-prefix=testdata testdata/test.capnp > %s\nfresh:\n%s\ncommitted:\n%s", testSchemaBin, testSchemaBin, got, want)
	}
}

func describeSchema(s *Schema) string {
	var lines []string
	for _, n := range s.nodes {
		l := fmt.Sprintf("%016x %s %v %v", n.ID, n.DisplayName, n.Kind, n.ObjectSize())
		if n.Struct != nil {
			for _, f := range n.Struct.Fields {
				l += fmt.Sprintf(" %s@%d/%d:%v", f.Name, f.Offset, f.Discriminant, f.Type)
			}
		}
		for _, m := range n.Methods() {
			l += fmt.Sprintf(" %s#%d(%s)->(%s)", m.Name, m.ID, m.Params, m.Results)
		}
		l += " " + strings.Join(n.Enumerants, ",")
		lines = append(lines, l)
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

// TestLayoutMatchesCompiler checks the index's sizes, ids and field
// offsets against the layout comments of `capnp compile -ocapnp`.
func TestLayoutMatchesCompiler(t *testing.T) {
	needCapnp(t)
	s := testSchema(t)
	out := string(capnpTool(t, nil, "compile", "-ocapnp", "--src-prefix=testdata", "testdata/test.capnp"))
	structRe := regexp.MustCompile(`struct (\w+) @0x([0-9a-f]+) \{  # (\d+) bytes, (\d+) ptrs`)
	fieldRe := regexp.MustCompile(`(\w+) @\d+ :[^;]+;  # (bits\[(\d+), (\d+)\)|ptr\[(\d+)\])(, union tag = (\d+))?`)
	have := map[string]bool{}
	for _, n := range s.nodes {
		if n.Struct == nil {
			continue
		}
		for _, f := range n.Struct.Fields {
			if f.Type == nil {
				continue
			}
			var lay string
			if f.Type.isPointer() {
				lay = fmt.Sprintf("%s ptr[%d]", f.Name, f.Offset)
			} else {
				sz := f.Type.bitSize()
				lay = fmt.Sprintf("%s bits[%d, %d)", f.Name, uint64(f.Offset)*sz, uint64(f.Offset)*sz+sz)
			}
			if f.Discriminant != NoDiscriminant {
				lay += fmt.Sprintf(" tag %d", f.Discriminant)
			}
			have[lay] = true
		}
	}
	structs, fields := 0, 0
	for _, m := range structRe.FindAllStringSubmatch(out, -1) {
		structs++
		id, _ := strconv.ParseUint(m[2], 16, 64)
		n := s.Node(id)
		if n == nil || !strings.HasSuffix(n.ShortName, m[1]) {
			t.Errorf("struct %s @0x%s: index has %v", m[1], m[2], n)
			continue
		}
		bytes, _ := strconv.Atoi(m[3])
		ptrs, _ := strconv.Atoi(m[4])
		if got := n.ObjectSize(); int(got.DataSize) != bytes || int(got.PointerCount) != ptrs {
			t.Errorf("struct %s: ObjectSize %v, compiler says %d bytes, %d ptrs", m[1], got, bytes, ptrs)
		}
	}
	for _, m := range fieldRe.FindAllStringSubmatch(out, -1) {
		fields++
		var lay string
		if m[5] != "" {
			lay = fmt.Sprintf("%s ptr[%s]", m[1], m[5])
		} else {
			lay = fmt.Sprintf("%s bits[%s, %s)", m[1], m[3], m[4])
		}
		if m[7] != "" {
			lay += " tag " + m[7]
		}
		if m[3] == "0" && m[4] == "0" {
			continue // Void: no storage, offsets meaningless
		}
		if !have[lay] {
			t.Errorf("compiler layout %q not found in the index", lay)
		}
	}
	if structs < 8 || fields < 60 {
		t.Errorf("parsed only %d structs and %d fields from capnp compile -ocapnp; the regexps are stale", structs, fields)
	}
}

// handSchema builds a compiled schema by hand: struct nodes given as
// id → group field targets (each field a group of that id).
func handSchema(t *testing.T, structs map[uint64][]uint64) []byte {
	t.Helper()
	msg, seg, err := capnp.NewMessage(capnp.SingleSegment(nil))
	if err != nil {
		t.Fatal(err)
	}
	req, err := schema.NewRootCodeGeneratorRequest(seg)
	if err != nil {
		t.Fatal(err)
	}
	nodes, err := req.NewNodes(int32(len(structs)))
	if err != nil {
		t.Fatal(err)
	}
	i := 0
	for id, groups := range structs {
		n := nodes.At(i)
		i++
		n.SetId(id)
		if err := n.SetDisplayName(fmt.Sprintf("hand.capnp:S%d", id)); err != nil {
			t.Fatal(err)
		}
		n.SetStructNode()
		n.StructNode().SetDataWordCount(1)
		fields, err := n.StructNode().NewFields(int32(len(groups)))
		if err != nil {
			t.Fatal(err)
		}
		for j, g := range groups {
			f := fields.At(j)
			if err := f.SetName(fmt.Sprintf("g%d", j)); err != nil {
				t.Fatal(err)
			}
			f.SetDiscriminantValue(NoDiscriminant)
			f.SetGroup()
			f.Group().SetTypeId(g)
		}
	}
	b, err := msg.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Groups must form trees: a group containing itself, or shared by two
// fields, would make printing loop or take exponential time.
func TestParseRejectsGroupCycles(t *testing.T) {
	for name, tc := range map[string]struct {
		structs map[uint64][]uint64
		wantErr string
	}{
		"tree":      {map[uint64][]uint64{1: {2, 3}, 2: {4}, 3: nil, 4: nil}, ""},
		"self":      {map[uint64][]uint64{1: {1}}, "contains itself"},
		"loop":      {map[uint64][]uint64{1: nil, 2: {3}, 3: {2}}, "contains itself"},
		"shared":    {map[uint64][]uint64{1: {2, 2}, 2: nil}, "is used by fields of both"},
		"not found": {map[uint64][]uint64{1: {7}}, "is not a struct node"},
	} {
		s, err := Parse(handSchema(t, tc.structs))
		if tc.wantErr == "" {
			if err != nil {
				t.Errorf("%s: %v", name, err)
				continue
			}
			n := s.Node(1)
			st, err := EncodeNew(n, "(g0 = (g0 = ()), g1 = ())")
			if err != nil {
				t.Errorf("%s: %v", name, err)
				continue
			}
			if got, err := Format(st, n); err != nil || got != "(g0 = (g0 = ()), g1 = ())" {
				t.Errorf("%s: Format = %s, %v", name, got, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
			t.Errorf("%s: Parse error = %v, want it to contain %q", name, err, tc.wantErr)
		}
	}
}
