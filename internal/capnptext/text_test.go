package capnptext

import (
	"bytes"
	"errors"
	"math"
	"strings"
	"testing"

	"capnproto.org/go/capnp/v3"
)

// allCases are values of the test schema's All struct, covering every type
// of the text form. Each must be accepted by `capnp encode` too.
var allCases = []string{
	`()`,
	`(v = void, b = true, i8 = -128, i16 = -32768, i32 = -2147483648, i64 = -9223372036854775808, u8 = 255, u16 = 65535, u32 = 4294967295, u64 = 18446744073709551615)`,
	`(i8 = 127, i16 = 32767, i32 = 2147483647, i64 = 9223372036854775807, u64 = 0xffffffffffffffff, u32 = 0x10, u16 = 0777)`,
	`(i32 = -0x10, i16 = -0, u8 = -0, f32 = -0.0)`,
	`(f32 = 1.1, f64 = 0.1)`,
	`(f32 = 3.4028235e38, f64 = -1.5e-300, lf = [0.1, -0.0, 5e-324, 1e308, 2.5, 1e15, 1e16, 123456.5, 0.0001, 0.00001, 123456789012345678], l32 = [1e-45, 0.3, 16777217, inf, nan, -inf, 100000, 1e-10])`,
	`(f64 = inf, f32 = -inf, lf = [nan])`,
	`(t = "a\nb\x00c\x7f\xc3\xa9", d = "\x00\x01ab\xff")`,
	`(t = "tab\there \"q\" back\\slash \'s\' \a\b\f\v\r\001\177 # not a comment")`,
	`(d = 0x"00 01 ff 7f", ld = ["abc", "", 0x"deadbeef"], lt = ["", "x", "multi\nline"])`,
	`(e = blue, le = [red, blue, green], inner = (a = -1, s = "n"))`,
	`(ls = [(a = 1, s = "x"), (), (s = "only")], ll = [[], [0], [1, 2, 255]], li8 = [-1, 127, -128], lu64 = [0, 18446744073709551615])`,
	`(lb = [true, false, true, true, false, false, false, false, true], lv = [void, void, void], li = [1, -2, 3])`,
	`(lt = [], lb = [], ls = [], ll = [[]], li = [])`,
	`(num = -9223372036854775808)`,
	`(text = "")`,
	`(text = "union text")`,
	`(grp = (x = -1, y = 2147483647))`,
	`(grp = ())`,
	`(none = void, g = (p = 65535, q = "q"))`,
	`(nu = (one = 255))`,
	`(nu = (two = (a = 3, s = "two")))`,
	`(nu = (two = ()))`,
	"(\n  i32 = 5, # a comment\n  t = \"x\"\n)",
}

var defaultsCases = []string{
	`()`,
	`(i = 0, b = false, f = 0, e = red, u = 0, n = 0, f32 = 0)`,
	`(i = 42, b = true, f = 1.5, e = blue, u = 18446744073709551615, n = -5, f32 = -0.25)`,
	`(i = -1, t = "", d = "", s = (), l = [])`,
	`(t = "dflt", s = (a = 7, s = "x"), l = [1, 2])`,
}

