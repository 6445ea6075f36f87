package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/adapters/netstack"
	"github.com/captp-go/captp/adapters/secure"
	"github.com/captp-go/captp/adapters/unix"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/sturdyref"
	"github.com/captp-go/captp/internal/capnptext"
	"github.com/captp-go/captp/internal/sample"
)

func setupCall(fs *flag.FlagSet) func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	identity := fs.String("identity", "", "PEM `file` with this client's key (default: a throwaway key)")
	timeout := fs.Duration("timeout", 30*time.Second, "give up after this long")
	wait := fs.Bool("wait", false, "if the vat is not reachable, keep retrying (with backoff) until -timeout; a lost connection is redialled")
	var schemas, imports stringList
	fs.Var(&schemas, "schema", "a `file.capnp` declaring the interface to call (repeatable; may also follow the arguments)")
	fs.Var(&imports, "I", "an import `dir` for -schema files (repeatable; go-capnp's std directory is always searched)")
	fs.Usage = func() {
		out := fs.Output()
		fmt.Fprintf(out, `usage: captp call [flags] ADDR|capnp://… METHOD [ARGS]
       captp call [flags] ADDR|capnp://… Interface.method ['(params)' [.pipelined().path()]] -schema file.capnp

Call one method on a live vat and print the result. ADDR is a plain
(insecure) vat address: unix:/path, unix-abstract:name or host:port, whose
bootstrap capability is called; a sturdy ref (capnp://…) is restored first.

With -schema, METHOD is Interface.method (or a bare method name when only
one interface has it), params are in Cap'n Proto text form, and a path of
further calls on capabilities in the results is pipelined: every call goes
out before any answer comes back. For example:

	captp call unix:/run/fs.sock Dir.open '(name = "a")' '.read(n = 10)' -schema fs.capnp
	captp call unix:/run/fs.sock 'Dir.open(name = "a").read(n = 10)' -schema fs.capnp

Without -schema, the methods of captp serve's sample services:
`)
		for _, m := range sampleSchema.methods() {
			fmt.Fprintf(out, "\t%s\n", m)
		}
		fmt.Fprintf(out, "\nFlags:\n")
		fs.PrintDefaults()
	}
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
		// Go's flag package stops at the first argument; the schema
		// flags may also come after them.
		args, err := takeTrailingFlags(args, map[string]*stringList{"schema": &schemas, "I": &imports})
		if err != nil {
			return usageError{err}
		}
		if len(args) < 2 {
			return usageError{errors.New("want an address or sturdy ref URI, and a method")}
		}
		var inv invoker = sampleSchema
		if len(schemas) > 0 {
			sch, err := capnptext.Load(ctx, &capnptext.LoadOptions{ImportPaths: append(capnptext.DefaultImportPaths(), imports...)}, schemas...)
			if err != nil {
				return fmt.Errorf("load the schema: %w", err)
			}
			inv = schemaInvoker{sch}
		}
		if !strings.Contains(args[0], "://") {
			// A plain address: its bootstrap capability, no TLS.
			ctx, cancel := context.WithTimeout(ctx, *timeout)
			defer cancel()
			out, err := callAddr(ctx, args[0], inv, args[1], args[2:])
			if err != nil {
				return err
			}
			fmt.Fprintln(stdout, out)
			return nil
		}
		ref, err := sturdyref.Parse(args[0])
		if err != nil {
			return usageError{err}
		}
		var id *secure.Identity
		if *identity != "" {
			data, err := os.ReadFile(*identity)
			if err != nil {
				return err
			}
			if id, err = secure.FromPEM(data); err != nil {
				return err
			}
		}
		ctx, cancel := context.WithTimeout(ctx, *timeout)
		defer cancel()
		out, err := runCall(ctx, ref, id, *wait, inv, args[1], args[2:])
		if err != nil {
			return err
		}
		fmt.Fprintln(stdout, out)
		return nil
	}
}

