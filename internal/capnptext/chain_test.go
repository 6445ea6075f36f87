package capnptext

import (
	"context"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/server"
)

func TestChain(t *testing.T) {
	s := testSchema(t)
	dir, file, store := lookup(t, s, "Dir"), lookup(t, s, "File"), lookup(t, s, "Store")
	type want struct {
		target    *Node
		method    string
		transform []capnp.PipelineOp
		path      []string
	}
	// Pointer indexes from the layout rules: getFile$Results.file is
	// pointer 0; stat$Results.info is 0 and Info.file is 1; both$Results
	// has a at 0 and b at 1; sub$Results has dir at 0.
	for _, tc := range []struct {
		method, params, path string
		steps                []want
	}{
		{"Dir.getFile", `(name = "a")`, ".size()", []want{
			{dir, "getFile", nil, nil},
			{file, "size", []capnp.PipelineOp{{Field: 0}}, []string{"file"}},
		}},
		{"Dir.stat", `(name = "x")`, ".info.file.read(offset = 1, n = 2)", []want{
			{dir, "stat", nil, nil},
			{file, "read", []capnp.PipelineOp{{Field: 0}, {Field: 1}}, []string{"info", "file"}},
		}},
		{"Dir.both", ``, ".b.size()", []want{
			{dir, "both", nil, nil},
			{file, "size", []capnp.PipelineOp{{Field: 1}}, []string{"b"}},
		}},
		{"Dir.sub", `(name = "d")`, ".list()", []want{
			{dir, "sub", nil, nil},
			{dir, "list", []capnp.PipelineOp{{Field: 0}}, []string{"dir"}},
		}},
		{"Dir.sub", `(name = "d")`, ".sub(name = \"e\").getFile(name = \"f\").ping()", []want{
			{dir, "sub", nil, nil},
			{dir, "sub", []capnp.PipelineOp{{Field: 0}}, []string{"dir"}},
			{dir, "getFile", []capnp.PipelineOp{{Field: 0}}, []string{"dir"}},
			{file, "ping", []capnp.PipelineOp{{Field: 0}}, []string{"file"}},
		}},
		{"Dir.mixed", ``, ".read()", []want{
			{dir, "mixed", nil, nil},
			{file, "read", []capnp.PipelineOp{{Field: 1}}, []string{"file"}},
		}},
		// Holder.g.f is pointer 1 of Holder; groups add no op.
		{"Dir.hold", ``, ".h.size()", []want{
			{dir, "hold", nil, nil},
			{file, "size", []capnp.PipelineOp{{Field: 0}, {Field: 1}}, []string{"h", "g", "f"}},
		}},
		{"Dir.hold", ``, ".h.g.f.size()", []want{
			{dir, "hold", nil, nil},
			{file, "size", []capnp.PipelineOp{{Field: 0}, {Field: 1}}, []string{"h", "g", "f"}},
		}},
		// Parentheses are optional for calls without parameters.
		{"Dir.getFile", ``, ".size", []want{
			{dir, "getFile", nil, nil},
			{file, "size", []capnp.PipelineOp{{Field: 0}}, []string{"file"}},
		}},
		{"Dir.stat", ``, ".info.file.ping", []want{
			{dir, "stat", nil, nil},
			{file, "ping", []capnp.PipelineOp{{Field: 0}, {Field: 1}}, []string{"info", "file"}},
		}},
		// The first step's target is the interface named, which inherits
		// the method.
		{"Store.getFile", ``, "", []want{{store, "getFile", nil, nil}}},
		{"getFile", ``, "  ", []want{{dir, "getFile", nil, nil}}},
	} {
		steps, err := s.Chain(tc.method, tc.params, tc.path)
		if err != nil {
			t.Errorf("Chain(%s, %s, %s): %v", tc.method, tc.params, tc.path, err)
			continue
		}
		if len(steps) != len(tc.steps) {
			t.Errorf("Chain(%s, %s): %d steps, want %d", tc.method, tc.path, len(steps), len(tc.steps))
			continue
		}
		for i, w := range tc.steps {
			st := steps[i]
			if st.Target != w.target || st.Method.Name != w.method || !reflect.DeepEqual(st.Transform, w.transform) || !reflect.DeepEqual(st.FieldPath, w.path) {
				t.Errorf("Chain(%s, %s) step %d = %s %s %v %v, want %s %s %v %v", tc.method, tc.path, i,
					st.Target.ShortName, st.Method.Name, st.Transform, st.FieldPath, w.target.ShortName, w.method, w.transform, w.path)
			}
		}
		if err := CheckSteps(steps); err != nil {
			t.Errorf("CheckSteps(%s %s): %v", tc.method, tc.path, err)
		}
	}
	// The one-string form gives the same steps.
	one, err := s.ParseChain(`Dir.stat(name = "x").info.file.read(offset = 1, n = 2)`)
	if err != nil {
		t.Fatal(err)
	}
	three, err := s.Chain("Dir.stat", `(name = "x")`, ".info.file.read(offset = 1, n = 2)")
	if err != nil {
		t.Fatal(err)
	}
	if len(one) != 2 || !reflect.DeepEqual(one[1].Transform, three[1].Transform) || one[1].Method != three[1].Method {
		t.Errorf("ParseChain and Chain disagree: %v / %v", one, three)
	}
	if st, err := s.ParseChain("File.size"); err != nil || len(st) != 1 || st[0].Method.Name != "size" {
		t.Errorf("ParseChain(File.size) = %v, %v", st, err)
	}
	if got := one[1].String(); got != ".info.file.read(…)" {
		t.Errorf("Step.String() = %q", got)
	}
}

