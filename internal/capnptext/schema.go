package capnptext

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"sort"
	"strings"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/std/capnp/schema"
)

// NoDiscriminant is the discriminant value of a field that is not a union
// member.
const NoDiscriminant = uint16(0xffff)

// maxNesting bounds recursion through groups, nested values and types, so
// that a hostile schema (say, a group that contains itself) or deeply nested
// text cannot exhaust the stack.
const maxNesting = 64

// NodeKind says what a schema node declares.
type NodeKind int

// The kinds of schema nodes.
const (
	KindFile NodeKind = iota
	KindStruct
	KindEnum
	KindInterface
	KindConst
	KindAnnotation
)

// String returns the kind's schema-language name, e.g. "struct".
func (k NodeKind) String() string {
	switch k {
	case KindFile:
		return "file"
	case KindStruct:
		return "struct"
	case KindEnum:
		return "enum"
	case KindInterface:
		return "interface"
	case KindConst:
		return "const"
	case KindAnnotation:
		return "annotation"
	}
	return fmt.Sprintf("NodeKind(%d)", int(k))
}

// TypeKind is the kind of a Cap'n Proto type; the values are those of
// schema.Type_Which.
type TypeKind = schema.Type_Which

// Schema is an index of compiled Cap'n Proto schema nodes: by id, by display
// name, and the interfaces with their methods. It is safe for concurrent use
// once built.
type Schema struct {
	nodes    map[uint64]*Node
	byName   map[string]*Node
	byShort  map[string][]*Node
	files    []string
	req      *capnp.Message // keeps default values readable
	ifaceAll []*Node        // interfaces, sorted by display name
}

// Node is one declaration of a schema: a struct (or group, or a method's
// implicit parameter/result struct), enum, interface, or another kind that
// is indexed by name only.
type Node struct {
	ID uint64
	// DisplayName is the compiler's name, "file.capnp:Outer.Inner".
	DisplayName string
	// ShortName is DisplayName without the file prefix, "Outer.Inner".
	ShortName string
	Kind      NodeKind
	// Generic reports that the node has type parameters; fields of
	// parameter type are treated as AnyPointer.
	Generic bool

	// Struct is set for KindStruct.
	Struct *StructInfo
	// Enumerants is set for KindEnum: the names, indexed by value.
	Enumerants []string
	// Interface is set for KindInterface.
	Interface *InterfaceInfo
}

// StructInfo describes a struct's layout and fields.
type StructInfo struct {
	DataWords    uint16
	PointerCount uint16
	IsGroup      bool
	// DiscriminantCount is the number of members of the struct's unnamed
	// union (0 if it has none); DiscriminantOffset is where the union's
	// discriminant lives, in 16-bit units from the start of the data section.
	DiscriminantCount  uint16
	DiscriminantOffset uint32
	// Fields in the schema's order (ordinal order), which is the order
	// `capnp decode` prints them in.
	Fields []*Field
}

// Field is one field of a struct or group.
type Field struct {
	Name  string
	Index int
	// Discriminant is the union discriminant value, or NoDiscriminant.
	Discriminant uint16
	// Group is the group's node for a group field (including named unions);
	// nil for a slot.
	Group   *Node
	groupID uint64
	// Offset is the slot's offset in units of its type's size (bits for
	// Bool, pointers for pointer types).
	Offset uint32
	// Type is the slot's type; nil for a group.
	Type *Type

	// defaultBits holds a primitive field's default in the bit pattern it
	// is XORed with on the wire.
	defaultBits uint64
	// defaultPtr holds a pointer field's default value (may be invalid).
	defaultPtr capnp.Ptr
}

// Type is a field's or list element's type.
type Type struct {
	Kind TypeKind
	// Elem is the element type of a List.
	Elem *Type
	// ID is the node id of an Enum, Struct or Interface type.
	ID uint64
	// Node is the node ID names, once the index is built (nil if the schema
	// does not contain it).
	Node *Node
}

// InterfaceInfo lists an interface's own methods and its superclasses.
type InterfaceInfo struct {
	// Methods are the interface's own methods, indexed by ordinal.
	Methods []*Method
	// Superclasses are the interfaces it extends directly.
	Superclasses []*Node
	superIDs     []uint64
}

