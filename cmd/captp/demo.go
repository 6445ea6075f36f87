package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/exc"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"

	"github.com/captp-go/captp/adapters/unix"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

func setupDemo(fs *flag.FlagSet) func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	dir := fs.String("dir", "", "`directory` to create the socket vat.sock in (default: a new temporary directory, removed afterwards)")
	timeout := fs.Duration("timeout", 30*time.Second, "give up if the demo has not finished after this long")
	verbose := fs.Bool("v", false, "also log both vats' connection diagnostics to stderr")
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
		if len(args) > 0 {
			return usageError{fmt.Errorf("unexpected arguments %q", args)}
		}
		cfg := demoConfig{dir: *dir, timeout: *timeout}
		if *verbose {
			cfg.logger = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
		}
		return runDemo(ctx, stdout, cfg)
	}
}

type demoConfig struct {
	dir     string        // where the socket goes; "" means a new temporary directory
	timeout time.Duration // zero means 30s
	logger  *slog.Logger  // nil discards the vats' logs
}

// runDemo starts a server vat on a Unix socket, connects a client vat to
// it, exercises bootstrap, calls, pipelining, capability passing and
// exceptions, and narrates what happened on w. Counts of calls, round
// trips and messages come from a wire tap on the client's socket that
// decodes every RPC message (see wiretap); times are wall-clock.
//
// It returns an error if anything did not go as described.
func runDemo(ctx context.Context, w io.Writer, cfg demoConfig) (err error) {
	start := time.Now()
	if cfg.timeout <= 0 {
		cfg.timeout = 30 * time.Second
	}
	ctx, cancel := context.WithTimeoutCause(ctx, cfg.timeout,
		fmt.Errorf("demo did not finish within %v", cfg.timeout))
	defer cancel()
	logger := cfg.logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	say := func(format string, args ...any) { fmt.Fprintf(w, format+"\n", args...) }

	dir := cfg.dir
	if dir == "" {
		dir, err = os.MkdirTemp("", "captp-demo-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
	}
	addr := "unix:" + filepath.Join(dir, "vat.sock")
	say("captp demo — two vats over %s", addr)

	// The server vat: a Test object named "server" offered as the
	// bootstrap capability to every connection.
	lis, err := unix.Listen(addr)
	if err != nil {
		return err
	}
	serverLive := new(testimpl.Live)
	serverObj := testimpl.New("server", serverLive)
	serveCtx, stopServe := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() {
		served <- unix.Serve(serveCtx, lis, &core.Options{
			BootstrapClient: capnp.Client(serverObj.Client()),
			Logger:          logger.With("vat", "server"),
		})
	}()
	serverRunning := true
	stopServer := func() error {
		if !serverRunning {
			return nil
		}
		serverRunning = false
		stopServe()
		if err := <-served; !errors.Is(err, context.Canceled) {
			return fmt.Errorf("server: %w", err)
		}
		return nil
	}
	defer stopServer()
	say("[server] listening on %s; bootstrap capability: Test %q", addr, serverObj.Name())

	// The client vat. This is what unix.Dial does, with a wire tap
	// between the socket and the connection so the demo can report the
	// messages that really crossed.
	network, address, err := unix.ParseAddr(addr)
	if err != nil {
		return err
	}
	var dialer net.Dialer
	sock, err := dialer.DialContext(ctx, network, address)
	if err != nil {
		return fmt.Errorf("client: dial %s: %w", addr, err)
	}
	tap := newWiretap(sock)
	conn := core.NewConn(tap, &core.Options{Logger: logger.With("vat", "client")})
	connOpen := true
	closeConn := func() {
		if connOpen {
			connOpen = false
			conn.Close()
			<-conn.Done()
		}
	}
	defer closeConn()
	say("[client] connected")

	// Everything the client holds, released at the end (or on failure).
	var held []func()
	releaseAll := func() {
		for i := len(held) - 1; i >= 0; i-- {
			held[i]()
		}
		held = nil
	}
	defer releaseAll()

	step := func(do func() error) (stepReport, error) {
		mark, t0 := tap.mark(), time.Now()
		err := do()
		return analyse(tap.since(mark), time.Since(t0)), err
	}

	// 1. Bootstrap, and a call on the bootstrap capability.
	var boot testcapnp.Test
	var bootName string
	rep, err := step(func() error {
		boot = testcapnp.Test(conn.Bootstrap(ctx))
		held = append(held, boot.Release)
		bootName, err = callName(ctx, boot)
		return err
	})
	if err != nil {
		return fmt.Errorf("bootstrap().name(): %w", err)
	}
	if bootName != serverObj.Name() {
		return fmt.Errorf("bootstrap().name() = %q; want %q", bootName, serverObj.Name())
	}
	say("[client] bootstrap → Test %q  %s", bootName, rep.describe("bootstrap().name()"))

	// 2. A plain call.
	var echoed []byte
	rep, err = step(func() error {
		f, release := boot.Echo(ctx, func(p testcapnp.Test_echo_Params) error { return p.SetData([]byte("hello")) })
		defer release()
		res, err := f.Struct()
		if err != nil {
			return err
		}
		data, err := res.Data()
		echoed = bytes.Clone(data)
		return err
	})
	if err != nil {
		return fmt.Errorf("echo: %w", err)
	}
	if string(echoed) != "hello" {
		return fmt.Errorf("echo(%q) returned %q", "hello", echoed)
	}
	say("[client] echo(%q) → %q  %s", "hello", echoed, rep.describe("echo"))

	// 3. Promise pipelining: three calls, each on the result of the
	// previous one, without waiting for any answer.
	var pipelinedName string
	pipelined, err := step(func() error {
		fa, ra := boot.Child(ctx, setChildName("a"))
		defer ra()
		fb, rb := fa.Child().Child(ctx, setChildName("b"))
		defer rb()
		fn, rn := fb.Child().Name(ctx, nil)
		defer rn()
		res, err := fn.Struct()
		if err != nil {
			return err
		}
		pipelinedName, err = res.Name()
		return err
	})
	if err != nil {
		return fmt.Errorf("pipelined child(a).child(b).name(): %w", err)
	}
	if pipelinedName != "b" {
		return fmt.Errorf("pipelined child(a).child(b).name() = %q; want \"b\"", pipelinedName)
	}
	say("[client] pipelined child(%q).child(%q).name() → %q  %s", "a", "b", pipelinedName, pipelined.describe("chain"))

	// The same chain, waiting for each answer before the next call.
	var awaitedName string
	awaited, err := step(func() error {
		fa, ra := boot.Child(ctx, setChildName("a"))
		defer ra()
		resA, err := fa.Struct()
		if err != nil {
			return err
		}
		fb, rb := resA.Child().Child(ctx, setChildName("b"))
		defer rb()
		resB, err := fb.Struct()
		if err != nil {
			return err
		}
		awaitedName, err = callName(ctx, resB.Child())
		return err
	})
	if err != nil {
		return fmt.Errorf("awaited child(a).child(b).name(): %w", err)
	}
	if awaitedName != "b" {
		return fmt.Errorf("awaited child(a).child(b).name() = %q; want \"b\"", awaitedName)
	}
	say("[client] same chain awaiting each answer first → %q  %s", awaitedName, awaited.describe("chain"))

	// 4. Passing a capability: the client hands its own object to the
	// server, which calls it back.
	clientLive := new(testimpl.Live)
	clientObj := testimpl.New("client", clientLive)
	var calledBack []byte
	rep, err = step(func() error {
		cb := clientObj.Client()
		defer cb.Release()
		f, release := boot.CallBack(ctx, func(p testcapnp.Test_callBack_Params) error {
			if err := p.SetCb(cb.AddRef()); err != nil {
				return err
			}
			return p.SetData([]byte("ping"))
		})
		defer release()
		res, err := f.Struct()
		if err != nil {
			return err
		}
		data, err := res.Data()
		calledBack = bytes.Clone(data)
		return err
	})
	if err != nil {
		return fmt.Errorf("callBack: %w", err)
	}
	if string(calledBack) != "ping" {
		return fmt.Errorf("callBack(own object, %q) returned %q", "ping", calledBack)
	}
	say("[client] passed its own object to server.callBack → server called back: %q  %s",
		calledBack, rep.describe("callBack"))

	// 5. An exception crosses the wire with its type and reason.
	var failErr error
	rep, _ = step(func() error {
		f, release := boot.Fail(ctx, func(p testcapnp.Test_fail_Params) error {
			p.SetKind(testcapnp.ExceptionKind_overloaded)
			return p.SetReason("too busy")
		})
		defer release()
		_, failErr = f.Struct()
		return nil
	})
	switch {
	case failErr == nil:
		return errors.New("fail(overloaded) succeeded; want an overloaded error")
	case !exc.IsType(failErr, exc.Overloaded):
		return fmt.Errorf("fail(overloaded) returned %v, which is not an overloaded exception", failErr)
	case !strings.Contains(failErr.Error(), "too busy"):
		return fmt.Errorf("fail(overloaded, %q) lost its reason: %v", "too busy", failErr)
	}
	say("[client] fail(overloaded) → overloaded error: %q  %s", failErr.Error(), rep.describe("fail"))

	// 6. Release everything; the distributed GC must empty the tables.
	releaseAll()
	if err := clientLive.WaitZero(ctx); err != nil {
		return fmt.Errorf("the server never released the client's object (%d live): %w", clientLive.Count(), context.Cause(ctx))
	}
	// Serve itself keeps one reference to its bootstrap object.
	if err := serverLive.Wait(ctx, 1); err != nil {
		return fmt.Errorf("server objects still live after the client released everything: %d; want 1 (the bootstrap object): %w",
			serverLive.Count(), context.Cause(ctx))
	}
	stats := waitStatsZero(ctx, conn)
	say("[client] released everything; server objects alive: %d (its bootstrap object, which Serve keeps for the next client); client objects alive: %d",
		serverLive.Count(), clientLive.Count())
	say("")
	say("client connection tables (conn.Stats):")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "  questions\tanswers\timports\texports\tembargoes\t")
	fmt.Fprintf(tw, "  %d\t%d\t%d\t%d\t%d\t\n", stats.Questions, stats.Answers, stats.Imports, stats.Exports, stats.Embargoes)
	tw.Flush()
	var leak error
	if stats != (core.Stats{}) {
		leak = fmt.Errorf("client connection tables not empty after releasing everything: %+v", stats)
	}

	// 7. Shut down: the client hangs up, then the server stops.
	closeConn()
	if err := stopServer(); err != nil {
		return err
	}
	if err := serverLive.WaitZero(ctx); err != nil {
		return fmt.Errorf("%d server objects still live after the server stopped: %w", serverLive.Count(), context.Cause(ctx))
	}
	say("")
	say("messages on the wire (decoded by a tap on the client's socket):")
	printMessageCounts(w, messageCounts(tap.since(0)))
	say("(the call counts above come from the same tap: a pipelined call is addressed to the")
	say(" promised answer of an earlier call; round trips is the longest chain of calls each")
	say(" addressed to a capability returned by the one before)")
	say("")
	say("[client] hung up; [server] stopped; server objects alive: %d", serverLive.Count())
	if leak != nil {
		return leak
	}
	say("done in %v", time.Since(start).Round(100*time.Microsecond))
	return nil
}

