// Package capnptext is the schema engine behind `captp call`: it loads
// Cap'n Proto schemas at run time, resolves "Interface.method" names,
// encodes parameters written in Cap'n Proto text form, prints results in
// the same form, and plans pipelined call chains such as
// `Dir.getFile(name = "a").size()`.
//
// # Schemas
//
// Load runs `capnp compile -o-` (the Debian package capnproto) on .capnp
// files; Parse takes an already compiled CodeGeneratorRequest, for embedded
// schemas and tests. The resulting Schema indexes nodes by id and by display
// name ("file.capnp:Foo.Bar" or the short "Foo.Bar"), and interfaces with
// their own and inherited methods. Resolve maps "Interface.method" (or an
// unambiguous bare "method") to a Method: interface id, ordinal, parameter
// and result struct nodes.
//
// # Text form
//
// The text form is the one `capnp encode` reads and `capnp decode --short`
// writes: `(a = 1, t = "x\n", d = 0x"0a0b", e = red, l = [1, 2],
// s = (x = 1.5), u = (member = void))`. Format prints exactly what
// `capnp decode --short` prints for the same message (the tests compare
// the two when the compiler is installed). Capabilities print as
// <capability> (capnp decode cannot read them at all), and a Float32 that
// capnp's 8 digits would not reproduce exactly gets 9, so printing is
// lossless. Encode (and ParseLiteral plus Literal.Encode) reads that form;
// it differs from `capnp encode` in rejecting what capnp accepts silently
// (two members of one union, a Float32 literal beyond its range), in
// reading "-0" as a negative zero for floats (capnp prints -0.0 as "-0"),
// and in accepting an empty 0x"".
//
// # Sketch: captp call
//
//	sch, err := capnptext.Load(ctx, nil, "fs.capnp")
//	steps, err := sch.Chain("Dir.getFile", `(name = "a")`, ".size()")
//	// or: steps, err := sch.ParseChain(`Dir.getFile(name = "a").size()`)
//	if err := capnptext.CheckSteps(steps); err != nil { … } // before dialling
//	res, release, err := capnptext.Invoke(ctx, bootstrapClient, steps)
//	defer release()
//	out, err := capnptext.Format(res, steps[len(steps)-1].Method.Results)
//
// Invoke sends every call before awaiting any result: step i+1 goes to
// answer(i).Future().Field(op.Field, …)… .Client() for each op of its
// Transform. A caller that drives go-capnp itself uses Step.Send (or
// Method.CapnpMethod, Node.ObjectSize and Step.PlaceArgs) for each call.
//
// Nothing here panics on bad input: text errors are *TextError values
// with line and column, malformed messages and schemas give errors.
package capnptext