// Method is a method of an interface.
type Method struct {
	Name string
	// ID is the method ordinal, capnp.Method.MethodID.
	ID uint16
	// Interface is the interface that declares the method; its ID is
	// capnp.Method.InterfaceID (also when the method is called through an
	// interface that inherits it).
	Interface *Node
	// Params and Results are the parameter and result struct nodes.
	Params  *Node
	Results *Node
	paramID uint64
	resID   uint64
}

// CapnpMethod returns the method's identity as go-capnp wants it in a Send.
func (m *Method) CapnpMethod() capnp.Method {
	return capnp.Method{
		InterfaceID:   m.Interface.ID,
		MethodID:      m.ID,
		InterfaceName: m.Interface.DisplayName,
		MethodName:    m.Name,
	}
}

// String returns "Interface.method".
func (m *Method) String() string { return m.Interface.ShortName + "." + m.Name }

// ObjectSize returns the size a struct of this node needs: the ArgsSize of
// a Send for a parameter struct. It is zero for non-struct nodes.
func (n *Node) ObjectSize() capnp.ObjectSize {
	if n == nil || n.Struct == nil {
		return capnp.ObjectSize{}
	}
	return capnp.ObjectSize{
		DataSize:     capnp.Size(n.Struct.DataWords) * 8,
		PointerCount: n.Struct.PointerCount,
	}
}

// String returns the node's display name.
func (n *Node) String() string { return n.DisplayName }

// String returns the type in schema-language form, e.g. "List(Text)".
func (t *Type) String() string {
	if t == nil {
		return "?"
	}
	switch t.Kind {
	case schema.Type_Which_list:
		return "List(" + t.Elem.String() + ")"
	case schema.Type_Which_enum, schema.Type_Which_structType, schema.Type_Which_interface:
		if t.Node != nil {
			return t.Node.ShortName
		}
		return fmt.Sprintf("@0x%016x", t.ID)
	}
	return typeNames[t.Kind]
}

var typeNames = map[TypeKind]string{
	schema.Type_Which_void: "Void", schema.Type_Which_bool: "Bool",
	schema.Type_Which_int8: "Int8", schema.Type_Which_int16: "Int16",
	schema.Type_Which_int32: "Int32", schema.Type_Which_int64: "Int64",
	schema.Type_Which_uint8: "UInt8", schema.Type_Which_uint16: "UInt16",
	schema.Type_Which_uint32: "UInt32", schema.Type_Which_uint64: "UInt64",
	schema.Type_Which_float32: "Float32", schema.Type_Which_float64: "Float64",
	schema.Type_Which_text: "Text", schema.Type_Which_data: "Data",
	schema.Type_Which_anyPointer: "AnyPointer",
}

// isPointer reports whether values of the type live in the pointer section.
func (t *Type) isPointer() bool {
	switch t.Kind {
	case schema.Type_Which_text, schema.Type_Which_data, schema.Type_Which_list,
		schema.Type_Which_structType, schema.Type_Which_interface, schema.Type_Which_anyPointer:
		return true
	}
	return false
}

// bitSize is the size of a data-section value in bits (0 for void and
// pointers).
func (t *Type) bitSize() uint64 {
	switch t.Kind {
	case schema.Type_Which_bool:
		return 1
	case schema.Type_Which_int8, schema.Type_Which_uint8:
		return 8
	case schema.Type_Which_int16, schema.Type_Which_uint16, schema.Type_Which_enum:
		return 16
	case schema.Type_Which_int32, schema.Type_Which_uint32, schema.Type_Which_float32:
		return 32
	case schema.Type_Which_int64, schema.Type_Which_uint64, schema.Type_Which_float64:
		return 64
	}
	return 0
}

// LoadOptions configures Load.
type LoadOptions struct {
	// Compiler is the capnp compiler to run; "" means "capnp" on PATH.
	Compiler string
	// ImportPaths are passed as -I; nil means DefaultImportPaths().
	ImportPaths []string
	// SrcPrefix is stripped from file names in display names; "" means
	// the directory of the first file, so names read "file.capnp:Foo".
	SrcPrefix string
}

