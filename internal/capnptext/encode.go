package capnptext

import (
	"errors"
	"fmt"
	"math"
	"strings"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/std/capnp/schema"
)

// ErrCapabilityInText is wrapped by the errors for capability (and
// AnyPointer) fields given a value in text: they cannot be written in text
// form, so such fields must be left out (null).
var ErrCapabilityInText = errors.New("capabilities cannot be given in text form; leave the field out (null)")

// Encode parses text, a struct literal in Cap'n Proto text form (see
// ParseLiteral), and writes it into dst, a struct of node n's type. dst
// must have at least n.ObjectSize() (as go-capnp's Send.PlaceArgs gets it);
// objects the value points to are allocated in dst's message.
func Encode(dst capnp.Struct, n *Node, text string) error {
	lit, err := ParseLiteral(text)
	if err != nil {
		return err
	}
	return lit.Encode(dst, n)
}

// EncodeNew encodes text as the root struct of a new message, for checking
// a literal against a schema or building a standalone value.
func EncodeNew(n *Node, text string) (capnp.Struct, error) {
	lit, err := ParseLiteral(text)
	if err != nil {
		return capnp.Struct{}, err
	}
	return lit.EncodeNew(n)
}

// EncodeNew is like the package-level EncodeNew for a parsed literal.
func (l *Literal) EncodeNew(n *Node) (capnp.Struct, error) {
	if n == nil || n.Struct == nil {
		return capnp.Struct{}, fmt.Errorf("encode: %s is not a struct", n)
	}
	_, seg, err := capnp.NewMessage(capnp.MultiSegment(nil))
	if err != nil {
		return capnp.Struct{}, fmt.Errorf("encode %s: %w", n.ShortName, err)
	}
	st, err := capnp.NewRootStruct(seg, n.ObjectSize())
	if err != nil {
		return capnp.Struct{}, fmt.Errorf("encode %s: %w", n.ShortName, err)
	}
	if err := l.Encode(st, n); err != nil {
		return capnp.Struct{}, err
	}
	return st, nil
}

// Encode writes the literal into dst, a struct of node n's type (see the
// package-level Encode). Values that do not fit the schema give a
// *TextError with the value's position.
func (l *Literal) Encode(dst capnp.Struct, n *Node) error {
	if n == nil || n.Struct == nil {
		return fmt.Errorf("encode: %s is not a struct", n)
	}
	if !dst.IsValid() {
		return fmt.Errorf("encode %s: destination struct is not allocated", n.ShortName)
	}
	want, got := n.ObjectSize(), dst.Size()
	if got.DataSize < want.DataSize || got.PointerCount < want.PointerCount {
		return fmt.Errorf("encode %s: destination struct is %v, smaller than the %v it needs", n.ShortName, got, want)
	}
	return (&encoder{seg: dst.Segment()}).fields(dst, n, l.v, 0)
}

type encoder struct {
	seg *capnp.Segment
}

// fields writes a struct literal's assignments into dst, whose layout is
// node n's (a struct, or a group living in the same struct).
func (e *encoder) fields(dst capnp.Struct, n *Node, v *value, depth int) error {
	if depth > maxNesting {
		return errAt(v.pos, "values nested more than %d deep", maxNesting)
	}
	if v.kind != valStruct {
		return errAt(v.pos, "%s needs a struct literal \"(field = value, ...)\", found %s", n.ShortName, v.describe())
	}
	info := n.Struct
	seen := map[string]bool{}
	var unionMember *assign
	for _, a := range v.fields {
		f := fieldByName(info, a.name)
		if f == nil {
			return errAt(a.pos, "%s has no field %q; fields: %s", n.ShortName, a.name, fieldNames(info))
		}
		if seen[a.name] {
			return errAt(a.pos, "field %s is set twice", a.name)
		}
		seen[a.name] = true
		if f.Discriminant != NoDiscriminant {
			if unionMember != nil {
				return errAt(a.pos, "fields %s and %s are members of the same union; set only one", unionMember.name, a.name)
			}
			unionMember = a
			off := uint64(info.DiscriminantOffset) * 2
			if off+2 > uint64(dst.Size().DataSize) {
				return errAt(a.pos, "union discriminant of %s lies outside the struct (bad schema)", n.ShortName)
			}
			dst.SetUint16(capnp.DataOffset(off), f.Discriminant)
		}
		if err := e.field(dst, f, a.val, depth); err != nil {
			return err
		}
	}
	return nil
}

