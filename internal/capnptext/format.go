package capnptext

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/std/capnp/schema"
)

// FormatOptions changes how Format prints. The zero value prints exactly
// what `capnp decode --short` prints.
type FormatOptions struct {
	// PointerDefaults prints a null pointer field that has a default value
	// in the schema as that default (what a reader of the field sees).
	// `capnp decode` omits null pointers, defaults or not.
	PointerDefaults bool
}

// Format prints st, a struct of node n's type, in Cap'n Proto text form,
// the way `capnp decode --short` does: "(a = 1, t = \"x\", l = [1, 2])".
// Data and primitive fields are always printed (their defaults applied),
// null pointers omitted, the active union member printed among the fields
// in schema order, capabilities as <capability>, AnyPointer fields as
// <opaque pointer>. A malformed message gives an error, never a panic.
func Format(st capnp.Struct, n *Node) (string, error) {
	return FormatOptions{}.Format(st, n)
}

// Format is like the package-level Format, with options.
func (o FormatOptions) Format(st capnp.Struct, n *Node) (string, error) {
	if n == nil || n.Struct == nil {
		return "", fmt.Errorf("format: %s is not a struct", n)
	}
	p := &printer{opts: o}
	if err := p.structValue(st, n, 0); err != nil {
		return "", fmt.Errorf("format %s: %w", n.ShortName, err)
	}
	return p.b.String(), nil
}

type printer struct {
	b     strings.Builder
	opts  FormatOptions
	elems int // list elements printed so far
}

// maxElements bounds the list elements one Format prints in all. Lists of
// Void or of empty structs take no space in a message, so a small hostile
// message could otherwise describe billions of them.
const maxElements = 1 << 22

func (p *printer) structValue(st capnp.Struct, n *Node, depth int) error {
	p.b.WriteByte('(')
	if err := p.fields(st, n, depth); err != nil {
		return err
	}
	p.b.WriteByte(')')
	return nil
}

// fields prints the fields of n (a struct or group) that live in st.
func (p *printer) fields(st capnp.Struct, n *Node, depth int) error {
	if depth > maxNesting {
		return errors.New("nested too deeply")
	}
	info := n.Struct
	var active *Field
	if info.DiscriminantCount > 0 {
		disc := st.Uint16(capnp.DataOffset(info.DiscriminantOffset) * 2)
		for _, f := range info.Fields {
			if f.Discriminant == disc {
				active = f
				break
			}
		}
		if active != nil && disc == 0 && !p.has(st, active) {
			active = nil
		}
	}
	first := true
	emit := func(f *Field) error {
		if !first {
			p.b.WriteString(", ")
		}
		first = false
		p.b.WriteString(f.Name)
		p.b.WriteString(" = ")
		if err := p.field(st, f, depth); err != nil {
			return fmt.Errorf("%s: %w", f.Name, err)
		}
		return nil
	}
	for _, f := range info.Fields {
		if f.Discriminant != NoDiscriminant {
			continue
		}
		if active != nil && active.Index < f.Index {
			if err := emit(active); err != nil {
				return err
			}
			active = nil
		}
		if p.has(st, f) {
			if err := emit(f); err != nil {
				return err
			}
		}
	}
	if active != nil {
		return emit(active)
	}
	return nil
}

// has reports whether the field is printed (capnp's HasMode::NON_NULL):
// everything but null pointers.
func (p *printer) has(st capnp.Struct, f *Field) bool {
	if f.Type == nil || !f.Type.isPointer() {
		return true
	}
	if f.Offset > math.MaxUint16 {
		return false
	}
	if st.HasPtr(uint16(f.Offset)) {
		return true
	}
	return p.opts.PointerDefaults && f.defaultPtr.IsValid()
}

// dataBits reads a primitive field's raw bits (before the default XOR).
func dataBits(st capnp.Struct, t *Type, off uint32) uint64 {
	size := t.bitSize()
	if size == 0 {
		return 0
	}
	bit := uint64(off) * size
	if bit+size > uint64(st.Size().DataSize)*8 {
		return 0 // outside the data section: zero, as the spec says
	}
	switch size {
	case 1:
		if st.Bit(capnp.BitOffset(bit)) {
			return 1
		}
		return 0
	case 8:
		return uint64(st.Uint8(capnp.DataOffset(bit / 8)))
	case 16:
		return uint64(st.Uint16(capnp.DataOffset(bit / 8)))
	case 32:
		return uint64(st.Uint32(capnp.DataOffset(bit / 8)))
	default:
		return st.Uint64(capnp.DataOffset(bit / 8))
	}
}