// ErrNoCompiler is returned (wrapped) by Load when the capnp compiler cannot
// be found.
var ErrNoCompiler = errors.New("the capnp compiler is not on PATH: install the Debian package capnproto (apt-get install capnproto)")

// Load compiles the schema files with the capnp compiler
// (`capnp compile -o-`) and indexes the result. Imports of /go.capnp are
// found through opts.ImportPaths (by default go-capnp's std directory).
func Load(ctx context.Context, opts *LoadOptions, files ...string) (*Schema, error) {
	if len(files) == 0 {
		return nil, errors.New("load schema: no files given")
	}
	if opts == nil {
		opts = &LoadOptions{}
	}
	compiler := opts.Compiler
	if compiler == "" {
		compiler = "capnp"
	}
	path, err := exec.LookPath(compiler)
	if err != nil {
		return nil, fmt.Errorf("load schema %s: %w (%v)", strings.Join(files, " "), ErrNoCompiler, err)
	}
	args := []string{"compile", "-o-"}
	prefix := opts.SrcPrefix
	if prefix == "" {
		if d := filepath.Dir(files[0]); d != "." {
			prefix = d
		}
	}
	if prefix != "" {
		args = append(args, "--src-prefix="+prefix)
	}
	imports := opts.ImportPaths
	if imports == nil {
		imports = DefaultImportPaths()
	}
	for _, dir := range imports {
		args = append(args, "-I", dir)
	}
	args = append(args, files...)
	cmd := exec.CommandContext(ctx, path, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			msg = "no diagnostics"
		}
		return nil, fmt.Errorf("load schema: capnp %s: %w:\n%s", strings.Join(args, " "), err, msg)
	}
	s, err := Parse(stdout.Bytes())
	if err != nil {
		return nil, fmt.Errorf("load schema %s: %w", strings.Join(files, " "), err)
	}
	return s, nil
}

// DefaultImportPaths returns the import directories Load uses by default:
// go-capnp's std directory (which holds /go.capnp and /capnp/*.capnp), when
// it can be found in the Go module cache, for the go-capnp version this
// binary was built with. The compiler adds /usr/include and
// /usr/local/include by itself.
func DefaultImportPaths() []string {
	const mod = "capnproto.org/go/capnp/v3"
	var version string
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, d := range bi.Deps {
			if d.Path == mod {
				version = d.Version
				if d.Replace != nil {
					if d.Replace.Version == "" && filepath.IsAbs(d.Replace.Path) {
						if dir := filepath.Join(d.Replace.Path, "std"); hasGoCapnp(dir) {
							return []string{dir}
						}
					}
					version = d.Replace.Version
				}
			}
		}
	}
	if version != "" {
		for _, cache := range modCaches() {
			if dir := filepath.Join(cache, mod+"@"+version, "std"); hasGoCapnp(dir) {
				return []string{dir}
			}
		}
	}
	// Not in build info (e.g. tests of another module): ask the go command.
	if goBin, err := exec.LookPath("go"); err == nil {
		out, err := exec.Command(goBin, "list", "-m", "-f", "{{.Dir}}", mod).Output()
		if err == nil {
			if dir := filepath.Join(strings.TrimSpace(string(out)), "std"); hasGoCapnp(dir) {
				return []string{dir}
			}
		}
	}
	return []string{}
}

func modCaches() []string {
	var out []string
	if c := os.Getenv("GOMODCACHE"); c != "" {
		out = append(out, c)
	}
	if gp := os.Getenv("GOPATH"); gp != "" {
		for _, p := range filepath.SplitList(gp) {
			out = append(out, filepath.Join(p, "pkg", "mod"))
		}
	}
	if home, err := os.UserHomeDir(); err == nil {
		out = append(out, filepath.Join(home, "go", "pkg", "mod"))
	}
	return out
}

func hasGoCapnp(dir string) bool {
	st, err := os.Stat(filepath.Join(dir, "go.capnp"))
	return err == nil && !st.IsDir()
}