func callName(ctx context.Context, c testcapnp.Test) (string, error) {
	f, release := c.Name(ctx, nil)
	defer release()
	res, err := f.Struct()
	if err != nil {
		return "", err
	}
	return res.Name()
}

func setChildName(name string) func(testcapnp.Test_child_Params) error {
	return func(p testcapnp.Test_child_Params) error { return p.SetName(name) }
}

// waitStatsZero waits up to a second for conn's tables to empty (the last
// Finish and Release messages are sent asynchronously) and returns the
// last stats it saw.
func waitStatsZero(ctx context.Context, conn *core.Conn) core.Stats {
	deadline := time.NewTimer(time.Second)
	defer deadline.Stop()
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for {
		s := conn.Stats()
		if s == (core.Stats{}) {
			return s
		}
		select {
		case <-tick.C:
		case <-deadline.C:
			return s
		case <-ctx.Done():
			return s
		}
	}
}

// describe renders a step's measurements, e.g. "(3 calls, 1 round trip, 0.4ms)".
func (r stepReport) describe(what string) string {
	var parts []string
	if r.calls != 1 {
		parts = append(parts, plural(r.calls, "call"))
	}
	if r.pipelined > 0 {
		parts = append(parts, fmt.Sprintf("%d pipelined", r.pipelined))
	}
	parts = append(parts, plural(r.roundTrips, "round trip"))
	if r.callsIn > 0 {
		parts = append(parts, "the server made "+plural(r.callsIn, "call")+" to the client")
	}
	parts = append(parts, fmtDuration(r.elapsed))
	return "(" + strings.Join(parts, ", ") + ")"
}