// TestFormatHandWritten checks Format on values whose capnp text form is
// written here by hand from the spec.
func TestFormatHandWritten(t *testing.T) {
	s := testSchema(t)
	for _, tc := range []struct{ typ, in, want string }{
		{"Inner", `()`, `(a = 0)`},
		{"Inner", `(s = "hello", a = 3)`, `(a = 3, s = "hello")`},
		{"Reordered", `(a = "x")`, `(a = "x", b = 0)`},
		{"Outer", `(n = (x = -3), ln = [(x = 1), ()])`, `(n = (x = -3), ln = [(x = 1), (x = 0)])`},
		{"Defaults", `()`, `(i = 42, b = true, f = 1.5, e = blue, u = 18446744073709551615, n = -5, f32 = -0.25)`},
		{"Defaults", `(i = 0, b = false, u = 0, t = "")`, `(i = 0, b = false, f = 1.5, e = blue, t = "", u = 0, n = -5, f32 = -0.25)`},
		{"HasCaps", `(x = 1)`, `(x = 1)`},
		// capnp's own parser rejects an empty 0x"", which is harmless, and
		// reads "-0" as +0 although it prints -0.0 as "-0": here "-0" is
		// negative zero, so printed floats read back exactly.
		{"Outer", `(ln = [], n = ())`, `(n = (x = 0), ln = [])`},
		{"All", `(d = 0x"", lf = [-0, -0.0, 0])`, `(v = void, b = false, i8 = 0, i16 = 0, i32 = 0, i64 = 0, u8 = 0, u16 = 0, u32 = 0, u64 = 0, f32 = 0, f64 = 0, d = "", e = red, lf = [-0, -0, 0], none = void, g = (p = 0), nu = (one = 0))`},
		{"All", `(d = 0x"0a0b", t = "\x01")`, `(v = void, b = false, i8 = 0, i16 = 0, i32 = 0, i64 = 0, u8 = 0, u16 = 0, u32 = 0, u64 = 0, f32 = 0, f64 = 0, t = "\001", d = "\n\v", e = red, none = void, g = (p = 0), nu = (one = 0))`},
		{"All", `(text = "", u8 = 1)`, `(v = void, b = false, i8 = 0, i16 = 0, i32 = 0, i64 = 0, u8 = 1, u16 = 0, u32 = 0, u64 = 0, f32 = 0, f64 = 0, e = red, text = "", g = (p = 0), nu = (one = 0))`},
	} {
		n := lookup(t, s, tc.typ)
		st, err := EncodeNew(n, tc.in)
		if err != nil {
			t.Errorf("EncodeNew(%s, %s): %v", tc.typ, tc.in, err)
			continue
		}
		got, err := Format(st, n)
		if err != nil || got != tc.want {
			t.Errorf("Format(%s %s) =\n  %s, %v\nwant\n  %s", tc.typ, tc.in, got, err, tc.want)
		}
	}
}

// TestDefaultsXOR checks the wire encoding of primitive defaults: a field
// set to its default is stored as zero, and zero is stored as the default.
func TestDefaultsXOR(t *testing.T) {
	n := lookup(t, testSchema(t), "Defaults")
	st, err := EncodeNew(n, `(i = 42, b = true, f = 1.5)`)
	if err != nil {
		t.Fatal(err)
	}
	if st.Uint32(0) != 0 || st.Bit(32) || st.Uint64(8) != 0 {
		t.Errorf("defaults not stored as zero: %x %v %x", st.Uint32(0), st.Bit(32), st.Uint64(8))
	}
	st, err = EncodeNew(n, `(i = 0, b = false, f = 0, n = 0)`)
	if err != nil {
		t.Fatal(err)
	}
	if st.Uint32(0) != 42 || !st.Bit(32) || st.Uint64(8) != math.Float64bits(1.5) || int8(st.Uint8(5)) != -5 {
		t.Errorf("zeros not stored as the defaults: %d %v %x %d", st.Uint32(0), st.Bit(32), st.Uint64(8), int8(st.Uint8(5)))
	}
}

func TestPointerDefaults(t *testing.T) {
	n := lookup(t, testSchema(t), "Defaults")
	st, err := EncodeNew(n, `(d = "z")`)
	if err != nil {
		t.Fatal(err)
	}
	got, err := FormatOptions{PointerDefaults: true}.Format(st, n)
	want := `(i = 42, b = true, f = 1.5, e = blue, t = "dflt", d = "z", s = (a = 7, s = "x"), l = [1, 2], u = 18446744073709551615, n = -5, f32 = -0.25)`
	if err != nil || got != want {
		t.Errorf("with pointer defaults:\n got %s, %v\nwant %s", got, err, want)
	}
}

// TestRoundTrip: text → Encode → Format → Encode gives the same message,
// and formatting is stable.
func TestRoundTrip(t *testing.T) {
	s := testSchema(t)
	run := func(typ string, cases []string) {
		n := lookup(t, s, typ)
		for _, in := range cases {
			st, err := EncodeNew(n, in)
			if err != nil {
				t.Errorf("EncodeNew(%s, %s): %v", typ, in, err)
				continue
			}
			text, err := Format(st, n)
			if err != nil {
				t.Errorf("Format(%s): %v", in, err)
				continue
			}
			st2, err := EncodeNew(n, text)
			if err != nil {
				t.Errorf("re-encoding %s: %v", text, err)
				continue
			}
			if !bytes.Equal(canonical(t, st), canonical(t, st2)) {
				t.Errorf("round trip changed the message:\n in  %s\n out %s", in, text)
			}
			text2, err := Format(st2, n)
			if err != nil || text2 != text {
				t.Errorf("format not stable:\n %s\n %s %v", text, text2, err)
			}
		}
	}
	run("All", allCases)
	run("Defaults", defaultsCases)
}

