package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"

	"github.com/captp-go/captp/internal/bench"
)

func setupBench(fs *flag.FlagSet) func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	short := fs.Bool("short", false, "quick check: fewer calls and 3 repetitions, under a minute")
	asJSON := fs.Bool("json", false, "print the report as JSON instead of tables")
	out := fs.String("o", "", "also write the JSON report to `file`")
	reps := fs.Int("reps", 0, "repetitions of every measurement (default 5; 3 with -short)")
	impls := fs.String("impl", "", "comma-separated `list` of implementations: raw,captp,captp-native,go-capnp,c++ (default all; captp-native is captp through capnpc-captp's native stubs)")
	transports := fs.String("transport", "", "comma-separated `list` of transports: pipe,unix,unix-2proc,tcp,netstack (default all;\n"+
		"tcp and netstack make up the netstack section: kernel loopback TCP next to gVisor's userspace stack, raw and captp only)")
	noFlood := fs.Bool("noflood", false, "skip the flood of unread calls")
	profile := fs.String("profile", "", "write pprof CPU and allocation profiles of captp to `dir`")
	quiet := fs.Bool("q", false, "print no progress lines on stderr")
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
		if len(args) > 0 {
			return usageError{fmt.Errorf("unexpected arguments %q", args)}
		}
		cfg := bench.Config{Counts: bench.FullCounts(), NoFlood: *noFlood, ProfileDir: *profile}
		if *short {
			cfg.Counts = bench.ShortCounts()
		}
		if *reps > 0 {
			cfg.Counts.Reps = *reps
		}
		var err error
		if cfg.Impls, err = parseList(*impls, bench.AllImpls); err != nil {
			return usageError{fmt.Errorf("-impl: %w", err)}
		}
		if cfg.Transports, err = parseList(*transports, bench.AllTransports); err != nil {
			return usageError{fmt.Errorf("-transport: %w", err)}
		}
		if !*quiet {
			cfg.Progress = stderr
		}
		rep, err := bench.Run(ctx, cfg)
		if err != nil {
			return err
		}
		if *out != "" {
			f, err := os.Create(*out)
			if err != nil {
				return err
			}
			if err := rep.WriteJSON(f); err != nil {
				f.Close()
				return err
			}
			if err := f.Close(); err != nil {
				return err
			}
		}
		if *asJSON {
			return rep.WriteJSON(stdout)
		}
		return rep.WriteTable(stdout)
	}
}

// parseList parses a comma-separated list of names from all; empty means
// nil (all of them).
func parseList[T ~string](s string, all []T) ([]T, error) {
	if s == "" {
		return nil, nil
	}
	var list []T
	for _, name := range strings.Split(s, ",") {
		v := T(strings.TrimSpace(name))
		if !slices.Contains(all, v) {
			return nil, fmt.Errorf("unknown name %q (want one of %v)", v, all)
		}
		list = append(list, v)
	}
	return list, nil
}

// benchServerCommand is the hidden subcommand that runs the bench server.
const benchServerCommand = bench.ServerCommand

// runBenchServer runs the hidden `captp bench-server` command: the child
// process that `captp bench` starts to serve from another process.
func runBenchServer(args []string, stdout, stderr io.Writer) int {
	return bench.ServerMain(args, os.Stdin, stdout, stderr)
}
