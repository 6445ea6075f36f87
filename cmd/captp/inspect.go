package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/adapters/secure"
	"github.com/captp-go/captp/adapters/unix"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/inspect"
	"github.com/captp-go/captp/core/sturdyref"
)

// howToAllow is the advice every "not allowed" error ends with.
const howToAllow = "start the vat with 'captp serve -inspect' and pass the inspect sturdy ref it prints (also in DIR/inspect.cap)"

func setupInspect(fs *flag.FlagSet) func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	identity := fs.String("identity", "", "PEM `file` with this client's key (default: a throwaway key)")
	timeout := fs.Duration("timeout", 30*time.Second, "give up on connecting, and on each report, after this long")
	asJSON := fs.Bool("json", false, "print the report as JSON (with -watch: one JSON object per line)")
	watch := fs.Duration("watch", 0, "print a new report every `interval` (for example 2s) until interrupted")
	maxEntries := fs.Int("max", 100, "list at most `n` entries per table of each connection (the counts are always complete; 0: the vat's limit)")
	fs.Usage = func() {
		out := fs.Output()
		fmt.Fprint(out, `usage: captp inspect [flags] capnp://…|FILE.cap|ADDR

Connect to a running vat that allows inspection and show its connections
and their tables: the questions (our calls awaiting a Return), answers
(the peer's calls), imports and exports (capabilities held across the
connection, with their reference counts), embargoes and Level 3 state,
with queued bytes and flow control: the view for hunting leaks.

Inspection is a capability: 'captp serve -inspect' serves it under a
sturdy ref of its own, printed as "inspect capnp://…" and kept in
DIR/inspect.cap (pass the URI or the file). A plain ADDR (unix:/path,
host:port, no TLS) works for a vat whose bootstrap capability is an
Inspector (package core/inspect). The inspector's own connection is
listed too.

Flags:
`)
		fs.PrintDefaults()
	}
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
		// Go's flag package stops at the first argument; flags may also
		// follow the ref (captp inspect REF -watch 2s).
		if len(args) > 1 {
			out := fs.Output()
			var msg strings.Builder
			fs.SetOutput(&msg)
			err := fs.Parse(args[1:])
			fs.SetOutput(out)
			switch {
			case errors.Is(err, flag.ErrHelp):
				fs.SetOutput(stdout)
				fs.Usage()
				return nil
			case err != nil:
				return usageError{err}
			}
			args = append([]string{args[0]}, fs.Args()...)
		}
		if len(args) != 1 {
			return usageError{errors.New("want one sturdy ref (capnp://…), .cap file or address")}
		}
		if *watch < 0 || *maxEntries < 0 {
			return usageError{errors.New("-watch and -max must not be negative")}
		}
		var id *secure.Identity
		if *identity != "" {
			data, err := os.ReadFile(*identity)
			if err != nil {
				return fmt.Errorf("read the identity: %w", err)
			}
			if id, err = secure.FromPEM(data); err != nil {
				return fmt.Errorf("identity %s: %w", *identity, err)
			}
		}
		target, err := parseInspectTarget(args[0])
		if err != nil {
			return err
		}
		dctx, cancel := context.WithTimeout(ctx, *timeout)
		conn, in, err := dialInspector(dctx, target, id)
		cancel()
		if err != nil {
			return err
		}
		defer conn.Close()
		defer in.Release()
		redraw := *watch > 0 && !*asJSON && isTerminal(stdout)
		for {
			fctx, cancel := context.WithTimeout(ctx, *timeout)
			rep, err := inspect.Fetch(fctx, in, *maxEntries)
			cancel()
			if err != nil {
				if ctx.Err() != nil && *watch > 0 {
					return nil // interrupted while watching: a normal end
				}
				return explainInspectErr(target, err)
			}
			if redraw {
				fmt.Fprint(stdout, "\x1b[H\x1b[2J")
			}
			if *asJSON {
				enc := json.NewEncoder(stdout)
				if *watch == 0 {
					enc.SetIndent("", "  ")
				}
				if err := enc.Encode(rep); err != nil {
					return err
				}
			} else {
				printReport(stdout, rep)
			}
			if *watch == 0 {
				return nil
			}
			if !redraw && !*asJSON {
				fmt.Fprintln(stdout)
			}
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(*watch):
			}
		}
	}
}

// inspectTarget is what captp inspect connects to: a sturdy ref, or a
// plain address whose bootstrap capability is asked.
type inspectTarget struct {
	ref  *sturdyref.Ref
	addr string
	from string // the .cap file the ref came from, if any
}

func (t inspectTarget) String() string {
	switch {
	case t.from != "":
		return t.from
	case t.ref != nil:
		return t.ref.Redacted()
	}
	return t.addr
}