func (p *printer) field(st capnp.Struct, f *Field, depth int) error {
	if f.Group != nil {
		p.b.WriteByte('(')
		if err := p.fields(st, f.Group, depth+1); err != nil {
			return err
		}
		p.b.WriteByte(')')
		return nil
	}
	t := f.Type
	if !t.isPointer() {
		return p.primitive(t, dataBits(st, t, f.Offset)^f.defaultBits)
	}
	if f.Offset > math.MaxUint16 {
		return nil
	}
	ptr, err := st.Ptr(uint16(f.Offset))
	if err != nil {
		return err
	}
	if !ptr.IsValid() && p.opts.PointerDefaults {
		ptr = f.defaultPtr
	}
	return p.pointer(t, ptr, depth)
}

func (p *printer) primitive(t *Type, bits uint64) error {
	b := &p.b
	switch t.Kind {
	case schema.Type_Which_void:
		b.WriteString("void")
	case schema.Type_Which_bool:
		b.WriteString(strconv.FormatBool(bits&1 != 0))
	case schema.Type_Which_int8:
		b.WriteString(strconv.FormatInt(int64(int8(bits)), 10))
	case schema.Type_Which_int16:
		b.WriteString(strconv.FormatInt(int64(int16(bits)), 10))
	case schema.Type_Which_int32:
		b.WriteString(strconv.FormatInt(int64(int32(bits)), 10))
	case schema.Type_Which_int64:
		b.WriteString(strconv.FormatInt(int64(bits), 10))
	case schema.Type_Which_uint8:
		b.WriteString(strconv.FormatUint(uint64(uint8(bits)), 10))
	case schema.Type_Which_uint16:
		b.WriteString(strconv.FormatUint(uint64(uint16(bits)), 10))
	case schema.Type_Which_uint32:
		b.WriteString(strconv.FormatUint(uint64(uint32(bits)), 10))
	case schema.Type_Which_uint64:
		b.WriteString(strconv.FormatUint(bits, 10))
	case schema.Type_Which_float32:
		b.WriteString(FormatFloat32(math.Float32frombits(uint32(bits))))
	case schema.Type_Which_float64:
		b.WriteString(FormatFloat64(math.Float64frombits(bits)))
	case schema.Type_Which_enum:
		v := uint16(bits)
		if t.Node != nil && int(v) < len(t.Node.Enumerants) {
			b.WriteString(t.Node.Enumerants[v])
		} else {
			fmt.Fprintf(b, "(%d)", v)
		}
	default:
		return fmt.Errorf("%s is not a primitive type", t)
	}
	return nil
}

// FormatFloat64 formats a Float64 as capnp's tools do: the shortest of 15
// or 17 significant digits that reads back exactly, "inf", "-inf", "nan",
// and exponents without a plus sign ("1e100").
func FormatFloat64(v float64) string {
	switch {
	case math.IsInf(v, 1):
		return "inf"
	case math.IsInf(v, -1):
		return "-inf"
	case math.IsNaN(v):
		return "nan"
	}
	s := strconv.FormatFloat(v, 'g', 15, 64)
	if r, err := strconv.ParseFloat(s, 64); err != nil || r != v {
		s = strconv.FormatFloat(v, 'g', 17, 64)
	}
	return strings.ReplaceAll(s, "+", "")
}

// FormatFloat32 formats a Float32 as capnp's tools do: 6 significant
// digits if they read back exactly (and the value is not subnormal), else
// 8. Where 8 digits do not read back exactly (capnp then prints a value
// that differs in its last bit), it uses 9, so printing never loses bits.
func FormatFloat32(v float32) string {
	f := float64(v)
	switch {
	case math.IsInf(f, 1):
		return "inf"
	case math.IsInf(f, -1):
		return "-inf"
	case math.IsNaN(f):
		return "nan"
	}
	exact := func(s string) bool {
		r, err := strconv.ParseFloat(s, 32)
		return err == nil && float32(r) == v
	}
	subnormal := v != 0 && math.Abs(f) < 0x1p-126
	s := strconv.FormatFloat(f, 'g', 6, 32)
	if subnormal || !exact(s) {
		s = strconv.FormatFloat(f, 'g', 8, 32)
		if !exact(s) {
			s = strconv.FormatFloat(f, 'g', 9, 32)
		}
	}
	return strings.ReplaceAll(s, "+", "")
}

// QuoteText quotes Text as capnp's tools print it: C escapes, octal for
// other control bytes, bytes from 0x80 up unescaped.
func QuoteText(b []byte) string { return quote(b, false) }

// QuoteData quotes Data as capnp's tools print it: like QuoteText, with
// bytes from 0x80 up in octal too.
func QuoteData(b []byte) string { return quote(b, true) }

