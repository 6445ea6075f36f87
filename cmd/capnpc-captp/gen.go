package main

import (
	"bytes"
	"errors"
	"fmt"
	"go/format"
	"io"
	"path"
	"sort"
	"strings"
	"unicode"
	"unicode/utf8"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/std/capnp/schema"
)

// Annotation IDs of go.capnp, as capnpc-go reads them.
const (
	annPackage = 0xbea97f1023792be0 // $Go.package
	annImport  = 0xe130b601260e44b5 // $Go.import
	annName    = 0xc2b96012172f8df1 // $Go.name
)

const (
	corePath = "github.com/captp-go/captp/core"
	// noDiscriminant marks a field outside any union.
	noDiscriminant = 0xffff
)

// renameIdents are struct field names capnpc-go suffixes with "_" so its
// accessors do not collide with capnp.Struct's methods.
var renameIdents = map[string]bool{"IsValid": true, "Segment": true, "String": true, "Message": true, "Which": true}

// pendingMethods are the methods a generated pending call has already
// (core.PendingCall's and Struct): a pipeline accessor of the same name
// gets a trailing "_".
var pendingMethods = map[string]bool{"Wait": true, "Done": true, "Release": true, "Pipeline": true, "Err": true, "Struct": true}

// File is one generated file: its path relative to the output directory
// and its gofmt'd content.
type File struct {
	Name    string
	Content []byte
}

// node is a schema node with the Go name capnpc-go gives it.
type node struct {
	schema.Node
	name  string // Go identifier, as capnpc-go names it
	file  *node  // the file that declares it
	pkg   string // file nodes: $Go.package
	imp   string // file nodes: $Go.import
	nodes []*node
}

func (n *node) displayName() string {
	s, _ := n.DisplayName()
	return s
}

type generator struct {
	nodes map[uint64]*node
	opts  options
}

// options select where the stubs go.
type options struct {
	// pkg, when set, puts the stubs in a Go package of that name instead
	// of the schema's own (capnpc-go's) package; they then name
	// capnpc-go's types through the schema's $Go.import path. Use it when
	// the schema's package must not import captp's core (a package core's
	// own tests import).
	pkg string
}

// generateFromReader decodes a CodeGeneratorRequest and generates files.
func generateFromReader(r io.Reader, opts options) ([]File, error) {
	msg, err := capnp.NewDecoder(r).Decode()
	if err != nil {
		return nil, fmt.Errorf("reading the request: %w", err)
	}
	req, err := schema.ReadRootCodeGeneratorRequest(msg)
	if err != nil {
		return nil, fmt.Errorf("reading the request: %w", err)
	}
	return generate(req, opts)
}

// generate returns one file for each requested file that declares an
// interface, in request order.
func generate(req schema.CodeGeneratorRequest, opts options) ([]File, error) {
	g := &generator{nodes: make(map[uint64]*node), opts: opts}
	rnodes, err := req.Nodes()
	if err != nil {
		return nil, fmt.Errorf("reading nodes: %w", err)
	}
	var files []*node
	for i := 0; i < rnodes.Len(); i++ {
		n := &node{Node: rnodes.At(i)}
		g.nodes[n.Id()] = n
		if n.Which() == schema.Node_Which_file {
			files = append(files, n)
		}
	}
	for _, f := range files {
		if err := g.resolveFile(f); err != nil {
			return nil, err
		}
	}
	reqFiles, err := req.RequestedFiles()
	if err != nil {
		return nil, fmt.Errorf("reading requested files: %w", err)
	}
	var out []File
	for i := 0; i < reqFiles.Len(); i++ {
		rf := reqFiles.At(i)
		fname, err := rf.Filename()
		if err != nil {
			return nil, fmt.Errorf("requested file %d: %w", i, err)
		}
		f := g.nodes[rf.Id()]
		if f == nil || f.Which() != schema.Node_Which_file {
			return nil, fmt.Errorf("%s: no file node %#x in the request", fname, rf.Id())
		}
		content, ok, err := g.generateFile(f)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", fname, err)
		}
		if ok {
			name := strings.TrimSuffix(fname, ".capnp") + ".captp.go"
			if opts.pkg != "" {
				name = path.Base(name) // into the other package's directory
			}
			out = append(out, File{Name: name, Content: content})
		}
	}
	return out, nil
}

type annotations struct{ pkg, imp, name string }

