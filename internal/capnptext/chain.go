package capnptext

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/std/capnp/schema"
)

// Step is one call of a pipelined chain such as
// `Dir.getFile(name = "a").size()`: the first step is called on the
// capability the caller holds, each later one on a capability in the
// previous step's results, without waiting for them (promise pipelining).
type Step struct {
	// Target is the interface the call is made on (the static type of the
	// capability); Method may be declared by one of its superclasses.
	Target *Node
	Method *Method
	// Params is the parsed parameter literal ("()" when none were given).
	Params *Literal
	// Transform locates, in the previous step's results, the capability
	// this step is called on; it is empty for the first step. With
	// go-capnp, call Future.Field(op.Field, op.DefaultValue) for each op
	// on the previous answer's Future, then .Client(); or pass Transform to
	// Answer.PipelineSend.
	Transform []capnp.PipelineOp
	// FieldPath names the result fields Transform follows, e.g.
	// ["info", "file"] (groups included, though they add no op).
	FieldPath []string
}

// ArgsSize is the size of the parameter struct, for capnp.Send.ArgsSize.
func (s *Step) ArgsSize() capnp.ObjectSize { return s.Method.Params.ObjectSize() }

// PlaceArgs encodes the parameters into dst; it has the signature of
// capnp.Send.PlaceArgs.
func (s *Step) PlaceArgs(dst capnp.Struct) error {
	if err := s.Params.Encode(dst, s.Method.Params); err != nil {
		return fmt.Errorf("%s params: %w", s.Method, err)
	}
	return nil
}

// Send returns the capnp.Send for this step.
func (s *Step) Send() capnp.Send {
	return capnp.Send{Method: s.Method.CapnpMethod(), ArgsSize: s.ArgsSize(), PlaceArgs: s.PlaceArgs}
}

// String returns the step in chain syntax, e.g. ".info.file.size()".
func (s *Step) String() string {
	var b strings.Builder
	for _, f := range s.FieldPath {
		b.WriteString("." + f)
	}
	b.WriteString("." + s.Method.Name + "(…)")
	return b.String()
}

// CheckSteps encodes every step's parameters into a scratch message, so that a
// bad literal is reported before anything is sent.
func CheckSteps(steps []*Step) error {
	for i, s := range steps {
		if _, err := s.Params.EncodeNew(s.Method.Params); err != nil {
			return fmt.Errorf("step %d (%s): %w", i+1, s.Method, err)
		}
	}
	return nil
}

// Chain builds the steps of a call: method ("Interface.method" or a bare
// unambiguous "method", as Resolve takes), its parameter literal (see
// ParseLiteral; "" for none), and a pipeline path continuing from its
// results, such as `.getFile(name = "a").size()` ("" for none). In the
// path, ".name(...)" calls a method on the capability in the current
// results (the only capability field, or the one selected), and ".name"
// without parentheses selects a field (a struct, group or capability) of
// the current results, or, if there is no such field, calls the method
// with no parameters. The path must end with a method call.
func (s *Schema) Chain(method, params, path string) ([]*Step, error) {
	target, m, err := s.resolveTarget(method)
	if err != nil {
		return nil, err
	}
	lit, err := ParseLiteral(params)
	if err != nil {
		return nil, fmt.Errorf("%s params: %w", m, err)
	}
	first := &Step{Target: target, Method: m, Params: lit}
	if strings.TrimSpace(path) == "" {
		return []*Step{first}, nil
	}
	p, err := newParser(path)
	if err != nil {
		return nil, fmt.Errorf("path: %w", err)
	}
	rest, err := s.path(p, first)
	if err != nil {
		return nil, fmt.Errorf("path: %w", err)
	}
	return append([]*Step{first}, rest...), nil
}