func parseInspectTarget(arg string) (inspectTarget, error) {
	if strings.Contains(arg, "://") {
		ref, err := sturdyref.Parse(arg)
		if err != nil {
			return inspectTarget{}, usageError{err}
		}
		return inspectTarget{ref: &ref}, nil
	}
	if strings.HasSuffix(arg, ".cap") {
		data, err := os.ReadFile(arg)
		if err != nil {
			return inspectTarget{}, fmt.Errorf("read the sturdy ref: %w (%s)", err, howToAllow)
		}
		ref, err := sturdyref.Parse(strings.TrimSpace(string(data)))
		if err != nil {
			return inspectTarget{}, fmt.Errorf("%s: %w", arg, err)
		}
		return inspectTarget{ref: &ref, from: arg}, nil
	}
	return inspectTarget{addr: arg}, nil
}

// dialInspector connects to the target and returns the Inspector (a
// promise: errors show on the first call).
func dialInspector(ctx context.Context, t inspectTarget, id *secure.Identity) (*core.Conn, inspect.Inspector, error) {
	if t.ref == nil {
		conn, err := unix.Dial(ctx, t.addr, nil)
		if err != nil {
			return nil, inspect.Inspector{}, fmt.Errorf("cannot reach the vat at %s (is it running, and is that its address?): %w", t.addr, err)
		}
		// ctx ends when we return; the Bootstrap must outlive it.
		return conn, inspect.Inspector(conn.Bootstrap(context.WithoutCancel(ctx))), nil
	}
	conn, err := sturdyDialer(id)(ctx, *t.ref)
	if err != nil {
		var fe *secure.FingerprintError
		if errors.As(err, &fe) {
			return nil, inspect.Inspector{}, fmt.Errorf("the vat at %s is not the one the sturdy ref names (another key answers there): %w", t, err)
		}
		return nil, inspect.Inspector{}, fmt.Errorf("cannot reach the vat of %s (is it running?): %w", t, err)
	}
	// The restore request ends with ctx; the capability does not.
	return conn, inspect.Inspector(conn.Restore(context.WithoutCancel(ctx), t.ref.ServiceID)), nil
}

// explainInspectErr turns a failed report into advice.
func explainInspectErr(t inspectTarget, err error) error {
	switch {
	case errors.Is(err, inspect.ErrNotInspector):
		return fmt.Errorf("the vat does not allow inspection through %s: that capability is not an Inspector; %s", t, howToAllow)
	case strings.Contains(err.Error(), "Unknown persistent service ID"):
		if t.ref == nil {
			return fmt.Errorf("the vat does not allow inspection through its bootstrap capability (it has none at %s); %s", t, howToAllow)
		}
		return fmt.Errorf("the vat does not allow inspection with this sturdy ref (unknown or revoked: a vat started without -inspect revokes it); %s", howToAllow)
	case capnp.IsDisconnected(err) && t.ref == nil:
		return fmt.Errorf("the vat at %s hung up: a vat started by captp serve speaks TLS, so pass the inspect sturdy ref it prints instead of its address (%s): %w", t, howToAllow, err)
	case capnp.IsDisconnected(err):
		return fmt.Errorf("lost the connection to the vat: %w", err)
	}
	return fmt.Errorf("inspect %s: %w", t, err)
}

