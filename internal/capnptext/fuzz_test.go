package capnptext

import (
	"bytes"
	"testing"

	"capnproto.org/go/capnp/v3"
)

// FuzzParseLiteral feeds arbitrary text to the parser and encoder: they may
// only return errors, never panic, and whatever encodes must print, and
// re-encode from its printed form to the same message (in canonical form).
// Seeds: testdata/fuzz/FuzzParseLiteral and allCases.
func FuzzParseLiteral(f *testing.F) {
	for _, c := range allCases {
		f.Add(c)
	}
	for _, c := range defaultsCases {
		f.Add(c)
	}
	s := testSchema(f)
	types := []*Node{lookup(f, s, "All"), lookup(f, s, "Defaults"), lookup(f, s, "Outer"), lookup(f, s, "HasCaps")}
	f.Fuzz(func(t *testing.T, text string) {
		if len(text) > 1<<14 {
			return
		}
		lit, err := ParseLiteral(text)
		if err != nil {
			if _, ok := err.(*TextError); !ok {
				t.Fatalf("ParseLiteral error %v is %T, not *TextError", err, err)
			}
			return
		}
		for _, n := range types {
			st, err := lit.EncodeNew(n)
			if err != nil {
				continue
			}
			out, err := Format(st, n)
			if err != nil {
				t.Fatalf("Format(%s) after encoding %q: %v", n.ShortName, text, err)
			}
			st2, err := EncodeNew(n, out)
			if err != nil {
				t.Fatalf("re-encoding %s's printed form %q (from %q): %v", n.ShortName, out, text, err)
			}
			c1, err1 := capnp.Canonicalize(st)
			c2, err2 := capnp.Canonicalize(st2)
			if err1 != nil || err2 != nil || !bytes.Equal(c1, c2) {
				t.Fatalf("round trip of %q through %q changed the %s message (%v, %v)", text, out, n.ShortName, err1, err2)
			}
			if out2, err := Format(st2, n); err != nil || out2 != out {
				t.Fatalf("printing is not stable: %q then %q (%v)", out, out2, err)
			}
		}
	})
}

// FuzzFormat feeds arbitrary messages to Format: malformed messages give
// errors, never panics. Seeds: testdata/fuzz/FuzzFormat (messages
// `capnp encode` made from allCases).
func FuzzFormat(f *testing.F) {
	s := testSchema(f)
	types := []*Node{lookup(f, s, "All"), lookup(f, s, "Defaults"), lookup(f, s, "Outer"), lookup(f, s, "HasCaps"), lookup(f, s, "Info")}
	for _, c := range allCases[:4] {
		st, err := EncodeNew(types[0], c)
		if err != nil {
			f.Fatal(err)
		}
		b, err := st.Message().Marshal()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		msg, err := capnp.Unmarshal(data)
		if err != nil {
			return
		}
		msg.TraverseLimit = 1 << 20
		root, err := msg.Root()
		if err != nil {
			return
		}
		for _, n := range types {
			_, _ = Format(root.Struct(), n)
			_, _ = FormatOptions{PointerDefaults: true}.Format(root.Struct(), n)
		}
	})
}

// FuzzParseChain feeds arbitrary call chains to ParseChain and CheckSteps:
// errors only, never panics; every step of a parsed chain has a target
// interface that has its method.
// Seeds: testdata/fuzz/FuzzParseChain.
func FuzzParseChain(f *testing.F) {
	s := testSchema(f)
	f.Add(`Dir.stat(name = "x").info.file.read(offset = 1, n = 2)`)
	f.Add(`Store.getFile(name = "a").size.ping()`)
	f.Fuzz(func(t *testing.T, expr string) {
		if len(expr) > 1<<12 {
			return
		}
		steps, err := s.ParseChain(expr)
		if err != nil {
			return
		}
		for i, st := range steps {
			if st.Target == nil || st.Target.Interface == nil || st.Method == nil {
				t.Fatalf("%q: step %d has no target or method", expr, i)
			}
			if m, err := st.Target.Method(st.Method.Name); err != nil || m != st.Method {
				t.Fatalf("%q: step %d: %s is not callable on %s", expr, i, st.Method, st.Target)
			}
			if (i == 0) != (len(st.Transform) == 0) {
				t.Fatalf("%q: step %d has transform %v", expr, i, st.Transform)
			}
		}
		_ = CheckSteps(steps)
	})
}