func fieldByName(info *StructInfo, name string) *Field {
	for _, f := range info.Fields {
		if f.Name == name {
			return f
		}
	}
	return nil
}

func fieldNames(info *StructInfo) string {
	if len(info.Fields) == 0 {
		return "(none)"
	}
	var names []string
	for _, f := range info.Fields {
		names = append(names, f.Name)
	}
	return strings.Join(names, ", ")
}

func (e *encoder) field(dst capnp.Struct, f *Field, v *value, depth int) error {
	if f.Group != nil {
		if err := e.fields(dst, f.Group, v, depth+1); err != nil {
			return err
		}
		return nil
	}
	t := f.Type
	if !t.isPointer() {
		bits, err := primitiveBits(t, v)
		if err != nil {
			return errAt(v.pos, "field %s: %s", f.Name, err)
		}
		return setDataBits(dst, t, f.Offset, bits^f.defaultBits, v.pos, f.Name)
	}
	if uint64(f.Offset) >= uint64(dst.Size().PointerCount) {
		return errAt(v.pos, "field %s: pointer %d lies outside the struct (bad schema)", f.Name, f.Offset)
	}
	ptr, err := e.pointer(t, v, depth+1)
	if err != nil {
		return wrapField(f.Name, err)
	}
	if err := dst.SetPtr(uint16(f.Offset), ptr); err != nil {
		return errAt(v.pos, "field %s: %v", f.Name, err)
	}
	return nil
}

// wrapField adds the field name to an error, keeping a TextError a
// TextError.
func wrapField(name string, err error) error {
	var te *TextError
	if errors.As(err, &te) {
		return &TextError{Line: te.Line, Col: te.Col, Msg: "field " + name + ": " + te.Msg, Err: te.Err}
	}
	return fmt.Errorf("field %s: %w", name, err)
}

func setDataBits(dst capnp.Struct, t *Type, off uint32, bits uint64, p pos, name string) error {
	size := t.bitSize()
	if size == 0 {
		return nil
	}
	bit := uint64(off) * size
	if bit+size > uint64(dst.Size().DataSize)*8 {
		return errAt(p, "field %s lies outside the struct (bad schema)", name)
	}
	switch size {
	case 1:
		dst.SetBit(capnp.BitOffset(bit), bits&1 != 0)
	case 8:
		dst.SetUint8(capnp.DataOffset(bit/8), uint8(bits))
	case 16:
		dst.SetUint16(capnp.DataOffset(bit/8), uint16(bits))
	case 32:
		dst.SetUint32(capnp.DataOffset(bit/8), uint32(bits))
	default:
		dst.SetUint64(capnp.DataOffset(bit/8), bits)
	}
	return nil
}

// primitiveBits converts a value to the bit pattern of a primitive type.
func primitiveBits(t *Type, v *value) (uint64, error) {
	switch t.Kind {
	case schema.Type_Which_void:
		if v.kind == valIdent && v.ident == "void" {
			return 0, nil
		}
		return 0, fmt.Errorf("a Void field takes the value void, not %s", v.describe())
	case schema.Type_Which_bool:
		if v.kind == valIdent {
			switch v.ident {
			case "true":
				return 1, nil
			case "false":
				return 0, nil
			}
		}
		return 0, fmt.Errorf("a Bool field takes true or false, not %s", v.describe())
	case schema.Type_Which_int8:
		return signedBits(v, 8)
	case schema.Type_Which_int16:
		return signedBits(v, 16)
	case schema.Type_Which_int32:
		return signedBits(v, 32)
	case schema.Type_Which_int64:
		return signedBits(v, 64)
	case schema.Type_Which_uint8:
		return unsignedBits(v, 8)
	case schema.Type_Which_uint16:
		return unsignedBits(v, 16)
	case schema.Type_Which_uint32:
		return unsignedBits(v, 32)
	case schema.Type_Which_uint64:
		return unsignedBits(v, 64)
	case schema.Type_Which_float32:
		f, err := floatValue(v)
		if err != nil {
			return 0, err
		}
		if !math.IsInf(f, 0) && math.IsInf(float64(float32(f)), 0) {
			return 0, fmt.Errorf("%s is out of range for Float32", v.describe())
		}
		if math.IsNaN(f) {
			return 0x7fc00000, nil // capnp's quiet NaN for Float32
		}
		return uint64(math.Float32bits(float32(f))), nil
	case schema.Type_Which_float64:
		f, err := floatValue(v)
		if err != nil {
			return 0, err
		}
		return math.Float64bits(f), nil
	case schema.Type_Which_enum:
		if t.Node == nil {
			return 0, fmt.Errorf("enum type @0x%016x is not in the schema", t.ID)
		}
		switch v.kind {
		case valIdent:
			for i, name := range t.Node.Enumerants {
				if name == v.ident {
					return uint64(i), nil
				}
			}
			return 0, fmt.Errorf("%s has no enumerant %q; it has: %s", t.Node.ShortName, v.ident, strings.Join(t.Node.Enumerants, ", "))
		case valInt:
			if !v.neg && v.mag <= math.MaxUint16 {
				return v.mag, nil
			}
		}
		return 0, fmt.Errorf("%s takes an enumerant name (%s), not %s", t.Node.ShortName, strings.Join(t.Node.Enumerants, ", "), v.describe())
	}
	return 0, fmt.Errorf("%s is not a primitive type", t)
}