func TestChainErrors(t *testing.T) {
	s := testSchema(t)
	for _, tc := range []struct{ method, params, path, want string }{
		{"Dir.both", ``, ".size()", "holds several capabilities (a, b); select one, e.g. .a.size()"},
		{"Dir.list", ``, ".size()", "cannot call size: Dir.list$Results holds no capability"},
		{"Dir.stat", ``, ".info", "the path ends in field info; end it with a method call"},
		{"Dir.stat", ``, ".info.name.x()", "field name is Text; a path can only go through struct, group and capability fields"},
		{"Dir.stat", ``, ".nope.x()", `1:2: Dir.stat$Results has no field "nope" (fields: info), nor is it a method to call: cannot call nope: Dir.stat$Results holds no capability`},
		{"Dir.getFile", ``, ".nope()", `1:2: interface File has no method "nope"; it has: size, read, ping`},
		{"Dir.getFile", ``, ".file.size.read()", "cannot call read: File.size$Results holds no capability"},
		{"Dir.getFile", ``, ".nope", `getFile$Results has no field "nope" (fields: file), nor is it a method to call: interface File has no method "nope"; it has: size, read, ping`},
		{"Dir.getFile", ``, `.size(x = `, "1:11: expected a value, found end of text"},
		{"Dir.getFile", ``, `size()`, `expected "."`},
		{"Dir.getFile", `(name = `, ``, "params: 1:9: expected a value"},
		{"Dir.nope", ``, ``, `interface Dir has no method "nope"`},
		{"Dir.getFile", ``, `.size().x().y()`, `cannot call x`},
		{"Dir.getFile", ``, `.size(1)`, `expected a parameter struct literal`},
	} {
		_, err := s.Chain(tc.method, tc.params, tc.path)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Chain(%s, %s, %s) error = %v, want it to contain %q", tc.method, tc.params, tc.path, err, tc.want)
		}
	}
	if _, err := s.ParseChain(`Dir.getFile(name = "a").size(`); err == nil || !strings.Contains(err.Error(), "1:30") {
		t.Errorf("ParseChain with a syntax error: %v", err)
	}
	// Parameters are checked against the schema by CheckSteps (and when
	// sent), not by Chain.
	steps, err := s.Chain("Dir.getFile", `(name = 5)`, ".read(offset = -1)")
	if err != nil {
		t.Fatal(err)
	}
	if err := CheckSteps(steps); err == nil || !strings.Contains(err.Error(), "step 1 (Dir.getFile): 1:9: field name: Text takes a string") {
		t.Errorf("CheckSteps: %v", err)
	}
	steps[0].Params, _ = ParseLiteral(`(name = "ok")`)
	if err := CheckSteps(steps); err == nil || !strings.Contains(err.Error(), "step 2 (File.read): 1:16: field offset: -1 is out of range for UInt64") {
		t.Errorf("CheckSteps: %v", err)
	}
}

// A small in-process Dir/File service over go-capnp's server package: it
// reads parameters and writes results with go-capnp directly, so it checks
// the encoder and the chain independently of Format.
type testFS struct {
	s        *Schema
	getFiles chan string
}

func (fs *testFS) method(t *testing.T, name string, impl func(context.Context, *server.Call) error) server.Method {
	m, err := fs.s.Resolve(name)
	if err != nil {
		t.Fatal(err)
	}
	return server.Method{Method: m.CapnpMethod(), Impl: impl}
}