// TestDecodeMatchesCapnp: messages made by `capnp encode` print exactly as
// `capnp decode --short` prints them.
func TestDecodeMatchesCapnp(t *testing.T) {
	needCapnp(t)
	s := testSchema(t)
	check := func(typ string, cases []string) {
		n := lookup(t, s, typ)
		for _, in := range cases {
			msg := capnpEncode(t, typ, in)
			want := capnpDecode(t, typ, msg)
			got, err := Format(rootOf(t, msg), n)
			if err != nil || got != want {
				t.Errorf("%s %s:\n capnp decode: %s\n Format:       %s %v", typ, in, want, got, err)
			}
		}
	}
	check("All", allCases)
	check("Defaults", defaultsCases)
	check("Reordered", []string{`()`, `(a = "x", b = -1)`})
	check("Outer", []string{`(n = (x = -3), ln = [(x = 1), ()])`})
}

// TestEncodeMatchesCapnp: Encode builds the same message as `capnp
// encode` (compared in canonical form), and `capnp decode` reads ours as
// Format prints it.
func TestEncodeMatchesCapnp(t *testing.T) {
	needCapnp(t)
	s := testSchema(t)
	check := func(typ string, cases []string) {
		n := lookup(t, s, typ)
		for _, in := range cases {
			mine, err := EncodeNew(n, in)
			if err != nil {
				t.Errorf("EncodeNew(%s, %s): %v", typ, in, err)
				continue
			}
			theirs := rootOf(t, capnpEncode(t, typ, in))
			if !bytes.Equal(canonical(t, mine), canonical(t, theirs)) {
				t.Errorf("%s %s: Encode and capnp encode differ", typ, in)
			}
			got, err := Format(mine, n)
			want := capnpDecode(t, typ, marshal(t, mine))
			if err != nil || got != want {
				t.Errorf("%s %s:\n capnp decode: %s\n Format:       %s %v", typ, in, want, got, err)
			}
		}
	}
	check("All", allCases)
	check("Defaults", defaultsCases)
}

// TestFloatFormatMatchesCapnp prints many floats through capnp decode.
func TestFloatFormatMatchesCapnp(t *testing.T) {
	needCapnp(t)
	n := lookup(t, testSchema(t), "All")
	var f64s, f32s []string
	for _, v := range []float64{0, math.Copysign(0, -1), 1, -1, 0.5, 1.0 / 3, 2.0 / 3, math.Pi, math.E, 1e21, 1e22, 123456789, 1234567890123456789,
		math.MaxFloat64, math.SmallestNonzeroFloat64, 2.2250738585072014e-308, 1e-5, 1e-4, 100, 1e6, 1e7, 0.1 + 0.2} {
		f64s = append(f64s, FormatFloat64(v))
	}
	for _, v := range []float32{0, 1, 0.1, 1.0 / 3, math.Pi, math.MaxFloat32, math.SmallestNonzeroFloat32, 1.17549435e-38, 16777216, 1e10, 3e-5, 0.2, 7.038531e-26} {
		f32s = append(f32s, FormatFloat32(v))
	}
	in := "(lf = [" + strings.Join(f64s, ", ") + "], l32 = [" + strings.Join(f32s, ", ") + "])"
	msg := capnpEncode(t, "All", in)
	want := capnpDecode(t, "All", msg)
	got, err := Format(rootOf(t, msg), n)
	if err != nil || got != want {
		t.Errorf("floats:\n capnp decode: %s\n Format:       %s %v", want, got, err)
	}
}

func TestFormatHelpers(t *testing.T) {
	// Written by hand from capnp's printing rules: C escapes, octal for
	// other control bytes, high bytes raw in Text and octal in Data.
	if got, want := QuoteText([]byte("a\"\\'\n\x00\x7f\xc3\xa9")), `"a\"\\\'\n\000\177`+"\xc3\xa9"+`"`; got != want {
		t.Errorf("QuoteText = %s, want %s", got, want)
	}
	if got, want := QuoteData([]byte{0, 'a', 0xff, '\t'}), `"\000a\377\t"`; got != want {
		t.Errorf("QuoteData = %s, want %s", got, want)
	}
	for v, want := range map[float64]string{1e100: "1e100", 0.1: "0.1", math.Copysign(0, -1): "-0", 1.0 / 3: "0.33333333333333331", 1e-7: "1e-07"} {
		if got := FormatFloat64(v); got != want {
			t.Errorf("FormatFloat64(%v) = %s, want %s", v, got, want)
		}
	}
	for _, v := range []float64{math.Inf(1), math.Inf(-1), math.NaN()} {
		if got := FormatFloat64(v); got != map[bool]string{true: "nan", false: map[bool]string{true: "inf", false: "-inf"}[v > 0]}[math.IsNaN(v)] {
			t.Errorf("FormatFloat64(%v) = %s", v, got)
		}
	}
	// Every float32 prints in a form that reads back exactly.
	for _, bits := range []uint32{1, 0x00800000, 0x7f7fffff, 0x3f800001, 0x4b000001, 0x3dcccccd, 0x33d6bf95} {
		v := math.Float32frombits(bits)
		st, err := EncodeNew(lookup(t, testSchema(t), "All"), "(f32 = "+FormatFloat32(v)+")")
		if err != nil {
			t.Fatal(err)
		}
		if got := st.Uint32(32); got != bits {
			t.Errorf("float32 %#x printed %s reads back as %#x", bits, FormatFloat32(v), got)
		}
	}
}

