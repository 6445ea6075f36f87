package capnptext

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

// TextError is an error in Cap'n Proto text: a syntax error, or a value
// that does not fit the schema. Line and Col are 1-based and point into the
// text given (Col counts bytes).
type TextError struct {
	Line, Col int
	Msg       string
	// Err is an underlying sentinel such as ErrCapabilityInText, or nil.
	Err error
}

// Error returns "line:col: message".
func (e *TextError) Error() string { return fmt.Sprintf("%d:%d: %s", e.Line, e.Col, e.Msg) }

// Unwrap returns e.Err.
func (e *TextError) Unwrap() error { return e.Err }

// pos is a position in the text.
type pos struct{ line, col int }

func errAt(p pos, format string, args ...any) *TextError {
	return &TextError{Line: p.line, Col: p.col, Msg: fmt.Sprintf(format, args...)}
}

// quietNaN is the NaN capnp's tools write for "nan" (math.NaN() has
// another payload).
var quietNaN = math.Float64frombits(0x7ff8000000000000)

type tokKind uint8

const (
	tokEOF tokKind = iota
	tokIdent
	tokInt    // integer literal: mag
	tokFloat  // float literal: f
	tokString // "..." : bytes
	tokData   // 0x"..." : bytes
	tokPunct  // one of ( ) [ ] = , - .
)

type token struct {
	kind  tokKind
	pos   pos
	text  string // identifier name, punctuation, or the literal's source
	mag   uint64
	f     float64
	bytes []byte
}

func (t token) String() string {
	switch t.kind {
	case tokEOF:
		return "end of text"
	case tokString, tokData:
		return "string " + t.text
	}
	return strconv.Quote(t.text)
}

// lexer splits text into tokens, tracking line and column.
type lexer struct {
	src       string
	i         int
	line, col int
}

func newLexer(src string) *lexer { return &lexer{src: src, line: 1, col: 1} }

func (l *lexer) advance(n int) {
	for k := 0; k < n && l.i < len(l.src); k++ {
		if l.src[l.i] == '\n' {
			l.line++
			l.col = 1
		} else {
			l.col++
		}
		l.i++
	}
}

func (l *lexer) pos() pos { return pos{l.line, l.col} }