func (fs *testFS) file(t *testing.T, content string) capnp.Client {
	return capnp.NewClient(server.New([]server.Method{
		fs.method(t, "File.size", func(_ context.Context, c *server.Call) error {
			res, err := c.AllocResults(capnp.ObjectSize{DataSize: 8})
			if err != nil {
				return err
			}
			res.SetUint64(0, uint64(len(content)))
			return nil
		}),
		fs.method(t, "File.read", func(_ context.Context, c *server.Call) error {
			off, n := c.Args().Uint64(0), uint64(c.Args().Uint32(8))
			if off > uint64(len(content)) {
				off = uint64(len(content))
			}
			end := min(off+n, uint64(len(content)))
			res, err := c.AllocResults(capnp.ObjectSize{PointerCount: 1})
			if err != nil {
				return err
			}
			return res.SetData(0, []byte(content[off:end]))
		}),
	}, nil, nil))
}

func (fs *testFS) dir(t *testing.T) capnp.Client {
	setCap := func(res capnp.Struct, i uint16, c capnp.Client) error {
		id := res.Message().CapTable().Add(c)
		return res.SetPtr(i, capnp.NewInterface(res.Segment(), id).ToPtr())
	}
	return capnp.NewClient(server.New([]server.Method{
		fs.method(t, "Dir.getFile", func(_ context.Context, c *server.Call) error {
			p, err := c.Args().Ptr(0)
			if err != nil {
				return err
			}
			fs.getFiles <- p.Text()
			res, err := c.AllocResults(capnp.ObjectSize{PointerCount: 1})
			if err != nil {
				return err
			}
			return setCap(res, 0, fs.file(t, p.Text()))
		}),
		fs.method(t, "Dir.stat", func(_ context.Context, c *server.Call) error {
			p, err := c.Args().Ptr(0)
			if err != nil {
				return err
			}
			res, err := c.AllocResults(capnp.ObjectSize{PointerCount: 1})
			if err != nil {
				return err
			}
			info, err := capnp.NewStruct(res.Segment(), capnp.ObjectSize{PointerCount: 2})
			if err != nil {
				return err
			}
			if err := info.SetText(0, p.Text()); err != nil {
				return err
			}
			if err := setCap(info, 1, fs.file(t, p.Text()+"!")); err != nil {
				return err
			}
			return res.SetPtr(0, info.ToPtr())
		}),
	}, nil, nil))
}

func TestInvoke(t *testing.T) {
	s := testSchema(t)
	fs := &testFS{s: s, getFiles: make(chan string, 10)}
	dir := fs.dir(t)
	defer dir.Release()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, tc := range []struct{ chain, want string }{
		{`Dir.getFile(name = "hello").size()`, `(size = 5)`},
		{`Dir.getFile(name = "hello").read(offset = 1, n = 3)`, `(data = "ell")`},
		{`Dir.stat(name = "abc").info.file.read(n = 10)`, `(data = "abc!")`},
		{`Dir.stat(name = "abc")`, `(info = (name = "abc", file = <capability>))`},
		{`Dir.getFile(name = "x\ty")`, `(file = <capability>)`},
	} {
		steps, err := s.ParseChain(tc.chain)
		if err != nil {
			t.Fatal(err)
		}
		res, release, err := Invoke(ctx, dir, steps)
		if err != nil {
			t.Errorf("Invoke(%s): %v", tc.chain, err)
			continue
		}
		got, err := Format(res, steps[len(steps)-1].Method.Results)
		release()
		if err != nil || got != tc.want {
			t.Errorf("Invoke(%s) = %s, %v; want %s", tc.chain, got, err, tc.want)
		}
	}
	close(fs.getFiles)
	var names []string
	for n := range fs.getFiles {
		names = append(names, n)
	}
	if strings.Join(names, ",") != "hello,hello,x\ty" {
		t.Errorf("the server got getFile names %q", names)
	}
	// A call on an unimplemented method reports the method.
	steps, err := s.ParseChain(`Dir.list()`)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := Invoke(ctx, dir, steps); err == nil || !strings.Contains(err.Error(), "Dir.list") {
		t.Errorf("Invoke(Dir.list) on a server without it: %v", err)
	}
	// Bad parameters fail the call, not the process.
	steps, err = s.ParseChain(`Dir.getFile(name = 1).size()`)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := Invoke(ctx, dir, steps); err == nil || !strings.Contains(err.Error(), "Text takes a string") {
		t.Errorf("Invoke with bad params: %v", err)
	}
	if _, _, err := Invoke(ctx, dir, nil); err == nil {
		t.Error("Invoke with no steps succeeded")
	}
	var te *TextError
	if _, err := s.ParseChain(`Dir.getFile(name = ")`); !errors.As(err, &te) {
		t.Errorf("syntax error in a chain is %T, want *TextError", err)
	}
}