// Parse indexes an already compiled schema: a CodeGeneratorRequest in the
// standard (unpacked) message framing, as `capnp compile -o-` writes it.
func Parse(data []byte) (*Schema, error) {
	msg, err := capnp.Unmarshal(data)
	if err != nil {
		return nil, fmt.Errorf("parse schema: decode CodeGeneratorRequest message: %w", err)
	}
	req, err := schema.ReadRootCodeGeneratorRequest(msg)
	if err != nil {
		return nil, fmt.Errorf("parse schema: read CodeGeneratorRequest: %w", err)
	}
	return fromRequest(msg, req)
}

func fromRequest(msg *capnp.Message, req schema.CodeGeneratorRequest) (*Schema, error) {
	s := &Schema{
		nodes:   map[uint64]*Node{},
		byName:  map[string]*Node{},
		byShort: map[string][]*Node{},
		req:     msg,
	}
	nodes, err := req.Nodes()
	if err != nil {
		return nil, fmt.Errorf("parse schema: nodes: %w", err)
	}
	for i := 0; i < nodes.Len(); i++ {
		n, err := convertNode(nodes.At(i))
		if err != nil {
			return nil, fmt.Errorf("parse schema: node %d: %w", i, err)
		}
		if _, dup := s.nodes[n.ID]; dup {
			return nil, fmt.Errorf("parse schema: node %s: duplicate id @0x%016x", n.DisplayName, n.ID)
		}
		s.nodes[n.ID] = n
		s.byName[n.DisplayName] = n
		if n.Kind != KindFile {
			s.byShort[n.ShortName] = append(s.byShort[n.ShortName], n)
		}
	}
	files, err := req.RequestedFiles()
	if err != nil {
		return nil, fmt.Errorf("parse schema: requested files: %w", err)
	}
	for i := 0; i < files.Len(); i++ {
		name, err := files.At(i).Filename()
		if err != nil {
			return nil, fmt.Errorf("parse schema: requested file %d: %w", i, err)
		}
		s.files = append(s.files, name)
	}
	// Link ids to nodes.
	for _, n := range s.nodes {
		if n.Struct != nil {
			for _, f := range n.Struct.Fields {
				if f.Type == nil {
					g := s.nodes[f.groupID]
					if g == nil || g.Struct == nil {
						return nil, fmt.Errorf("parse schema: %s.%s: group @0x%016x is not a struct node of the schema", n.DisplayName, f.Name, f.groupID)
					}
					f.Group = g
				} else {
					s.linkType(f.Type)
				}
			}
		}
		if n.Interface != nil {
			for _, id := range n.Interface.superIDs {
				sup := s.nodes[id]
				if sup == nil || sup.Interface == nil {
					return nil, fmt.Errorf("parse schema: %s: superclass @0x%016x is not an interface of the schema", n.DisplayName, id)
				}
				n.Interface.Superclasses = append(n.Interface.Superclasses, sup)
			}
			for _, m := range n.Interface.Methods {
				m.Params, m.Results = s.nodes[m.paramID], s.nodes[m.resID]
				if m.Params == nil || m.Params.Struct == nil || m.Results == nil || m.Results.Struct == nil {
					return nil, fmt.Errorf("parse schema: %s.%s: parameter or result struct is missing from the schema", n.DisplayName, m.Name)
				}
			}
			s.ifaceAll = append(s.ifaceAll, n)
		}
	}
	sort.Slice(s.ifaceAll, func(i, j int) bool { return s.ifaceAll[i].DisplayName < s.ifaceAll[j].DisplayName })
	if err := s.checkGroups(); err != nil {
		return nil, fmt.Errorf("parse schema: %w", err)
	}
	return s, nil
}

// checkGroups makes sure groups form trees, as the compiler writes them:
// each group node belongs to one field, and no group contains itself.
// Otherwise walking a struct's groups (to print or to find capabilities)
// could loop or take exponential time.
func (s *Schema) checkGroups() error {
	parent := map[*Node]*Node{}
	for _, n := range s.nodes {
		if n.Struct == nil {
			continue
		}
		for _, f := range n.Struct.Fields {
			if f.Group == nil {
				continue
			}
			if p, dup := parent[f.Group]; dup {
				return fmt.Errorf("group %s is used by fields of both %s and %s", f.Group.DisplayName, p.DisplayName, n.DisplayName)
			}
			parent[f.Group] = n
		}
	}
	for g := range parent {
		cur := g
		for steps := 0; ; steps++ {
			p, ok := parent[cur]
			if !ok {
				break
			}
			if p == g || steps > len(parent) {
				return fmt.Errorf("group %s contains itself", g.DisplayName)
			}
			cur = p
		}
	}
	return nil
}