// An invoker calls a method by name with text arguments and renders the
// results as text. sampleSchema knows the sample services; a --schema flag
// can supply another (generic, schema-driven) one.
type invoker interface {
	invoke(ctx context.Context, c capnp.Client, method string, args []string) (string, error)
	// check reports a bad method or arguments before anything is dialled.
	check(method string, args []string) error
	methods() []string
}

// sturdyDialer dials a ref over the transport it names.
func sturdyDialer(id *secure.Identity) sturdyref.Dialer {
	return func(ctx context.Context, ref sturdyref.Ref) (*core.Conn, error) {
		switch ref.Address.Transport {
		case sturdyref.TCP:
			return unix.DialSturdy(ctx, ref, id, nil)
		case sturdyref.Guest:
			return netstack.DialGuest(ctx, ref, &netstack.GuestOptions{Identity: id})
		default:
			return nil, fmt.Errorf("%s refs name a vat on a userspace network inside another process; dial it from a process on that network (or through its guest link: capnp+guest://)", ref.Address.Transport)
		}
	}
}

// runCall restores ref and calls method on it once; with wait, dials are
// retried and a call that fails with the connection is made again.
func runCall(ctx context.Context, ref sturdyref.Ref, id *secure.Identity, wait bool, inv invoker, method string, args []string) (string, error) {
	if err := inv.check(method, args); err != nil {
		return "", err
	}
	dial := sturdyDialer(id)
	var out string
	call := func(ctx context.Context, c capnp.Client) (err error) {
		out, err = inv.invoke(ctx, c, method, args)
		return err
	}
	if wait {
		rc := sturdyref.NewReconnecting(ref, dial, nil)
		defer rc.Close()
		return out, rc.Do(ctx, call)
	}
	conn, err := dial(ctx, ref)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	c := conn.Restore(ctx, ref.ServiceID)
	defer c.Release()
	return out, call(ctx, c)
}

// callAddr calls method on the bootstrap capability of the vat at addr
// (adapters/unix address forms, no TLS).
func callAddr(ctx context.Context, addr string, inv invoker, method string, args []string) (string, error) {
	if err := inv.check(method, args); err != nil {
		return "", err
	}
	conn, err := unix.Dial(ctx, addr, nil)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	c := conn.Bootstrap(ctx)
	defer c.Release()
	return inv.invoke(ctx, c, method, args)
}

// schemaInvoker calls any method of a schema loaded at run time, with
// parameters and results in Cap'n Proto text form (internal/capnptext).
type schemaInvoker struct{ sch *capnptext.Schema }

// steps parses METHOD [PARAMS [PATH]], or a whole chain in METHOD.
func (s schemaInvoker) steps(method string, args []string) ([]*capnptext.Step, error) {
	if len(args) > 2 {
		return nil, fmt.Errorf("want at most parameters and a path after %s, got %d arguments", method, len(args))
	}
	if strings.Contains(method, "(") {
		if len(args) > 0 {
			return nil, fmt.Errorf("%s already has its parameters; quote the whole chain as one argument", method)
		}
		return s.sch.ParseChain(method)
	}
	var params, path string
	if len(args) > 0 {
		params = args[0]
	}
	if len(args) > 1 {
		path = args[1]
	}
	return s.sch.Chain(method, params, path)
}

func (s schemaInvoker) check(method string, args []string) error {
	steps, err := s.steps(method, args)
	if err == nil {
		err = capnptext.CheckSteps(steps)
	}
	if err != nil {
		return usageError{err}
	}
	return nil
}

func (s schemaInvoker) invoke(ctx context.Context, c capnp.Client, method string, args []string) (string, error) {
	steps, err := s.steps(method, args)
	if err != nil {
		return "", usageError{err}
	}
	res, release, err := capnptext.Invoke(ctx, c, steps)
	if err != nil {
		return "", err
	}
	defer release()
	return capnptext.Format(res, steps[len(steps)-1].Method.Results)
}

func (s schemaInvoker) methods() []string {
	var out []string
	for _, iface := range s.sch.Interfaces() {
		for _, m := range iface.Methods() {
			out = append(out, iface.ShortName+"."+m.Name)
		}
	}
	return out
}