func quote(s []byte, high bool) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, c := range s {
		switch c {
		case '\a':
			b.WriteString(`\a`)
		case '\b':
			b.WriteString(`\b`)
		case '\f':
			b.WriteString(`\f`)
		case '\n':
			b.WriteString(`\n`)
		case '\r':
			b.WriteString(`\r`)
		case '\t':
			b.WriteString(`\t`)
		case '\v':
			b.WriteString(`\v`)
		case '\'':
			b.WriteString(`\'`)
		case '"':
			b.WriteString(`\"`)
		case '\\':
			b.WriteString(`\\`)
		default:
			if c < 0x20 || c == 0x7f || (high && c >= 0x80) {
				b.WriteByte('\\')
				b.WriteByte('0' + c>>6)
				b.WriteByte('0' + (c>>3)&7)
				b.WriteByte('0' + c&7)
			} else {
				b.WriteByte(c)
			}
		}
	}
	b.WriteByte('"')
	return b.String()
}

// pointer prints a pointer value of type t (null pointers as the type's
// empty value, which only happens inside lists or through defaults).
func (p *printer) pointer(t *Type, ptr capnp.Ptr, depth int) error {
	if depth > maxNesting {
		return errors.New("nested too deeply")
	}
	switch t.Kind {
	case schema.Type_Which_text:
		if !ptr.IsValid() {
			p.b.WriteString(`""`)
			return nil
		}
		b := ptr.TextBytes()
		if b == nil {
			return errors.New("not a valid Text pointer (want a NUL-terminated byte list)")
		}
		p.b.WriteString(QuoteText(b))
	case schema.Type_Which_data:
		if !ptr.IsValid() {
			p.b.WriteString(`""`)
			return nil
		}
		b := ptr.Data()
		if b == nil && !ptr.List().IsValid() {
			return errors.New("not a valid Data pointer (want a byte list)")
		}
		p.b.WriteString(QuoteData(b))
	case schema.Type_Which_structType:
		if t.Node == nil || t.Node.Struct == nil {
			return fmt.Errorf("struct type @0x%016x is not in the schema", t.ID)
		}
		st := ptr.Struct()
		if ptr.IsValid() && !st.IsValid() {
			return fmt.Errorf("not a struct pointer (want %s)", t)
		}
		return p.structValue(st, t.Node, depth+1)
	case schema.Type_Which_list:
		return p.list(t.Elem, ptr, depth+1)
	case schema.Type_Which_interface:
		if ptr.IsValid() && !ptr.Interface().IsValid() {
			return fmt.Errorf("not a capability pointer (want %s)", t)
		}
		p.b.WriteString("<capability>")
	case schema.Type_Which_anyPointer:
		p.b.WriteString("<opaque pointer>")
	default:
		return fmt.Errorf("%s is not a pointer type", t)
	}
	return nil
}

func (p *printer) list(elem *Type, ptr capnp.Ptr, depth int) error {
	if depth > maxNesting {
		return errors.New("nested too deeply")
	}
	l := ptr.List()
	if ptr.IsValid() && !l.IsValid() {
		return fmt.Errorf("not a list pointer (want List(%s))", elem)
	}
	p.b.WriteByte('[')
	n := l.Len()
	if p.elems += n; p.elems > maxElements {
		return fmt.Errorf("more than %d list elements to print", maxElements)
	}
	for i := 0; i < n; i++ {
		if i > 0 {
			p.b.WriteString(", ")
		}
		if err := p.elem(elem, l, i, depth); err != nil {
			return fmt.Errorf("element %d: %w", i, err)
		}
	}
	p.b.WriteByte(']')
	return nil
}

func (p *printer) elem(t *Type, l capnp.List, i int, depth int) error {
	var bits uint64
	switch t.Kind {
	case schema.Type_Which_void:
	case schema.Type_Which_bool:
		if capnp.BitList(l).At(i) {
			bits = 1
		}
	case schema.Type_Which_int8, schema.Type_Which_uint8:
		bits = uint64(capnp.UInt8List(l).At(i))
	case schema.Type_Which_int16, schema.Type_Which_uint16, schema.Type_Which_enum:
		bits = uint64(capnp.UInt16List(l).At(i))
	case schema.Type_Which_int32, schema.Type_Which_uint32, schema.Type_Which_float32:
		bits = uint64(capnp.UInt32List(l).At(i))
	case schema.Type_Which_int64, schema.Type_Which_uint64, schema.Type_Which_float64:
		bits = capnp.UInt64List(l).At(i)
	case schema.Type_Which_structType:
		if t.Node == nil || t.Node.Struct == nil {
			return fmt.Errorf("struct type @0x%016x is not in the schema", t.ID)
		}
		return p.structValue(l.Struct(i), t.Node, depth+1)
	default:
		ptr, err := capnp.PointerList(l).At(i)
		if err != nil {
			return err
		}
		return p.pointer(t, ptr, depth+1)
	}
	return p.primitive(t, bits)
}