// isTerminal reports whether w is a terminal (-watch redraws it in place).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// printReport writes rep for people: the vat, then per connection its
// counts and a table per non-empty table.
func printReport(w io.Writer, rep inspect.Report) {
	v := rep.Vat
	name := printable(v.Name)
	if name == "" {
		name = "vat"
	}
	fmt.Fprintf(w, "%s: up %s, %d connection%s", name, roundDur(v.Now.Sub(v.StartedAt)), v.Connections, sIfMany(v.Connections))
	if v.Dropped > 0 {
		fmt.Fprintf(w, " (%d not tracked: the registry was full)", v.Dropped)
	}
	fmt.Fprintln(w)
	if v.Level3 != nil {
		fmt.Fprintf(w, "level 3: %d provisions, %d early accepts\n", v.Level3.Provisions, v.Level3.EarlyAccepts)
	}
	for _, c := range rep.Conns {
		s := c.Snapshot
		fmt.Fprintf(w, "\nconnection #%d  peer %s  age %s", c.ID, printable(c.Label), roundDur(v.Now.Sub(c.Since)))
		if s.Closing {
			fmt.Fprint(w, "  CLOSING")
		}
		fmt.Fprintln(w)
		if s.Err != "" {
			fmt.Fprintf(w, "  ended: %s\n", printable(s.Err))
		}
		fmt.Fprintf(w, "  %s  in progress=%d  queued=%s  inbound held=%s  flow in flight=%s (peak %s, %d waiting)",
			s.Stats, s.InProgress, bytesStr(int64(s.QueuedBytes)), bytesStr(s.InboundHeldBytes),
			bytesStr(int64(s.Flow.InFlight)), bytesStr(int64(s.Flow.PeakInFlight)), s.Flow.Waiting)
		if s.Handoffs > 0 {
			fmt.Fprintf(w, "  handoffs=%d", s.Handoffs)
		}
		fmt.Fprintln(w)
		section(w, "questions (our calls awaiting the peer)", len(s.Questions), s.Stats.Questions, "ID\tSTATE\tMETHOD\tPIPELINED", func(tw io.Writer) {
			for _, q := range s.Questions {
				m := printable(q.Method)
				if q.Bootstrap {
					m = "(bootstrap)"
				}
				fmt.Fprintf(tw, "%d\t%s\t%s\t%d\n", q.ID, q.State(), m, q.Pipelined)
			}
		})
		section(w, "answers (the peer's calls to us)", len(s.Answers), s.Stats.Answers, "ID\tSTATE\tQUEUED\tARGS\tLEVEL 3", func(tw io.Writer) {
			for _, a := range s.Answers {
				l3 := ""
				if a.Provide {
					l3 = "provide"
				} else if a.Accept {
					l3 = "accept"
				}
				fmt.Fprintf(tw, "%d\t%s\t%d\t%s\t%s\n", a.ID, a.State(), a.Queued, bytesStr(a.ArgsBytes), l3)
			}
		})
		section(w, "imports (the peer's capabilities we hold)", len(s.Imports), s.Stats.Imports, "ID\tREFS\tCLIENTS\tKIND\tWINDOW\tIN FLIGHT", func(tw io.Writer) {
			for _, im := range s.Imports {
				win, fl := "-", "-"
				if im.Flow != nil {
					win, fl = bytesStr(int64(im.Flow.Window)), bytesStr(int64(im.Flow.InFlight))
				}
				fmt.Fprintf(tw, "%d\t%d\t%d\t%s\t%s\t%s\n", im.ID, im.Refs, im.Clients, capKind(im.Promise, im.Resolved, false, false), win, fl)
			}
		})
		section(w, "exports (our capabilities the peer holds)", len(s.Exports), s.Stats.Exports, "ID\tREFS\tKIND\tWHAT", func(tw io.Writer) {
			for _, e := range s.Exports {
				fmt.Fprintf(tw, "%d\t%d\t%s\t%s\n", e.ID, e.Refs, capKind(e.Promise, e.Resolved, e.Vine, e.Loopback), printable(e.What))
			}
		})
		if len(s.Embargoes) > 0 {
			ids := make([]string, len(s.Embargoes))
			for i, e := range s.Embargoes {
				ids[i] = fmt.Sprint(e.ID)
			}
			fmt.Fprintf(w, "  embargoes: %s%s\n", strings.Join(ids, ", "), more(len(s.Embargoes), s.Stats.Embargoes))
		}
		if len(s.Provides) > 0 {
			ids := make([]string, len(s.Provides))
			for i, p := range s.Provides {
				ids[i] = fmt.Sprintf("q%d", p.QuestionID)
				if !p.Sent {
					ids[i] += " (unsent)"
				}
			}
			fmt.Fprintf(w, "  provides (level 3): %s\n", strings.Join(ids, ", "))
		}
	}
}

// printable replaces the control characters of a string the vat sent
// (a name, a label, an error): a hostile vat must not be able to move the
// cursor or clear the screen of the terminal the report is printed on.
func printable(s string) string {
	return strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return '?'
		}
		return r
	}, s)
}

// section prints one table of a connection, if it has entries.
func section(w io.Writer, title string, listed, total int, header string, rows func(io.Writer)) {
	if total == 0 {
		return
	}
	fmt.Fprintf(w, "  %s: %d%s\n", title, total, more(listed, total))
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "    %s\n", header)
	var b strings.Builder
	rows(&b)
	for _, line := range strings.SplitAfter(b.String(), "\n") {
		if line != "" {
			fmt.Fprintf(tw, "    %s", line)
		}
	}
	tw.Flush()
}

func more(listed, total int) string {
	if listed < total {
		return fmt.Sprintf(" (first %d listed; raise -max)", listed)
	}
	return ""
}

func capKind(promise, resolved, vine, loopback bool) string {
	var k []string
	switch {
	case promise && resolved:
		k = append(k, "promise (resolved)")
	case promise:
		k = append(k, "promise")
	default:
		k = append(k, "capability")
	}
	if vine {
		k = append(k, "vine")
	}
	if loopback {
		k = append(k, "loopback")
	}
	return strings.Join(k, ", ")
}

func sIfMany(n int) string {
	if n == 1 {
		return ""
	}
	return "s"
}

func roundDur(d time.Duration) time.Duration {
	switch {
	case d < 0:
		return 0
	case d < time.Second:
		return d.Round(time.Millisecond)
	}
	return d.Round(100 * time.Millisecond)
}

func bytesStr(n int64) string {
	switch {
	case n < 1<<10:
		return fmt.Sprintf("%d B", n)
	case n < 1<<20:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
}