// stringList is a repeatable string flag.
type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, ",") }
func (l *stringList) Set(s string) error { *l = append(*l, s); return nil }

// takeTrailingFlags removes "-name value" / "--name=value" pairs for the
// given flags from args (which the flag package left after the first
// positional argument) and records their values.
func takeTrailingFlags(args []string, flags map[string]*stringList) ([]string, error) {
	var rest []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		name, value, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		l, ok := flags[name]
		if !strings.HasPrefix(a, "-") || !ok {
			rest = append(rest, a)
			continue
		}
		if !hasValue {
			if i+1 == len(args) {
				return nil, fmt.Errorf("flag %s needs a value", a)
			}
			i++
			value = args[i]
		}
		l.Set(value)
	}
	return rest, nil
}

type sampleInvoker map[string]sampleMethod

type sampleMethod struct {
	usage string
	nargs int
	call  func(ctx context.Context, c capnp.Client, args []string) (string, error)
}

var sampleSchema = sampleInvoker{
	"name": {"name            Echo.name()", 0, func(ctx context.Context, c capnp.Client, _ []string) (string, error) {
		f, release := sample.Echo(c).Name(ctx, nil)
		defer release()
		res, err := f.Struct()
		if err != nil {
			return "", err
		}
		return res.Name()
	}},
	"echo": {"echo TEXT       Echo.echo(text)", 1, func(ctx context.Context, c capnp.Client, args []string) (string, error) {
		f, release := sample.Echo(c).Echo(ctx, func(p sample.Echo_echo_Params) error { return p.SetText(args[0]) })
		defer release()
		res, err := f.Struct()
		if err != nil {
			return "", err
		}
		return res.Text()
	}},
	"add": {"add N           Counter.add(n): the new total", 1, func(ctx context.Context, c capnp.Client, args []string) (string, error) {
		n, err := strconv.ParseInt(args[0], 10, 64)
		if err != nil {
			return "", usageError{fmt.Errorf("add: %w", err)}
		}
		f, release := sample.Counter(c).Add(ctx, func(p sample.Counter_add_Params) error { p.SetN(n); return nil })
		defer release()
		res, err := f.Struct()
		if err != nil {
			return "", err
		}
		return strconv.FormatInt(res.Total(), 10), nil
	}},
	"get": {"get             Counter.get(): the total", 0, func(ctx context.Context, c capnp.Client, _ []string) (string, error) {
		f, release := sample.Counter(c).Get(ctx, nil)
		defer release()
		res, err := f.Struct()
		if err != nil {
			return "", err
		}
		return strconv.FormatInt(res.Total(), 10), nil
	}},
	"save": {"save            Persistent.save(): the capability's sturdy ref", 0, func(ctx context.Context, c capnp.Client, _ []string) (string, error) {
		ref, err := sturdyref.Save(ctx, c)
		if err != nil {
			return "", err
		}
		return ref.String(), nil
	}},
}

func (s sampleInvoker) check(method string, args []string) error {
	m, ok := s[method]
	if !ok {
		return usageError{fmt.Errorf("unknown method %q (want one of %s)", method, strings.Join(s.names(), ", "))}
	}
	if len(args) != m.nargs {
		return usageError{fmt.Errorf("%s takes %d argument(s), got %d", method, m.nargs, len(args))}
	}
	return nil
}

func (s sampleInvoker) invoke(ctx context.Context, c capnp.Client, method string, args []string) (string, error) {
	if err := s.check(method, args); err != nil {
		return "", err
	}
	return s[method].call(ctx, c, args)
}

func (s sampleInvoker) names() []string {
	var ns []string
	for n := range s {
		ns = append(ns, n)
	}
	sort.Strings(ns)
	return ns
}

func (s sampleInvoker) methods() []string {
	var us []string
	for _, n := range s.names() {
		us = append(us, s[n].usage)
	}
	return us
}