func (s *Schema) linkType(t *Type) {
	for depth := 0; t != nil && depth < maxNesting; depth++ {
		switch t.Kind {
		case schema.Type_Which_enum, schema.Type_Which_structType, schema.Type_Which_interface:
			t.Node = s.nodes[t.ID]
		}
		t = t.Elem
	}
}

func convertNode(sn schema.Node) (*Node, error) {
	name, err := sn.DisplayName()
	if err != nil {
		return nil, fmt.Errorf("display name: %w", err)
	}
	n := &Node{ID: sn.Id(), DisplayName: name, ShortName: name, Generic: sn.IsGeneric()}
	if i := strings.IndexByte(name, ':'); i >= 0 {
		n.ShortName = name[i+1:]
	}
	fail := func(what string, err error) (*Node, error) {
		return nil, fmt.Errorf("%s: %s: %w", name, what, err)
	}
	switch sn.Which() {
	case schema.Node_Which_file:
		n.Kind = KindFile
	case schema.Node_Which_structNode:
		n.Kind = KindStruct
		st := sn.StructNode()
		info := &StructInfo{
			DataWords:          st.DataWordCount(),
			PointerCount:       st.PointerCount(),
			IsGroup:            st.IsGroup(),
			DiscriminantCount:  st.DiscriminantCount(),
			DiscriminantOffset: st.DiscriminantOffset(),
		}
		fields, err := st.Fields()
		if err != nil {
			return fail("fields", err)
		}
		for i := 0; i < fields.Len(); i++ {
			f, err := convertField(fields.At(i), i)
			if err != nil {
				return fail(fmt.Sprintf("field %d", i), err)
			}
			info.Fields = append(info.Fields, f)
		}
		n.Struct = info
	case schema.Node_Which_enum:
		n.Kind = KindEnum
		ens, err := sn.Enum().Enumerants()
		if err != nil {
			return fail("enumerants", err)
		}
		for i := 0; i < ens.Len(); i++ {
			en, err := ens.At(i).Name()
			if err != nil {
				return fail(fmt.Sprintf("enumerant %d", i), err)
			}
			n.Enumerants = append(n.Enumerants, en)
		}
	case schema.Node_Which_interface:
		n.Kind = KindInterface
		info := &InterfaceInfo{}
		ms, err := sn.Interface().Methods()
		if err != nil {
			return fail("methods", err)
		}
		if ms.Len() > 1<<16 {
			return fail("methods", fmt.Errorf("%d methods", ms.Len()))
		}
		for i := 0; i < ms.Len(); i++ {
			m := ms.At(i)
			mn, err := m.Name()
			if err != nil {
				return fail(fmt.Sprintf("method %d", i), err)
			}
			info.Methods = append(info.Methods, &Method{
				Name: mn, ID: uint16(i), Interface: n,
				paramID: m.ParamStructType(), resID: m.ResultStructType(),
			})
		}
		sups, err := sn.Interface().Superclasses()
		if err != nil {
			return fail("superclasses", err)
		}
		for i := 0; i < sups.Len(); i++ {
			info.superIDs = append(info.superIDs, sups.At(i).Id())
		}
		n.Interface = info
	case schema.Node_Which_const:
		n.Kind = KindConst
	case schema.Node_Which_annotation:
		n.Kind = KindAnnotation
	default:
		return nil, fmt.Errorf("%s: unknown node kind %d", name, sn.Which())
	}
	return n, nil
}