func signedBits(v *value, bits uint) (uint64, error) {
	if v.kind != valInt {
		return 0, fmt.Errorf("an Int%d field takes an integer, not %s", bits, v.describe())
	}
	limit := uint64(1) << (bits - 1) // magnitude of the minimum
	if v.neg {
		if v.mag > limit {
			return 0, fmt.Errorf("%s is out of range for Int%d", v.describe(), bits)
		}
		return uint64(-int64(v.mag-1)-1) & mask(bits), nil
	}
	if v.mag >= limit {
		return 0, fmt.Errorf("%s is out of range for Int%d", v.describe(), bits)
	}
	return v.mag, nil
}

func unsignedBits(v *value, bits uint) (uint64, error) {
	if v.kind != valInt {
		return 0, fmt.Errorf("UInt%d takes an integer, not %s", bits, v.describe())
	}
	if v.neg && v.mag != 0 || v.mag > mask(bits) {
		return 0, fmt.Errorf("%s is out of range for UInt%d", v.describe(), bits)
	}
	return v.mag, nil
}

func mask(bits uint) uint64 {
	if bits >= 64 {
		return math.MaxUint64
	}
	return 1<<bits - 1
}

func floatValue(v *value) (float64, error) {
	switch v.kind {
	case valFloat:
		return v.f, nil
	case valInt:
		f := float64(v.mag)
		if v.neg {
			// "-0" is negative zero: capnp prints -0.0 as "-0" (its own
			// parser reads that back as +0, losing the sign).
			f = -f
		}
		return f, nil
	case valIdent:
		switch v.ident {
		case "inf":
			return math.Inf(1), nil
		case "nan":
			return quietNaN, nil
		}
	}
	return 0, fmt.Errorf("a float takes a number, inf or nan, not %s", v.describe())
}

// pointer builds the object a pointer value of type t points to.
func (e *encoder) pointer(t *Type, v *value, depth int) (capnp.Ptr, error) {
	if depth > maxNesting {
		return capnp.Ptr{}, errAt(v.pos, "values nested more than %d deep", maxNesting)
	}
	switch t.Kind {
	case schema.Type_Which_text:
		if v.kind != valString {
			return capnp.Ptr{}, errAt(v.pos, "Text takes a string, not %s", v.describe())
		}
		l, err := capnp.NewTextFromBytes(e.seg, v.bytes)
		if err != nil {
			return capnp.Ptr{}, errAt(v.pos, "allocate text: %v", err)
		}
		return l.ToPtr(), nil
	case schema.Type_Which_data:
		if v.kind != valString && v.kind != valData {
			return capnp.Ptr{}, errAt(v.pos, "Data takes a string or 0x\"hex\", not %s", v.describe())
		}
		l, err := capnp.NewData(e.seg, v.bytes)
		if err != nil {
			return capnp.Ptr{}, errAt(v.pos, "allocate data: %v", err)
		}
		return l.ToPtr(), nil
	case schema.Type_Which_structType:
		if t.Node == nil || t.Node.Struct == nil {
			return capnp.Ptr{}, errAt(v.pos, "struct type @0x%016x is not in the schema", t.ID)
		}
		if v.kind != valStruct {
			return capnp.Ptr{}, errAt(v.pos, "%s needs a struct literal \"(field = value, ...)\", found %s", t.Node.ShortName, v.describe())
		}
		st, err := capnp.NewStruct(e.seg, t.Node.ObjectSize())
		if err != nil {
			return capnp.Ptr{}, errAt(v.pos, "allocate %s: %v", t.Node.ShortName, err)
		}
		if err := e.fields(st, t.Node, v, depth+1); err != nil {
			return capnp.Ptr{}, err
		}
		return st.ToPtr(), nil
	case schema.Type_Which_list:
		return e.list(t.Elem, v, depth+1)
	case schema.Type_Which_interface:
		return capnp.Ptr{}, &TextError{Line: v.pos.line, Col: v.pos.col, Msg: fmt.Sprintf("%s: %v", t, ErrCapabilityInText), Err: ErrCapabilityInText}
	case schema.Type_Which_anyPointer:
		return capnp.Ptr{}, &TextError{Line: v.pos.line, Col: v.pos.col, Msg: "AnyPointer: " + ErrCapabilityInText.Error(), Err: ErrCapabilityInText}
	}
	return capnp.Ptr{}, errAt(v.pos, "%s is not a pointer type", t)
}