// ParseChain parses a whole chain in one string:
// `Interface.method(params).next(params).field.last()`. The head before
// the first "(" is the method as Resolve takes it; without parentheses the
// whole text is a method name called with no parameters.
func (s *Schema) ParseChain(expr string) ([]*Step, error) {
	i := strings.IndexByte(expr, '(')
	if i < 0 {
		return s.Chain(strings.TrimSpace(expr), "", "")
	}
	head := strings.TrimSpace(expr[:i])
	target, m, err := s.resolveTarget(head)
	if err != nil {
		return nil, err
	}
	p := &parser{lx: newLexer(expr)}
	p.lx.advance(i)
	if err := p.advance(); err != nil {
		return nil, err
	}
	v, err := p.structLit(0)
	if err != nil {
		return nil, fmt.Errorf("%s params: %w", m, err)
	}
	if v.kind != valStruct {
		return nil, fmt.Errorf("%s params: %w", m, errAt(v.pos, "expected a struct literal"))
	}
	first := &Step{Target: target, Method: m, Params: &Literal{v: v}}
	rest, err := s.path(p, first)
	if err != nil {
		return nil, err
	}
	return append([]*Step{first}, rest...), nil
}

// resolveTarget resolves "Iface.method" keeping the interface named (which
// may inherit the method) as the target.
func (s *Schema) resolveTarget(name string) (*Node, *Method, error) {
	m, err := s.Resolve(name)
	if err != nil {
		return nil, nil, err
	}
	target := m.Interface
	if dot := strings.LastIndexByte(name, '.'); dot >= 0 {
		if n, err := s.Lookup(name[:dot]); err == nil && n.Interface != nil {
			target = n
		}
	}
	return target, m, nil
}

// path parses path elements after prev until the end of the text.
func (s *Schema) path(p *parser, prev *Step) ([]*Step, error) {
	var steps []*Step
	cur := prev.Method.Results // struct node whose fields we are in
	var iface *Node            // set when a capability field was selected
	var ops []capnp.PipelineOp
	var names []string
	lastWasCall := true
	for p.tok.kind != tokEOF {
		if err := p.expect("."); err != nil {
			return nil, err
		}
		if p.tok.kind != tokIdent {
			return nil, errAt(p.tok.pos, "expected a method or field name after '.', found %s", p.tok)
		}
		name, at := p.tok.text, p.tok.pos
		if err := p.advance(); err != nil {
			return nil, err
		}
		explicit := p.isPunct("(")
		var f *Field
		if !explicit && iface == nil {
			f = fieldByName(cur.Struct, name)
		}
		if f != nil {
			// Field selection.
			names = append(names, name)
			if f.Group == nil && f.Offset > 0xffff {
				return nil, errAt(at, "field %s: pointer offset %d out of range (bad schema)", name, f.Offset)
			}
			switch {
			case f.Group != nil:
				cur = f.Group
			case f.Type.Kind == schema.Type_Which_structType && f.Type.Node != nil && f.Type.Node.Struct != nil:
				ops = append(ops, capnp.PipelineOp{Field: uint16(f.Offset)})
				cur = f.Type.Node
			case f.Type.Kind == schema.Type_Which_interface && f.Type.Node != nil && f.Type.Node.Interface != nil:
				ops = append(ops, capnp.PipelineOp{Field: uint16(f.Offset)})
				iface = f.Type.Node
			default:
				return nil, errAt(at, "field %s is %s; a path can only go through struct, group and capability fields", name, f.Type)
			}
			lastWasCall = false
			continue
		}
		st, err := s.pathCall(p, name, at, explicit, cur, iface, ops, names)
		if err != nil {
			return nil, err
		}
		steps = append(steps, st)
		cur, iface, ops, names = st.Method.Results, nil, nil, nil
		lastWasCall = true
	}
	if !lastWasCall {
		return nil, errAt(p.tok.pos, "the path ends in field %s; end it with a method call", strings.Join(names, "."))
	}
	return steps, nil
}