func convertField(sf schema.Field, index int) (*Field, error) {
	name, err := sf.Name()
	if err != nil {
		return nil, fmt.Errorf("name: %w", err)
	}
	f := &Field{Name: name, Index: index, Discriminant: sf.DiscriminantValue()}
	switch sf.Which() {
	case schema.Field_Which_group:
		f.groupID = sf.Group().TypeId()
		return f, nil
	case schema.Field_Which_slot:
	default:
		return nil, fmt.Errorf("%s: unknown field kind %d", name, sf.Which())
	}
	slot := sf.Slot()
	f.Offset = slot.Offset()
	st, err := slot.Type()
	if err != nil {
		return nil, fmt.Errorf("%s: type: %w", name, err)
	}
	f.Type, err = convertType(st, 0)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if !slot.HasDefaultValue() {
		return f, nil
	}
	dv, err := slot.DefaultValue()
	if err != nil {
		return nil, fmt.Errorf("%s: default value: %w", name, err)
	}
	if err := f.setDefault(dv); err != nil {
		return nil, fmt.Errorf("%s: default value: %w", name, err)
	}
	return f, nil
}

func convertType(st schema.Type, depth int) (*Type, error) {
	if depth > maxNesting {
		return nil, errors.New("type nested too deeply")
	}
	t := &Type{Kind: st.Which()}
	switch t.Kind {
	case schema.Type_Which_list:
		et, err := st.List().ElementType()
		if err != nil {
			return nil, fmt.Errorf("list element type: %w", err)
		}
		if t.Elem, err = convertType(et, depth+1); err != nil {
			return nil, err
		}
	case schema.Type_Which_enum:
		t.ID = st.Enum().TypeId()
	case schema.Type_Which_structType:
		t.ID = st.StructType().TypeId()
	case schema.Type_Which_interface:
		t.ID = st.Interface().TypeId()
	default:
		if t.Kind > schema.Type_Which_anyPointer {
			return nil, fmt.Errorf("unknown type kind %d", t.Kind)
		}
	}
	return t, nil
}

// setDefault records a slot's default value. A default whose kind does not
// match the type is an error (the compiler never writes one).
func (f *Field) setDefault(v schema.Value) error {
	// Value's union uses the same numbering as Type's.
	if v.Which() != schema.Value_Which(f.Type.Kind) {
		return fmt.Errorf("value of kind %d for a %s field", v.Which(), f.Type)
	}
	var err error
	switch v.Which() {
	case schema.Value_Which_void:
	case schema.Value_Which_bool:
		if v.Bool() {
			f.defaultBits = 1
		}
	case schema.Value_Which_int8:
		f.defaultBits = uint64(uint8(v.Int8()))
	case schema.Value_Which_int16:
		f.defaultBits = uint64(uint16(v.Int16()))
	case schema.Value_Which_int32:
		f.defaultBits = uint64(uint32(v.Int32()))
	case schema.Value_Which_int64:
		f.defaultBits = uint64(v.Int64())
	case schema.Value_Which_uint8:
		f.defaultBits = uint64(v.Uint8())
	case schema.Value_Which_uint16:
		f.defaultBits = uint64(v.Uint16())
	case schema.Value_Which_uint32:
		f.defaultBits = uint64(v.Uint32())
	case schema.Value_Which_uint64:
		f.defaultBits = v.Uint64()
	case schema.Value_Which_float32:
		f.defaultBits = uint64(math.Float32bits(v.Float32()))
	case schema.Value_Which_float64:
		f.defaultBits = math.Float64bits(v.Float64())
	case schema.Value_Which_enum:
		f.defaultBits = uint64(v.Enum())
	case schema.Value_Which_text, schema.Value_Which_data, schema.Value_Which_list,
		schema.Value_Which_structValue, schema.Value_Which_anyPointer, schema.Value_Which_interface:
		// All pointer values live in the Value struct's pointer 0.
		f.defaultPtr, err = capnp.Struct(v).Ptr(0)
	}
	return err
}

// Files returns the names of the files the schema was compiled from.
func (s *Schema) Files() []string { return append([]string(nil), s.files...) }

// Node returns the node with the given id, or nil.
func (s *Schema) Node(id uint64) *Node { return s.nodes[id] }

