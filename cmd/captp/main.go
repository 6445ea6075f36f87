// Command captp is the command-line tool of the captp project, a Go
// implementation of CapTP as specified by Cap'n Proto RPC.
//
// Usage:
//
//	captp <command> [flags]
//
// Commands:
//
//	demo    run a unikernel group (a host vat on a Unix socket, vats on a netstack network, a TamaGo guest in QEMU when available) and narrate what happens
//	bench   compare captp with go-capnp, the C++ reference and the raw socket floor
//	host    boot TamaGo guest vats in QEMU (one, or a group on one Ethernet segment) and re-serve their bootstrap capabilities on host sockets
//	serve   host sample services with persistent sturdy refs (capnp://…) over TLS with a vat identity
//	call    restore the capability a sturdy ref names and call a method on it
//	inspect show a running vat's connections and their tables (questions, answers, imports, exports, embargoes)
//	help    show help for captp or for one command
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
)

// command is one subcommand.
type command struct {
	name    string
	summary string
	// flags returns the command's flag set; run runs it with the parsed
	// flags and remaining arguments.
	setup func(fs *flag.FlagSet) (run func(ctx context.Context, args []string, stdout, stderr io.Writer) error)
}

var commands = []command{
	{name: "demo", summary: "run a unikernel group (a host vat on a Unix socket, vats on a netstack network, a TamaGo guest in QEMU when available) and narrate what happens", setup: setupDemo},
	{name: "bench", summary: "compare captp with go-capnp, the C++ reference and the raw socket floor", setup: setupBench},
	{name: "host", summary: "boot TamaGo guest vats in QEMU (one, or a group on one Ethernet segment) and re-serve their bootstrap capabilities on host sockets", setup: setupHost},
	{name: "serve", summary: "host sample services with persistent sturdy refs (capnp://…) over TLS with a vat identity", setup: setupServe},
	{name: "call", summary: "restore the capability a sturdy ref names and call a method on it", setup: setupCall},
	{name: "inspect", summary: "show a running vat's connections and their tables (questions, answers, imports, exports, embargoes)", setup: setupInspect},
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// Exit codes.
const (
	exitOK    = 0
	exitFail  = 1 // the command ran and failed
	exitUsage = 2 // bad command line
)

// run runs the captp command line args and returns the exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		usage(stderr)
		return exitUsage
	}
	name, rest := args[0], args[1:]
	switch name {
	case "help", "-h", "-help", "--help":
		if name == "help" && len(rest) > 0 {
			cmd, ok := lookup(rest[0])
			if !ok {
				fmt.Fprintf(stderr, "captp help: unknown command %q\n\n", rest[0])
				usage(stderr)
				return exitUsage
			}
			fs := newFlagSet(cmd, stdout)
			cmd.setup(fs)
			fs.Usage()
			return exitOK
		}
		usage(stdout)
		return exitOK
	}
	if name == benchServerCommand {
		// Hidden: the child process of captp bench.
		return runBenchServer(rest, stdout, stderr)
	}
	cmd, ok := lookup(name)
	if !ok {
		fmt.Fprintf(stderr, "captp: unknown command %q\n\n", name)
		usage(stderr)
		return exitUsage
	}
	// What Parse prints goes to stdout for -h/--help (asked for, exit 0)
	// and to stderr for a bad flag.
	var parseOut bytes.Buffer
	fs := newFlagSet(cmd, &parseOut)
	runCmd := cmd.setup(fs)
	err := fs.Parse(rest)
	fs.SetOutput(stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			stdout.Write(parseOut.Bytes())
			return exitOK
		}
		stderr.Write(parseOut.Bytes())
		return exitUsage // fs has printed the error and the usage
	}
	if err := runCmd(ctx, fs.Args(), stdout, stderr); err != nil {
		if errors.As(err, new(usageError)) {
			fmt.Fprintf(stderr, "captp %s: %v\n", cmd.name, err)
			fs.Usage()
			return exitUsage
		}
		fmt.Fprintf(stderr, "captp %s: FAILED: %v\n", cmd.name, err)
		return exitFail
	}
	return exitOK
}

// usageError is returned by a command for a bad command line.
type usageError struct{ error }

func lookup(name string) (command, bool) {
	for _, c := range commands {
		if c.name == name {
			return c, true
		}
	}
	return command{}, false
}

func newFlagSet(cmd command, out io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("captp "+cmd.name, flag.ContinueOnError)
	fs.SetOutput(out)
	fs.Usage = func() {
		out := fs.Output()
		fmt.Fprintf(out, "usage: captp %s [flags]\n\n%s.\n", cmd.name, upperFirst(cmd.summary))
		var b strings.Builder
		fs.SetOutput(&b)
		fs.PrintDefaults()
		fs.SetOutput(out)
		if b.Len() > 0 {
			fmt.Fprintf(out, "\nFlags:\n%s", b.String())
		}
	}
	return fs
}

func usage(w io.Writer) {
	fmt.Fprint(w, "captp is a Go implementation of CapTP (Cap'n Proto RPC).\n\n")
	fmt.Fprint(w, "Usage:\n\n\tcaptp <command> [flags]\n\nCommands:\n\n")
	for _, c := range commands {
		fmt.Fprintf(w, "\t%-8s%s\n", c.name, c.summary)
	}
	fmt.Fprintf(w, "\t%-8s%s\n", "help", "show this help, or a command's flags: captp help <command>")
	fmt.Fprintln(w)
}

func upperFirst(s string) string {
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + s[1:]
}