func (e *encoder) list(elem *Type, v *value, depth int) (capnp.Ptr, error) {
	if v.kind != valList {
		return capnp.Ptr{}, errAt(v.pos, "List(%s) takes a list \"[...]\", not %s", elem, v.describe())
	}
	n := int32(len(v.elems))
	wrap := func(err error) error {
		if err == nil {
			return nil
		}
		var te *TextError
		if errors.As(err, &te) {
			return err
		}
		return errAt(v.pos, "List(%s): %v", elem, err)
	}
	// Primitive elements: convert all first, then store by size.
	if !elem.isPointer() && elem.Kind != schema.Type_Which_structType {
		bits := make([]uint64, n)
		for i, ev := range v.elems {
			b, err := primitiveBits(elem, ev)
			if err != nil {
				return capnp.Ptr{}, errAt(ev.pos, "element %d: %s", i, err)
			}
			bits[i] = b
		}
		var l capnp.List
		switch elem.bitSize() {
		case 0:
			l = capnp.List(capnp.NewVoidList(e.seg, n))
		case 1:
			bl, err := capnp.NewBitList(e.seg, n)
			if err != nil {
				return capnp.Ptr{}, wrap(err)
			}
			for i, b := range bits {
				bl.Set(i, b != 0)
			}
			l = capnp.List(bl)
		case 8:
			ul, err := capnp.NewUInt8List(e.seg, n)
			if err != nil {
				return capnp.Ptr{}, wrap(err)
			}
			for i, b := range bits {
				ul.Set(i, uint8(b))
			}
			l = capnp.List(ul)
		case 16:
			ul, err := capnp.NewUInt16List(e.seg, n)
			if err != nil {
				return capnp.Ptr{}, wrap(err)
			}
			for i, b := range bits {
				ul.Set(i, uint16(b))
			}
			l = capnp.List(ul)
		case 32:
			ul, err := capnp.NewUInt32List(e.seg, n)
			if err != nil {
				return capnp.Ptr{}, wrap(err)
			}
			for i, b := range bits {
				ul.Set(i, uint32(b))
			}
			l = capnp.List(ul)
		default:
			ul, err := capnp.NewUInt64List(e.seg, n)
			if err != nil {
				return capnp.Ptr{}, wrap(err)
			}
			for i, b := range bits {
				ul.Set(i, b)
			}
			l = capnp.List(ul)
		}
		return l.ToPtr(), nil
	}
	if elem.Kind == schema.Type_Which_structType {
		if elem.Node == nil || elem.Node.Struct == nil {
			return capnp.Ptr{}, errAt(v.pos, "struct type @0x%016x is not in the schema", elem.ID)
		}
		l, err := capnp.NewCompositeList(e.seg, elem.Node.ObjectSize(), n)
		if err != nil {
			return capnp.Ptr{}, wrap(err)
		}
		for i, ev := range v.elems {
			if err := e.fields(l.Struct(i), elem.Node, ev, depth+1); err != nil {
				return capnp.Ptr{}, err
			}
		}
		return l.ToPtr(), nil
	}
	pl, err := capnp.NewPointerList(e.seg, n)
	if err != nil {
		return capnp.Ptr{}, wrap(err)
	}
	for i, ev := range v.elems {
		p, err := e.pointer(elem, ev, depth+1)
		if err != nil {
			return capnp.Ptr{}, err
		}
		if err := pl.Set(i, p); err != nil {
			return capnp.Ptr{}, wrap(err)
		}
	}
	return capnp.List(pl).ToPtr(), nil
}
