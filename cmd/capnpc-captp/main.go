// Command capnpc-captp is a Cap'n Proto compiler plugin that writes
// native stubs for captp's native call path (core.Call, core.Handler):
// typed clients and servers that bypass go-capnp's Client.SendCall,
// Promise and server.Server.
//
// It runs next to capnpc-go, into the same directory, and reuses the
// struct types capnpc-go generates for parameters and results, so both
// outputs form one Go package:
//
//	capnp compile -I "$(go list -m -f '{{.Dir}}' capnproto.org/go/capnp/v3)/std" \
//		-o capnpc-go:OUTDIR -o capnpc-captp:OUTDIR --src-prefix=DIR DIR/file.capnp
//
// For DIR/file.capnp it writes OUTDIR/file.captp.go when the file
// declares an interface. For each interface Foo (named as capnpc-go
// names it) and method m:
//
//   - Foo_m_Method: the capnp.Method of m (interface ID Foo_TypeID, method
//     ordinal, names as capnpc-go spells them).
//   - Foo_Native: the client, a capnp.Client with one method per schema
//     method, superclass methods included: Foo_Native.M(ctx, params)
//     sends with core.Call and returns a Foo_m_NativeCall, which embeds
//     core.PendingCall (Wait, Done, Release, Pipeline, Err) and adds
//     Struct(ctx) (typed results) and, for each capability-typed result
//     field f, F() returning the promised capability as its _Native client
//     (pipelining). Struct-typed result fields are not pipelined by
//     name; PendingCall.Pipeline(ptrIndex, ...) reaches into them.
//   - Foo_NativeServer: the interface a native object implements, one
//     method per schema method (superclasses' included), each given a
//     Foo_m_NativeServerCall: Args() and Results() typed with the right
//     struct size, ResultsReferencingF(data) for each Data result field F
//     (the bytes go out without a copy, see core.ServerCall), Go and
//     Return.
//   - Foo_NativeServerToClient(s): the capability served by s through
//     core.NewClient; its handler dispatches Foo's and its superclasses'
//     methods and answers any other method with an unimplemented
//     exception. A server with a Shutdown() method hears when the last
//     reference is gone.
//
// A schema package that captp's core itself imports (for example one
// core's own tests use) cannot hold stubs that import core. For it,
// capnpc-captp writes the stubs into another package: pipe the request
// in and name the package,
//
//	capnp compile -I STD -o- --src-prefix=DIR DIR/file.capnp |
//		capnpc-captp -package NAME -out NAMEDIR
//
// which writes NAMEDIR/file.captp.go naming capnpc-go's types through
// the schema's $Go.import path (internal/testnative is made this way).
//
// Limits: generic interfaces (and interfaces nested in generic scopes)
// and methods whose parameters or results are generic get no stubs; the
// generated file says so in a comment, and the server answers such
// methods as unimplemented. Superclasses are supported when their
// schema file is compiled with capnpc-captp too (same Go package or the
// one its $Go.import names).
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

func main() {
	var opts options
	flag.StringVar(&opts.pkg, "package", "", "write the stubs in a Go package of this `name` (not the schema's), naming capnpc-go's types through the schema's $Go.import; used with capnp compile -o-")
	out := flag.String("out", ".", "output `directory`")
	flag.Parse()
	if err := run(os.Stdin, *out, opts); err != nil {
		fmt.Fprintln(os.Stderr, "capnpc-captp:", err)
		os.Exit(1)
	}
}

// run reads a CodeGeneratorRequest from r and writes the generated files
// under dir.
func run(r io.Reader, dir string, opts options) error {
	files, err := generateFromReader(r, opts)
	if err != nil {
		return err
	}
	for _, f := range files {
		path := filepath.Join(dir, filepath.FromSlash(f.Name))
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			return fmt.Errorf("writing %s: %w", f.Name, err)
		}
		if err := os.WriteFile(path, f.Content, 0o644); err != nil {
			return fmt.Errorf("writing %s: %w", f.Name, err)
		}
	}
	return nil
}