// Lookup finds a node by display name: the full "file.capnp:Foo.Bar", or the
// short "Foo.Bar" when only one file declares it.
func (s *Schema) Lookup(name string) (*Node, error) {
	if n := s.byName[name]; n != nil {
		return n, nil
	}
	switch c := s.byShort[name]; len(c) {
	case 1:
		return c[0], nil
	case 0:
		return nil, fmt.Errorf("no declaration named %q in the schema (files: %s)", name, strings.Join(s.files, ", "))
	default:
		var names []string
		for _, n := range c {
			names = append(names, n.DisplayName)
		}
		sort.Strings(names)
		return nil, fmt.Errorf("%q is ambiguous: %s", name, strings.Join(names, ", "))
	}
}

// Interfaces returns every interface of the schema, sorted by display name.
func (s *Schema) Interfaces() []*Node { return append([]*Node(nil), s.ifaceAll...) }

// Methods returns the methods callable on an interface node: its own first
// (by ordinal), then those it inherits, breadth-first through its
// superclasses. A method inherited along two paths appears once.
func (n *Node) Methods() []*Method {
	if n == nil || n.Interface == nil {
		return nil
	}
	var out []*Method
	seen := map[*Node]bool{}
	queue := []*Node{n}
	for len(queue) > 0 {
		cur := queue[0]
		queue = queue[1:]
		if seen[cur] {
			continue
		}
		seen[cur] = true
		out = append(out, cur.Interface.Methods...)
		queue = append(queue, cur.Interface.Superclasses...)
	}
	return out
}

// Method finds a method callable on the interface by name (its own or an
// inherited one). The error lists the methods that exist.
func (n *Node) Method(name string) (*Method, error) {
	if n == nil || n.Interface == nil {
		return nil, fmt.Errorf("%s is not an interface", n)
	}
	ms := n.Methods()
	for _, m := range ms {
		if m.Name == name {
			return m, nil
		}
	}
	return nil, fmt.Errorf("interface %s has no method %q; it has: %s", n.ShortName, name, methodList(ms))
}

func methodList(ms []*Method) string {
	if len(ms) == 0 {
		return "(no methods)"
	}
	var names []string
	for _, m := range ms {
		names = append(names, m.Name)
	}
	return strings.Join(names, ", ")
}

// Resolve finds a method from "Interface.method" (the interface by full or
// short display name, e.g. "file.capnp:Outer.Iface.m" or "Iface.m") or a
// bare "method" when exactly one method of that name exists in the schema.
// Errors list the interfaces or methods that exist.
func (s *Schema) Resolve(name string) (*Method, error) {
	dot := strings.LastIndexByte(name, '.')
	colon := strings.LastIndexByte(name, ':')
	if dot < 0 || dot < colon {
		var found []*Method
		seen := map[*Method]bool{}
		for _, n := range s.ifaceAll {
			for _, m := range n.Interface.Methods {
				if m.Name == name && !seen[m] {
					seen[m] = true
					found = append(found, m)
				}
			}
		}
		switch len(found) {
		case 1:
			return found[0], nil
		case 0:
			return nil, fmt.Errorf("no method %q in the schema; interfaces: %s", name, s.interfaceList())
		default:
			var names []string
			for _, m := range found {
				names = append(names, m.String())
			}
			return nil, fmt.Errorf("method %q is ambiguous, say which: %s", name, strings.Join(names, ", "))
		}
	}
	iname, mname := name[:dot], name[dot+1:]
	n, err := s.Lookup(iname)
	if err != nil {
		return nil, fmt.Errorf("resolve %s: %w; interfaces: %s", name, err, s.interfaceList())
	}
	if n.Interface == nil {
		return nil, fmt.Errorf("resolve %s: %s is a %s, not an interface; interfaces: %s", name, n.DisplayName, n.Kind, s.interfaceList())
	}
	m, err := n.Method(mname)
	if err != nil {
		return nil, fmt.Errorf("resolve %s: %w", name, err)
	}
	return m, nil
}

func (s *Schema) interfaceList() string {
	if len(s.ifaceAll) == 0 {
		return "(none)"
	}
	var names []string
	for _, n := range s.ifaceAll {
		names = append(names, n.ShortName)
	}
	return strings.Join(names, ", ")
}