func readAnnotations(l schema.Annotation_List, err error) annotations {
	var a annotations
	if err != nil {
		return a
	}
	for i := 0; i < l.Len(); i++ {
		an := l.At(i)
		v, err := an.Value()
		if err != nil || v.Which() != schema.Value_Which_text {
			continue
		}
		s, _ := v.Text()
		switch an.Id() {
		case annPackage:
			a.pkg = s
		case annImport:
			a.imp = s
		case annName:
			a.name = s
		}
	}
	return a
}

func rename(a annotations, name string) string {
	if a.name != "" {
		return a.name
	}
	return name
}

// title is strings.Title for one identifier, as capnpc-go applies it.
func title(s string) string {
	r, n := utf8.DecodeRuneInString(s)
	return string(unicode.ToTitle(r)) + s[n:]
}

// resolveFile names the file's nodes the way capnpc-go does.
func (g *generator) resolveFile(f *node) error {
	a := readAnnotations(f.Annotations())
	f.pkg, f.imp = a.pkg, a.imp
	nested, err := f.NestedNodes()
	if err != nil {
		return fmt.Errorf("%s: nested nodes: %w", f.displayName(), err)
	}
	for i := 0; i < nested.Len(); i++ {
		nn := nested.At(i)
		if n := g.nodes[nn.Id()]; n != nil {
			name, _ := nn.Name()
			if err := g.resolveName(n, "", name, f, 0); err != nil {
				return err
			}
		}
	}
	return nil
}