// pathCall parses a method call in a path: ".name(params)", or ".name"
// alone (explicit false: no parameters) when name is not a field. The call goes to iface
// if a capability was selected, else to the only capability in cur.
func (s *Schema) pathCall(p *parser, name string, at pos, explicit bool, cur, iface *Node, ops []capnp.PipelineOp, names []string) (*Step, error) {
	selected := iface != nil
	notField := func(err error) error {
		if explicit || selected {
			return err
		}
		msg := err.Error()
		var te *TextError
		if errors.As(err, &te) {
			msg = te.Msg
		}
		return errAt(at, "%s has no field %q (fields: %s), nor is it a method to call: %s", cur.ShortName, name, fieldNames(cur.Struct), msg)
	}
	v := &value{kind: valStruct, pos: at}
	if explicit {
		var err error
		if v, err = p.structLit(0); err != nil {
			return nil, err
		}
		if v.kind != valStruct {
			return nil, errAt(v.pos, "expected a parameter struct literal")
		}
	}
	if iface == nil {
		caps := capFields(cur, nil, 0)
		switch len(caps) {
		case 0:
			return nil, notField(errAt(at, "cannot call %s: %s holds no capability", name, cur.ShortName))
		case 1:
			c := caps[0]
			names = append(names, c.path...)
			ops = append(ops, capnp.PipelineOp{Field: uint16(c.field.Offset)})
			iface = c.field.Type.Node
		default:
			var ns []string
			for _, c := range caps {
				ns = append(ns, strings.Join(c.path, "."))
			}
			return nil, notField(errAt(at, "cannot call %s: %s holds several capabilities (%s); select one, e.g. .%s.%s()", name, cur.ShortName, strings.Join(ns, ", "), ns[0], name))
		}
	}
	if iface.Interface == nil {
		return nil, errAt(at, "cannot call %s: the capability's interface is not in the schema", name)
	}
	m, err := iface.Method(name)
	if err != nil {
		return nil, notField(errAt(at, "%v", err))
	}
	return &Step{Target: iface, Method: m, Params: &Literal{v: v}, Transform: ops, FieldPath: names}, nil
}

type capField struct {
	path  []string
	field *Field
}

// capFields lists the interface-typed fields of a struct, looking into its
// groups (which share the struct's pointer section) but not through
// pointers.
func capFields(n *Node, prefix []string, depth int) []capField {
	if depth > maxNesting || n == nil || n.Struct == nil {
		return nil
	}
	var out []capField
	for _, f := range n.Struct.Fields {
		path := append(append([]string(nil), prefix...), f.Name)
		switch {
		case f.Group != nil:
			out = append(out, capFields(f.Group, path, depth+1)...)
		case f.Type.Kind == schema.Type_Which_interface && f.Type.Node != nil && f.Offset <= 0xffff:
			out = append(out, capField{path: path, field: f})
		}
	}
	return out
}

// Invoke runs the steps on c with promise pipelining: every call is sent
// before any result is awaited, each later step on the capability its
// Transform selects in the previous step's (promised) results. It returns
// the last step's results, valid until release is called; release must be
// called (it is nil on error, when everything was already released).
func Invoke(ctx context.Context, c capnp.Client, steps []*Step) (results capnp.Struct, release capnp.ReleaseFunc, err error) {
	if len(steps) == 0 {
		return capnp.Struct{}, nil, errors.New("invoke: no steps")
	}
	var releases []capnp.ReleaseFunc
	release = func() {
		for i := len(releases) - 1; i >= 0; i-- {
			releases[i]()
		}
		releases = nil
	}
	target := c
	var ans *capnp.Answer
	for i, st := range steps {
		if i > 0 {
			fut := ans.Future()
			for _, op := range st.Transform {
				fut = fut.Field(op.Field, op.DefaultValue)
			}
			target = fut.Client() // borrowed from the answer
		}
		a, rel := target.SendCall(ctx, st.Send())
		releases = append(releases, rel)
		ans = a
	}
	res, err := ans.Struct()
	if err != nil {
		release()
		return capnp.Struct{}, nil, fmt.Errorf("%s: %w", steps[len(steps)-1].Method, err)
	}
	return res, release, nil
}