func plural(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return fmt.Sprintf("%d %ss", n, noun)
}

func fmtDuration(d time.Duration) string {
	if d < time.Millisecond {
		return fmt.Sprintf("%dµs", d.Microseconds())
	}
	return fmt.Sprintf("%.1fms", float64(d)/float64(time.Millisecond))
}

// messageOrder lists message kinds in the order the table shows them.
var messageOrder = []rpccp.Message_Which{
	rpccp.Message_Which_bootstrap,
	rpccp.Message_Which_call,
	rpccp.Message_Which_return,
	rpccp.Message_Which_finish,
	rpccp.Message_Which_resolve,
	rpccp.Message_Which_release,
	rpccp.Message_Which_disembargo,
	rpccp.Message_Which_abort,
	rpccp.Message_Which_unimplemented,
}

func printMessageCounts(w io.Writer, counts map[direction]map[rpccp.Message_Which]int) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "  message\tclient→server\tserver→client\t")
	shown := map[rpccp.Message_Which]bool{}
	row := func(k rpccp.Message_Which) {
		shown[k] = true
		if counts[sent][k] == 0 && counts[received][k] == 0 {
			return
		}
		fmt.Fprintf(tw, "  %s\t%d\t%d\t\n", k, counts[sent][k], counts[received][k])
	}
	for _, k := range messageOrder {
		row(k)
	}
	for _, d := range []direction{sent, received} {
		for k := range counts[d] {
			if !shown[k] {
				row(k)
			}
		}
	}
	tw.Flush()
}