func (g *generator) resolveName(n *node, base, name string, f *node, depth int) error {
	if depth > 64 {
		return fmt.Errorf("%s: nodes nested too deep", f.displayName())
	}
	if n.file != nil {
		return nil // named already (a node reachable twice)
	}
	name = rename(readAnnotations(n.Annotations()), name)
	if name == "" {
		return fmt.Errorf("%s: a node with no name", f.displayName())
	}
	if base == "" {
		n.name = title(name)
		if n.Which() == schema.Node_Which_annotation && n.name[:1] != name[:1] {
			n.name += "_"
		}
	} else {
		n.name = base + "_" + name
	}
	n.file = f
	f.nodes = append(f.nodes, n)
	nested, err := n.NestedNodes()
	if err != nil {
		return fmt.Errorf("%s: nested nodes: %w", n.displayName(), err)
	}
	for i := 0; i < nested.Len(); i++ {
		nn := nested.At(i)
		if c := g.nodes[nn.Id()]; c != nil {
			cname, _ := nn.Name()
			if err := g.resolveName(c, n.name, cname, f, depth+1); err != nil {
				return err
			}
		}
	}
	switch n.Which() {
	case schema.Node_Which_structNode:
		fields, err := n.StructNode().Fields()
		if err != nil {
			return fmt.Errorf("%s: fields: %w", n.displayName(), err)
		}
		for i := 0; i < fields.Len(); i++ {
			fl := fields.At(i)
			if fl.Which() != schema.Field_Which_group {
				continue
			}
			grp := g.nodes[fl.Group().TypeId()]
			if grp == nil {
				continue
			}
			fname, _ := fl.Name()
			if err := g.resolveName(grp, n.name, rename(readAnnotations(fl.Annotations()), fname), f, depth+1); err != nil {
				return err
			}
		}
	case schema.Node_Which_interface:
		methods, err := n.Interface().Methods()
		if err != nil {
			return fmt.Errorf("%s: methods: %w", n.displayName(), err)
		}
		for i := 0; i < methods.Len(); i++ {
			m := methods.At(i)
			mname, _ := m.Name()
			base := n.name + "_" + rename(readAnnotations(m.Annotations()), mname)
			for _, x := range []struct {
				id   uint64
				name string
			}{{m.ParamStructType(), "Params"}, {m.ResultStructType(), "Results"}} {
				s := g.nodes[x.id]
				if s == nil || s.ScopeId() != 0 {
					continue // declared elsewhere: named with its scope
				}
				if err := g.resolveName(s, base, x.name, f, depth+1); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// method is one method of an interface's method set.
type method struct {
	iface           *node // declaring interface
	id              int
	name            string // Go method name
	schemaName      string
	goName          string // the renamed name, as in Foo_<goName>_Params
	params, results *node
	skip            string // why no stub is generated, if set
}

// prefix is the Go name prefix of the method's generated declarations.
func (m method) prefix() string { return m.iface.name + "_" + m.goName }

// methodSet lists n's methods, then its superclasses' (depth first, each
// interface once), as capnpc-go orders them.
func (g *generator) methodSet(n *node, seen map[uint64]bool, out []method) ([]method, error) {
	if seen[n.Id()] {
		return out, nil
	}
	seen[n.Id()] = true
	ms, err := n.Interface().Methods()
	if err != nil {
		return nil, fmt.Errorf("%s: methods: %w", n.displayName(), err)
	}
	for i := 0; i < ms.Len(); i++ {
		m := ms.At(i)
		sname, _ := m.Name()
		gname := rename(readAnnotations(m.Annotations()), sname)
		me := method{iface: n, id: i, name: title(gname), schemaName: sname, goName: gname}
		me.params, me.results = g.nodes[m.ParamStructType()], g.nodes[m.ResultStructType()]
		switch {
		case me.params == nil || me.results == nil:
			return nil, fmt.Errorf("%s.%s: parameter or result type not in the request", n.displayName(), sname)
		case n.IsGeneric():
			me.skip = "its interface is generic"
		case m.HasImplicitParameters():
			if ip, _ := m.ImplicitParameters(); ip.Len() > 0 {
				me.skip = "it is a generic method"
			}
		}
		if me.skip == "" && (me.params.IsGeneric() || me.results.IsGeneric()) {
			me.skip = "its parameters or results are generic"
		}
		if me.skip == "" && (me.params.Which() != schema.Node_Which_structNode || me.results.Which() != schema.Node_Which_structNode) {
			return nil, fmt.Errorf("%s.%s: parameters or results are not structs", n.displayName(), sname)
		}
		out = append(out, me)
	}
	supers, err := n.Interface().Superclasses()
	if err != nil {
		return nil, fmt.Errorf("%s: superclasses: %w", n.displayName(), err)
	}
	for i := 0; i < supers.Len(); i++ {
		s := g.nodes[supers.At(i).Id()]
		if s == nil || s.Which() != schema.Node_Which_interface {
			return nil, fmt.Errorf("%s: superclass %#x not in the request", n.displayName(), supers.At(i).Id())
		}
		if out, err = g.methodSet(s, seen, out); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// fileGen writes one file.
type fileGen struct {
	g       *generator
	file    *node
	buf     bytes.Buffer
	imports map[string]string // path → package name
}

func (w *fileGen) p(format string, args ...any) { fmt.Fprintf(&w.buf, format, args...) }

func (w *fileGen) use(path, name string) string {
	w.imports[path] = name
	return name
}

// local reports whether n's schema file is in the same Go package as
// the file being generated: its captp stubs are then in the package
// being generated too.
func (w *fileGen) local(n *node) bool {
	return n.file == w.file || (n.file != nil && n.file.imp != "" && n.file.imp == w.file.imp)
}

// typeName is the Go name of a capnpc-go declaration (a type, or with
// suffix "_TypeID" its ID), qualified when it is in another package.
func (w *fileGen) typeName(n *node) (string, error) {
	if n.file == nil {
		return "", fmt.Errorf("type %#x has no file", n.Id())
	}
	if w.g.opts.pkg == "" && w.local(n) {
		return n.name, nil
	}
	if n.file.imp == "" || n.file.pkg == "" {
		return "", fmt.Errorf("%s: its file has no $Go.import or $Go.package", n.displayName())
	}
	return w.use(n.file.imp, n.file.pkg) + "." + n.name, nil
}

func objectSize(n *node) string {
	s := n.StructNode()
	return fmt.Sprintf("capnp.ObjectSize{DataSize: %d, PointerCount: %d}", uint32(s.DataWordCount())*8, s.PointerCount())
}

// resultField is a field of a method's results the stubs give a name.
type resultField struct {
	name  string // capnpc-go accessor name
	ptr   uint32 // pointer index
	iface *node  // capability fields: the interface
	data  bool   // Data fields outside unions
}

func (w *fileGen) resultFields(results *node) ([]resultField, error) {
	fields, err := results.StructNode().Fields()
	if err != nil {
		return nil, fmt.Errorf("%s: fields: %w", results.displayName(), err)
	}
	var out []resultField
	for i := 0; i < fields.Len(); i++ {
		f := fields.At(i)
		if f.Which() != schema.Field_Which_slot {
			continue
		}
		t, err := f.Slot().Type()
		if err != nil {
			return nil, fmt.Errorf("%s: field type: %w", results.displayName(), err)
		}
		fname, _ := f.Name()
		name := rename(readAnnotations(f.Annotations()), fname)
		if name == fname && renameIdents[title(fname)] {
			name = fname + "_"
		}
		rf := resultField{name: title(name), ptr: f.Slot().Offset()}
		switch t.Which() {
		case schema.Type_Which_interface:
			in := w.g.nodes[t.Interface().TypeId()]
			if in == nil || in.IsGeneric() || !w.local(in) {
				continue
			}
			rf.iface = in
		case schema.Type_Which_data:
			if f.DiscriminantValue() != noDiscriminant {
				continue
			}
			rf.data = true
		default:
			continue
		}
		out = append(out, rf)
	}
	return out, nil
}

func (g *generator) generateFile(f *node) ([]byte, bool, error) {
	w := &fileGen{g: g, file: f, imports: make(map[string]string)}
	var ifaces []*node
	for _, n := range f.nodes {
		if n.Which() == schema.Node_Which_interface {
			ifaces = append(ifaces, n)
		}
	}
	if len(ifaces) == 0 {
		return nil, false, nil
	}
	if f.pkg == "" {
		return nil, false, errors.New("missing $Go.package annotation")
	}
	if g.opts.pkg != "" && f.imp == "" {
		return nil, false, errors.New("missing $Go.import annotation (needed with -package)")
	}
	for _, n := range ifaces {
		if n.IsGeneric() {
			w.p("\n// %s (%s) is generic: capnpc-captp writes no native stubs for generic\n// interfaces; use capnpc-go's generated client and server.\n", n.name, n.displayName())
			continue
		}
		if err := w.iface(n); err != nil {
			return nil, false, err
		}
	}
	var src bytes.Buffer
	pkg := f.pkg
	if g.opts.pkg != "" {
		pkg = g.opts.pkg
	}
	fmt.Fprintf(&src, "// Code generated by capnpc-captp from %s. DO NOT EDIT.\n\npackage %s\n\nimport (\n", strings.TrimPrefix(f.displayName(), "/"), pkg)
	paths := make([]string, 0, len(w.imports))
	for p := range w.imports {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	// The standard library first, then the rest, as goimports groups them.
	for _, std := range []bool{true, false} {
		if !std {
			src.WriteString("\n")
		}
		for _, p := range paths {
			if isStd(p) != std {
				continue
			}
			name := w.imports[p]
			if strings.HasSuffix("/"+p, "/"+name) {
				fmt.Fprintf(&src, "\t%q\n", p)
			} else {
				fmt.Fprintf(&src, "\t%s %q\n", name, p)
			}
		}
	}
	src.WriteString(")\n")
	src.Write(w.buf.Bytes())
	out, err := format.Source(src.Bytes())
	if err != nil {
		return nil, false, fmt.Errorf("formatting the generated code: %w", err)
	}
	return out, true, nil
}

// isStd reports whether an import path is the standard library's.
func isStd(path string) bool {
	first, _, _ := strings.Cut(path, "/")
	return !strings.Contains(first, ".")
}

// iface writes the stubs of one interface.
func (w *fileGen) iface(n *node) error {
	all, err := w.g.methodSet(n, make(map[uint64]bool), nil)
	if err != nil {
		return err
	}
	w.use("context", "context")
	w.use("capnproto.org/go/capnp/v3", "capnp")
	w.use(corePath, "core")
	N := n.name
	typeN, err := w.typeName(n)
	if err != nil {
		return err
	}
	var own, served []method
	// The client's own methods take their names first.
	seen := map[string]string{"AddRef": "Foo_Native.AddRef", "Release": "Foo_Native.Release"}
	for _, m := range all {
		switch {
		case m.skip != "":
		case !w.local(m.iface):
			m.skip = "its interface " + m.iface.displayName() + " is in another Go package"
		case seen[m.name] != "":
			m.skip = "its Go name " + m.name + " is taken by " + strings.Replace(seen[m.name], "Foo", N, 1)
		}
		if m.skip != "" {
			w.p("\n// %s.%s has no native stub: %s. The server answers it as unimplemented.\n", m.iface.displayName(), m.schemaName, m.skip)
			continue
		}
		seen[m.name] = m.iface.displayName() + "." + m.schemaName
		served = append(served, m)
		if m.iface == n {
			own = append(own, m)
		}
	}

	// Method identities.
	if len(own) > 0 {
		w.p("\n// Ordinals of %s's methods (capnp.Method.MethodID).\nconst (\n", n.displayName())
		for _, m := range own {
			w.p("\t%s_MethodID = %d\n", m.prefix(), m.id)
		}
		w.p(")\n\n// capnp.Method values of %s's methods, as capnpc-go fills them.\nvar (\n", n.displayName())
		for _, m := range own {
			w.p("\t%s_Method = capnp.Method{InterfaceID: %s_TypeID, MethodID: %s_MethodID, InterfaceName: %q, MethodName: %q}\n",
				m.prefix(), typeN, m.prefix(), n.displayName(), m.schemaName)
		}
		w.p(")\n")
	}

	// Client.
	w.p(`
// %[1]s_Native calls %[2]s through captp's native call path: core.Call
// sends each call with no go-capnp Promise, and the pending call is the
// question itself. Superclass methods are included. Client may be any
// capability (a captp import, a promised result, a local object); the
// zero value's calls fail.
type %[1]s_Native struct{ Client capnp.Client }

// AddRef returns a new reference to the same capability.
func (c %[1]s_Native) AddRef() %[1]s_Native { return %[1]s_Native{Client: c.Client.AddRef()} }

// Release releases the reference.
func (c %[1]s_Native) Release() { c.Client.Release() }
`, N, n.displayName())
	for _, m := range served {
		params, err := w.typeName(m.params)
		if err != nil {
			return err
		}
		unsafeName := w.use("unsafe", "unsafe")
		w.p(`
// %[2]s calls %[3]s.%[4]s. params fills the arguments (nil sends them
// empty); it runs before %[2]s returns and must not block. Large Data
// arguments go out without a copy when ctx carries them
// (core.WithDataReference). Release the pending call when done.
func (c %[1]s_Native) %[2]s(ctx context.Context, params func(%[5]s) error) %[6]s_NativeCall {
	s := capnp.Send{Method: %[6]s_Method}
	if params != nil {
		s.ArgsSize = %[7]s
		// %[5]s is a capnp.Struct underneath (the conversion
		// checks it), so params serves as a func(capnp.Struct) error
		// as it is: a wrapper closure would allocate per call.
		_ = capnp.Struct(%[5]s{})
		s.PlaceArgs = *(*func(capnp.Struct) error)(%[8]s.Pointer(&params))
	}
	return %[6]s_NativeCall{PendingCall: core.Call(ctx, c.Client, s)}
}
`, N, m.name, m.iface.displayName(), m.schemaName, params, m.prefix(), objectSize(m.params), unsafeName)
	}

	// Pending calls and server calls of the interface's own methods.
	for _, m := range own {
		if err := w.methodTypes(m); err != nil {
			return err
		}
	}

	// Server.
	w.p(`
// %[1]s_NativeServer is a native %[2]s object: one method per schema
// method, superclass methods included. Calls to one object arrive one at
// a time, in order, on the goroutine that delivered them (for a captp
// connection, its read loop): a method must not block; it finishes with
// call.Return, or hands the rest of the call to call.Go. Returning
// without Return returns the results so far. An implementation with a
// Shutdown() method hears when the last reference is gone.
type %[1]s_NativeServer interface {
`, N, n.displayName())
	for _, m := range served {
		w.p("\t// %s serves %s.%s.\n\t%s(ctx context.Context, call %s_NativeServerCall)\n", m.name, m.iface.displayName(), m.schemaName, m.name, m.prefix())
	}
	excName := w.use("capnproto.org/go/capnp/v3/exc", "exc")
	fmtName := w.use("fmt", "fmt")
	w.p(`}

// %[1]s_NativeServerToClient returns a capability served by s through
// core.NewClient. Methods of %[2]s and its superclasses reach s; any
// other method is answered with an unimplemented exception. S is
// usually a pointer type: the handler is then pointer-shaped and wrapping
// it allocates nothing of its own.
func %[1]s_NativeServerToClient[S %[1]s_NativeServer](s S) capnp.Client {
	return core.NewClient(nativeHandler_%[1]s[S]{s: s})
}

// nativeHandler_%[1]s is the core.Handler of a %[1]s_NativeServer.
type nativeHandler_%[1]s[S %[1]s_NativeServer] struct{ s S }

// HandleCall dispatches a call on its interface and method IDs.
func (h nativeHandler_%[1]s[S]) HandleCall(ctx context.Context, call *core.ServerCall) {
	m := call.Method()
	switch m.InterfaceID {
`, N, n.displayName())
	var order []*node
	byIface := make(map[*node][]method)
	for _, m := range served {
		if byIface[m.iface] == nil {
			order = append(order, m.iface)
		}
		byIface[m.iface] = append(byIface[m.iface], m)
	}
	for _, in := range order {
		t, err := w.typeName(in)
		if err != nil {
			return err
		}
		w.p("\tcase %s_TypeID:\n\t\tswitch m.MethodID {\n", t)
		for _, m := range byIface[in] {
			w.p("\t\tcase %d:\n\t\t\th.s.%s(ctx, %s_NativeServerCall{ServerCall: call})\n\t\t\treturn\n", m.id, m.name, m.prefix())
		}
		w.p("\t\t}\n")
	}
	w.p(`	}
	call.Return(%[2]s.New(%[2]s.Unimplemented, "", %[3]s.Sprintf("%[4]s native server: method %%#x.%%d not implemented", m.InterfaceID, m.MethodID)))
}

// Shutdown tells the server, if it has a Shutdown method, that the last
// reference is gone.
func (h nativeHandler_%[1]s[S]) Shutdown() {
	if s, ok := any(h.s).(interface{ Shutdown() }); ok {
		s.Shutdown()
	}
}
`, N, excName, fmtName, n.displayName())
	return nil
}

// methodTypes writes the pending call and server call types of m.
func (w *fileGen) methodTypes(m method) error {
	params, err := w.typeName(m.params)
	if err != nil {
		return err
	}
	results, err := w.typeName(m.results)
	if err != nil {
		return err
	}
	fields, err := w.resultFields(m.results)
	if err != nil {
		return err
	}
	P, full := m.prefix(), m.iface.displayName()+"."+m.schemaName
	w.p(`
// %[1]s_NativeCall is a pending %[2]s call. It embeds core.PendingCall
// (Wait, Done, Err, Pipeline, Release); release it once the results are
// no longer needed.
type %[1]s_NativeCall struct{ core.PendingCall }

// Struct waits for the call to return (or ctx to end) and returns its
// results, valid until Release.
func (c %[1]s_NativeCall) Struct(ctx context.Context) (%[3]s, error) {
	s, err := c.Wait(ctx)
	return %[3]s(s), err
}
`, P, full, results)
	for _, f := range fields {
		if f.iface == nil {
			continue
		}
		acc := f.name
		if pendingMethods[acc] {
			acc += "_"
		}
		w.p(`
// %[2]s returns the capability the call will return in %[2]s, usable
// before it returns (promise pipelining). Release it when done.
func (c %[1]s_NativeCall) %[3]s() %[4]s_Native {
	return %[4]s_Native{Client: c.Pipeline(%[5]d)}
}
`, P, f.name, acc, f.iface.name, f.ptr)
	}
	w.p(`
// %[1]s_NativeServerCall is a %[2]s call being served. It embeds
// *core.ServerCall (Return, Method, the untyped Results); its methods
// must be called before Return, from the server method or from the
// function given to Go.
type %[1]s_NativeServerCall struct{ *core.ServerCall }

// Args returns the call's parameters, valid until Return.
func (c %[1]s_NativeServerCall) Args() %[3]s { return %[3]s(c.ServerCall.Args()) }

// Results allocates the call's results.
func (c %[1]s_NativeServerCall) Results() (%[4]s, error) {
	s, err := c.ServerCall.Results(%[5]s)
	return %[4]s(s), err
}

// Go finishes the call on a goroutine of its own: fn runs there and the
// call returns fn's error. Later calls to the object wait for it (see
// core.ServerCall.Go).
func (c %[1]s_NativeServerCall) Go(fn func(ctx context.Context, call %[1]s_NativeServerCall) error) {
	c.ServerCall.Go(func(ctx context.Context, sc *core.ServerCall) error {
		return fn(ctx, %[1]s_NativeServerCall{ServerCall: sc})
	})
}
`, P, full, params, results, objectSize(m.results))
	for _, f := range fields {
		if !f.data {
			continue
		}
		w.p(`
// ResultsReferencing%[2]s allocates the results with %[2]s set to data,
// a slice of the call's arguments: over a captp connection large data
// goes out from the arguments' buffer without a copy (see
// core.ServerCall.ResultsReferencing).
func (c %[1]s_NativeServerCall) ResultsReferencing%[2]s(data []byte) (%[3]s, error) {
	s, err := c.ServerCall.ResultsReferencing(%[4]s, %[5]d, data)
	return %[3]s(s), err
}
`, P, f.name, results, objectSize(m.results), f.ptr)
	}
	return nil
}