func TestEncodeErrors(t *testing.T) {
	s := testSchema(t)
	for _, tc := range []struct {
		typ, in, want string
	}{
		{"All", `(i32 = 1`, `1:9: expected ',' or ')'`},
		{"All", "(\n  i32 = 1,\n  t = \"x\n", `3:7: unterminated string`},
		{"All", `(nope = 1)`, `1:2: All has no field "nope"; fields: v, b, i8`},
		{"All", `(i8 = 128)`, `1:7: field i8: 128 is out of range for Int8`},
		{"All", `(i8 = -129)`, `out of range for Int8`},
		{"All", `(u8 = -1)`, `-1 is out of range for UInt8`},
		{"All", `(u64 = 18446744073709551616)`, `1:8: integer 18446744073709551616 does not fit in 64 bits`},
		{"All", `(i32 = 1.5)`, `an Int32 field takes an integer`},
		{"All", `(f32 = 1e39)`, `out of range for Float32`},
		{"All", `(b = 1)`, `a Bool field takes true or false`},
		{"All", `(e = purple)`, `Color has no enumerant "purple"; it has: red, green, blue`},
		{"All", `(t = 5)`, `Text takes a string`},
		{"All", `(li = [1, "x"])`, `element 1: an Int32 field takes an integer`},
		{"All", `(li = [1 2])`, `1:10: expected ',' or ']'`},
		{"All", `(inner = 5)`, `Inner needs a struct literal`},
		{"All", `(inner = (zz = 1))`, `1:11: field inner: Inner has no field "zz"; fields: a, s`},
		{"All", `(i32 = 1, i32 = 2)`, `field i32 is set twice`},
		{"All", `(num = 1, text = "x")`, `fields num and text are members of the same union`},
		{"All", `(nu = (one = 1, two = ()))`, `fields one and two are members of the same union`},
		{"All", `(grp = 1)`, `needs a struct literal`},
		{"All", `(d = 0x"abc")`, `odd number of hex digits`},
		{"All", `(d = 0x"zz")`, `in 0x"..." literal`},
		{"All", `(t = "\q")`, `unknown escape \q`},
		{"All", `(t = "\777")`, `more than a byte`},
		{"All", `(i32 = 08)`, `bad integer "08"`},
		{"All", `(i32 = 1abc)`, `bad number`},
		{"All", `(i32 = 1) extra`, `unexpected "extra" after the struct literal`},
		{"All", `[1]`, `expected a struct literal`},
		{"All", `(i32 = @)`, `unexpected character '@'`},
		{"All", `(v = 1)`, `a Void field takes the value void`},
		{"All", `(cap = 1)`, `capabilities cannot be given in text form`},
		{"All", `(any = "x")`, `capabilities cannot be given in text form`},
		{"HasCaps", `(lf = [])`, ``}, // an empty list of capabilities is fine
		{"HasCaps", `(lf = [5])`, `capabilities cannot be given in text form`},
		{"All", strings.Repeat("(inner = ", 100), `nested more than 64 deep`},
		{"All", `(ll = ` + strings.Repeat("[", 100), `nested more than 64 deep`},
	} {
		_, err := EncodeNew(lookup(t, s, tc.typ), tc.in)
		if tc.want == "" {
			if err != nil {
				t.Errorf("%s: %v", tc.in, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%.60s: error = %v, want it to contain %q", tc.in, err, tc.want)
		}
		var te *TextError
		if err != nil && !errors.As(err, &te) {
			t.Errorf("%.60s: error %v is not a *TextError", tc.in, err)
		}
	}
	_, err := EncodeNew(lookup(t, s, "All"), `(cap = 1)`)
	if !errors.Is(err, ErrCapabilityInText) {
		t.Errorf("capability error %v does not wrap ErrCapabilityInText", err)
	}
}

func TestEncodeIntoPlacedStruct(t *testing.T) {
	n := lookup(t, testSchema(t), "Inner")
	_, seg, err := capnp.NewMessage(capnp.SingleSegment(nil))
	if err != nil {
		t.Fatal(err)
	}
	small, err := capnp.NewRootStruct(seg, capnp.ObjectSize{DataSize: 8})
	if err != nil {
		t.Fatal(err)
	}
	if err := Encode(small, n, `(s = "x")`); err == nil || !strings.Contains(err.Error(), "smaller") {
		t.Errorf("encoding into a too small struct: %v", err)
	}
	if err := Encode(capnp.Struct{}, n, `()`); err == nil {
		t.Error("encoding into an unallocated struct succeeded")
	}
	st, err := capnp.NewStruct(seg, n.ObjectSize())
	if err != nil {
		t.Fatal(err)
	}
	if err := Encode(st, n, `a = 9, s = "no parens"`); err != nil {
		t.Fatal(err)
	}
	if got, err := Format(st, n); err != nil || got != `(a = 9, s = "no parens")` {
		t.Errorf("got %s, %v", got, err)
	}
	if err := Encode(st, n, ``); err != nil {
		t.Errorf("empty text: %v", err)
	}
}

// TestFormatHostileMessages: wrong pointer kinds give errors, not panics.
func TestFormatHostileMessages(t *testing.T) {
	s := testSchema(t)
	// Encode an Outer whose pointers are then read as another type.
	for _, tc := range []struct{ wrote, wroteIn, readAs string }{
		{"Inner", `(s = "text")`, "Info"},      // text where a struct is expected
		{"All", `(t = "x", d = "y")`, "Outer"}, // text where a struct and a list are expected
		{"All", `(li = [1, 2])`, "All"},        // fine
		{"Inner", `(s = "a")`, "HasCaps"},      // text where a capability is expected
		{"All", `(ls = [(a = 1)], lt = ["a"])`, "All"},
	} {
		st, err := EncodeNew(lookup(t, s, tc.wrote), tc.wroteIn)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = Format(st, lookup(t, s, tc.readAs)) // must not panic
	}
	n := lookup(t, s, "Outer")
	st, err := EncodeNew(lookup(t, s, "Inner"), `(s = "text")`)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Format(st, n); err == nil {
		t.Error("reading a Text pointer as Outer's struct field gave no error")
	}
}

// TestOpaquePointerMatchesCapnp: an AnyPointer field prints as capnp
// decode prints it. (Capabilities cannot be compared: capnp decode aborts
// on a capability pointer in a message without a capability table.)
func TestOpaquePointerMatchesCapnp(t *testing.T) {
	needCapnp(t)
	n := lookup(t, testSchema(t), "All")
	st, err := EncodeNew(n, `(i32 = 1, ls = [(a = 2)])`)
	if err != nil {
		t.Fatal(err)
	}
	inner, err := capnp.NewStruct(st.Segment(), capnp.ObjectSize{DataSize: 8})
	if err != nil {
		t.Fatal(err)
	}
	if err := st.SetPtr(16, inner.ToPtr()); err != nil { // All.any is ptr[16]
		t.Fatal(err)
	}
	want := capnpDecode(t, "All", marshal(t, st))
	got, err := Format(st, n)
	if err != nil || got != want || !strings.Contains(got, "any = <opaque pointer>") {
		t.Errorf("\n capnp decode: %s\n Format:       %s %v", want, got, err)
	}
}

// A list of Void takes no space in a message, so a tiny message can claim
// hundreds of millions of elements: Format refuses instead of printing them.
func TestFormatHugeVoidList(t *testing.T) {
	n := lookup(t, testSchema(t), "All")
	st, err := EncodeNew(n, `()`)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.SetPtr(11, capnp.List(capnp.NewVoidList(st.Segment(), 1<<28)).ToPtr()); err != nil { // All.lv
		t.Fatal(err)
	}
	// go-capnp's traversal limit catches it first by default...
	if _, err := Format(st, n); err == nil {
		t.Error("Format of a 2^28-element Void list succeeded")
	}
	// ... and Format's own bound when that limit is lifted.
	st.Message().ResetReadLimit(math.MaxUint64)
	if _, err := Format(st, n); err == nil || !strings.Contains(err.Error(), "list elements") {
		t.Errorf("Format of a 2^28-element Void list: %v", err)
	}
}