func isIdentStart(c byte) bool { return c == '_' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' }
func isDigit(c byte) bool      { return c >= '0' && c <= '9' }
func isIdentChar(c byte) bool  { return isIdentStart(c) || isDigit(c) }
func hexVal(c byte) int {
	switch {
	case c >= '0' && c <= '9':
		return int(c - '0')
	case c >= 'a' && c <= 'f':
		return int(c-'a') + 10
	case c >= 'A' && c <= 'F':
		return int(c-'A') + 10
	}
	return -1
}

// next returns the next token.
func (l *lexer) next() (token, error) {
	for l.i < len(l.src) {
		c := l.src[l.i]
		if c == ' ' || c == '\t' || c == '\r' || c == '\n' {
			l.advance(1)
			continue
		}
		if c == '#' {
			for l.i < len(l.src) && l.src[l.i] != '\n' {
				l.advance(1)
			}
			continue
		}
		break
	}
	p := l.pos()
	if l.i >= len(l.src) {
		return token{kind: tokEOF, pos: p}, nil
	}
	c := l.src[l.i]
	switch {
	case strings.IndexByte("()[]=,-.", c) >= 0:
		l.advance(1)
		return token{kind: tokPunct, pos: p, text: string(c)}, nil
	case isIdentStart(c):
		start := l.i
		for l.i < len(l.src) && isIdentChar(l.src[l.i]) {
			l.advance(1)
		}
		return token{kind: tokIdent, pos: p, text: l.src[start:l.i]}, nil
	case c == '"':
		b, err := l.quoted()
		if err != nil {
			return token{}, err
		}
		return token{kind: tokString, pos: p, text: strconv.Quote(string(b)), bytes: b}, nil
	case isDigit(c):
		return l.number()
	}
	return token{}, errAt(p, "unexpected character %q", rune(c))
}

// quoted reads a "..." literal with C escapes (\a \b \f \n \r \t \v \\ \'
// \" \? \xHH \NNN).
func (l *lexer) quoted() ([]byte, error) {
	start := l.pos()
	l.advance(1)
	var out []byte
	for {
		if l.i >= len(l.src) {
			return nil, errAt(start, "unterminated string")
		}
		c := l.src[l.i]
		if c == '"' {
			l.advance(1)
			return out, nil
		}
		if c != '\\' {
			out = append(out, c)
			l.advance(1)
			continue
		}
		ep := l.pos()
		l.advance(1)
		if l.i >= len(l.src) {
			return nil, errAt(start, "unterminated string")
		}
		e := l.src[l.i]
		l.advance(1)
		switch e {
		case 'a':
			out = append(out, '\a')
		case 'b':
			out = append(out, '\b')
		case 'f':
			out = append(out, '\f')
		case 'n':
			out = append(out, '\n')
		case 'r':
			out = append(out, '\r')
		case 't':
			out = append(out, '\t')
		case 'v':
			out = append(out, '\v')
		case '\\', '\'', '"', '?':
			out = append(out, e)
		case 'x':
			v, n := 0, 0
			for n < 2 && l.i < len(l.src) && hexVal(l.src[l.i]) >= 0 {
				v = v*16 + hexVal(l.src[l.i])
				l.advance(1)
				n++
			}
			if n == 0 {
				return nil, errAt(ep, `\x escape without hex digits`)
			}
			out = append(out, byte(v))
		default:
			if e < '0' || e > '7' {
				return nil, errAt(ep, "unknown escape \\%c", rune(e))
			}
			v := int(e - '0')
			for n := 1; n < 3 && l.i < len(l.src) && l.src[l.i] >= '0' && l.src[l.i] <= '7'; n++ {
				v = v*8 + int(l.src[l.i]-'0')
				l.advance(1)
			}
			if v > 0xff {
				return nil, errAt(ep, "octal escape \\%o is more than a byte", v)
			}
			out = append(out, byte(v))
		}
	}
}

// number reads an integer (decimal, 0x hex, 0 octal), a float, or 0x"..".
func (l *lexer) number() (token, error) {
	p := l.pos()
	start := l.i
	src := l.src
	if strings.HasPrefix(src[l.i:], "0x\"") || strings.HasPrefix(src[l.i:], "0X\"") {
		l.advance(2)
		return l.hexData(p)
	}
	if strings.HasPrefix(src[l.i:], "0x") || strings.HasPrefix(src[l.i:], "0X") {
		l.advance(2)
		ds := l.i
		for l.i < len(src) && hexVal(src[l.i]) >= 0 {
			l.advance(1)
		}
		lit := src[start:l.i]
		if l.i == ds {
			return token{}, errAt(p, "hex literal %q has no digits", lit)
		}
		if l.i < len(src) && isIdentChar(src[l.i]) {
			return token{}, errAt(p, "bad hex literal %q", src[start:l.i+1])
		}
		v, err := strconv.ParseUint(src[ds:l.i], 16, 64)
		if err != nil {
			return token{}, errAt(p, "hex literal %s does not fit in 64 bits", lit)
		}
		return token{kind: tokInt, pos: p, text: lit, mag: v}, nil
	}
	for l.i < len(src) && isDigit(src[l.i]) {
		l.advance(1)
	}
	isFloat := false
	if l.i+1 < len(src) && src[l.i] == '.' && isDigit(src[l.i+1]) {
		isFloat = true
		l.advance(1)
		for l.i < len(src) && isDigit(src[l.i]) {
			l.advance(1)
		}
	}
	if l.i < len(src) && (src[l.i] == 'e' || src[l.i] == 'E') {
		j := l.i + 1
		if j < len(src) && (src[j] == '+' || src[j] == '-') {
			j++
		}
		if j < len(src) && isDigit(src[j]) {
			isFloat = true
			l.advance(j - l.i)
			for l.i < len(src) && isDigit(src[l.i]) {
				l.advance(1)
			}
		}
	}
	lit := src[start:l.i]
	if l.i < len(src) && isIdentChar(src[l.i]) {
		return token{}, errAt(p, "bad number %q", src[start:l.i+1])
	}
	if isFloat {
		f, err := strconv.ParseFloat(lit, 64)
		if err != nil && !isRangeErr(err) {
			return token{}, errAt(p, "bad float %q", lit)
		}
		return token{kind: tokFloat, pos: p, text: lit, f: f}, nil
	}
	base := 10
	digits := lit
	if len(lit) > 1 && lit[0] == '0' {
		base, digits = 8, lit[1:]
	}
	v, err := strconv.ParseUint(digits, base, 64)
	if err != nil {
		if isRangeErr(err) {
			return token{}, errAt(p, "integer %s does not fit in 64 bits", lit)
		}
		return token{}, errAt(p, "bad integer %q", lit)
	}
	return token{kind: tokInt, pos: p, text: lit, mag: v}, nil
}

func isRangeErr(err error) bool {
	ne, ok := err.(*strconv.NumError)
	return ok && ne.Err == strconv.ErrRange
}

// hexData reads the "..." of a 0x"..." literal: hex digit pairs, spaces
// allowed between bytes.
func (l *lexer) hexData(p pos) (token, error) {
	l.advance(1) // the quote
	var out []byte
	hi := -1
	for {
		if l.i >= len(l.src) {
			return token{}, errAt(p, "unterminated 0x\"...\" literal")
		}
		c := l.src[l.i]
		cp := l.pos()
		l.advance(1)
		switch {
		case c == '"':
			if hi >= 0 {
				return token{}, errAt(cp, "odd number of hex digits in 0x\"...\" literal")
			}
			return token{kind: tokData, pos: p, text: "0x\"...\"", bytes: out}, nil
		case c == ' ' || c == '\t' || c == '\n' || c == '\r':
			if hi >= 0 {
				return token{}, errAt(cp, "space inside a hex byte")
			}
		case hexVal(c) >= 0:
			if hi < 0 {
				hi = hexVal(c)
			} else {
				out = append(out, byte(hi<<4|hexVal(c)))
				hi = -1
			}
		default:
			return token{}, errAt(cp, "%q in 0x\"...\" literal (want hex digits)", rune(c))
		}
	}
}

type valKind uint8

const (
	valIdent  valKind = iota // true, false, void, inf, nan, an enumerant
	valInt                   // neg, mag
	valFloat                 // f
	valString                // bytes
	valData                  // bytes from 0x"..."
	valList                  // elems
	valStruct                // fields
)

// value is a parsed text-form value; what it means depends on the type it
// is assigned to.
type value struct {
	kind   valKind
	pos    pos
	ident  string
	neg    bool
	mag    uint64
	f      float64
	bytes  []byte
	elems  []*value
	fields []*assign
	// paren marks "(123)", capnp's form for an enum value without a name.
	paren bool
}

type assign struct {
	name string
	pos  pos
	val  *value
}

func (v *value) describe() string {
	switch v.kind {
	case valIdent:
		return v.ident
	case valInt:
		if v.neg && v.mag != 0 {
			return "-" + strconv.FormatUint(v.mag, 10)
		}
		return strconv.FormatUint(v.mag, 10)
	case valFloat:
		return strconv.FormatFloat(v.f, 'g', -1, 64)
	case valString:
		return "a string"
	case valData:
		return "a 0x\"...\" literal"
	case valList:
		return "a list"
	case valStruct:
		return "a struct literal"
	}
	return "a value"
}

// parser is a recursive-descent parser over the lexer with one token of
// lookahead.
type parser struct {
	lx  *lexer
	tok token
}

func newParser(src string) (*parser, error) {
	p := &parser{lx: newLexer(src)}
	if err := p.advance(); err != nil {
		return nil, err
	}
	return p, nil
}

func (p *parser) advance() error {
	t, err := p.lx.next()
	if err != nil {
		return err
	}
	p.tok = t
	return nil
}

func (p *parser) isPunct(s string) bool { return p.tok.kind == tokPunct && p.tok.text == s }

func (p *parser) expect(s string) error {
	if !p.isPunct(s) {
		return errAt(p.tok.pos, "expected %q, found %s", s, p.tok)
	}
	return p.advance()
}

// value parses one value.
func (p *parser) value(depth int) (*value, error) {
	if depth > maxNesting {
		return nil, errAt(p.tok.pos, "values nested more than %d deep", maxNesting)
	}
	t := p.tok
	switch t.kind {
	case tokIdent:
		return &value{kind: valIdent, pos: t.pos, ident: t.text}, p.advance()
	case tokInt:
		return &value{kind: valInt, pos: t.pos, mag: t.mag}, p.advance()
	case tokFloat:
		return &value{kind: valFloat, pos: t.pos, f: t.f}, p.advance()
	case tokString:
		return &value{kind: valString, pos: t.pos, bytes: t.bytes}, p.advance()
	case tokData:
		return &value{kind: valData, pos: t.pos, bytes: t.bytes}, p.advance()
	case tokPunct:
		switch t.text {
		case "-":
			if err := p.advance(); err != nil {
				return nil, err
			}
			n := p.tok
			switch {
			case n.kind == tokInt:
				return &value{kind: valInt, pos: t.pos, neg: true, mag: n.mag}, p.advance()
			case n.kind == tokFloat:
				return &value{kind: valFloat, pos: t.pos, f: -n.f}, p.advance()
			case n.kind == tokIdent && (n.text == "inf" || n.text == "nan"):
				f := math.Inf(-1)
				if n.text == "nan" {
					f = quietNaN
				}
				return &value{kind: valFloat, pos: t.pos, f: f}, p.advance()
			}
			return nil, errAt(n.pos, "expected a number after '-', found %s", n)
		case "[":
			return p.list(depth)
		case "(":
			return p.structLit(depth)
		}
	}
	return nil, errAt(t.pos, "expected a value, found %s", t)
}

func (p *parser) list(depth int) (*value, error) {
	v := &value{kind: valList, pos: p.tok.pos}
	if err := p.advance(); err != nil {
		return nil, err
	}
	for !p.isPunct("]") {
		e, err := p.value(depth + 1)
		if err != nil {
			return nil, err
		}
		v.elems = append(v.elems, e)
		if p.isPunct(",") {
			if err := p.advance(); err != nil {
				return nil, err
			}
			continue
		}
		if !p.isPunct("]") {
			return nil, errAt(p.tok.pos, "expected ',' or ']' in list, found %s", p.tok)
		}
	}
	return v, p.advance()
}

// structLit parses "(name = value, ...)" or capnp's "(123)" enum form.
func (p *parser) structLit(depth int) (*value, error) {
	v := &value{kind: valStruct, pos: p.tok.pos}
	if err := p.advance(); err != nil {
		return nil, err
	}
	if p.tok.kind == tokInt {
		v = &value{kind: valInt, pos: v.pos, mag: p.tok.mag, paren: true}
		if err := p.advance(); err != nil {
			return nil, err
		}
		return v, p.expect(")")
	}
	if err := p.fieldList(v, depth, ")"); err != nil {
		return nil, err
	}
	return v, p.expect(")")
}

// fieldList parses "name = value, ..." up to (not including) the closing
// punctuation end ("" for end of text).
func (p *parser) fieldList(v *value, depth int, end string) error {
	atEnd := func() bool {
		if end == "" {
			return p.tok.kind == tokEOF
		}
		return p.isPunct(end)
	}
	for !atEnd() {
		if p.tok.kind != tokIdent {
			return errAt(p.tok.pos, "expected a field name, found %s", p.tok)
		}
		a := &assign{name: p.tok.text, pos: p.tok.pos}
		if err := p.advance(); err != nil {
			return err
		}
		if err := p.expect("="); err != nil {
			return err
		}
		val, err := p.value(depth + 1)
		if err != nil {
			return err
		}
		a.val = val
		v.fields = append(v.fields, a)
		if p.isPunct(",") {
			if err := p.advance(); err != nil {
				return err
			}
			continue
		}
		if !atEnd() {
			want := "')'"
			if end == "" {
				want = "end of text"
			}
			return errAt(p.tok.pos, "expected ',' or %s after field %s, found %s", want, a.name, p.tok)
		}
	}
	return nil
}

// Literal is a parsed struct literal in Cap'n Proto text form, not yet
// checked against a schema. Parse once, encode as often as needed.
type Literal struct {
	v *value
}

// ParseLiteral parses a struct literal: "(a = 1, b = \"x\")". For
// convenience the parentheses may be left out ("a = 1, b = 2"), and empty
// text means "()". Syntax errors are *TextError values with line and
// column.
func ParseLiteral(text string) (*Literal, error) {
	p, err := newParser(text)
	if err != nil {
		return nil, err
	}
	var v *value
	switch {
	case p.tok.kind == tokEOF:
		v = &value{kind: valStruct, pos: p.tok.pos}
	case p.tok.kind == tokIdent:
		v = &value{kind: valStruct, pos: p.tok.pos}
		if err := p.fieldList(v, 0, ""); err != nil {
			return nil, err
		}
	case p.isPunct("("):
		if v, err = p.structLit(0); err != nil {
			return nil, err
		}
		if v.kind != valStruct {
			return nil, errAt(v.pos, "expected a struct literal, found (%d)", v.mag)
		}
	default:
		return nil, errAt(p.tok.pos, "expected a struct literal \"(field = value, ...)\", found %s", p.tok)
	}
	if p.tok.kind != tokEOF {
		return nil, errAt(p.tok.pos, "unexpected %s after the struct literal", p.tok)
	}
	return &Literal{v: v}, nil
}
