package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/captp-go/captp/adapters/unix"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
)

func setupDemo(fs *flag.FlagSet) func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	dir := fs.String("dir", "", "`directory` to create the host vat's socket host.sock in (default: a new temporary directory, removed afterwards)")
	timeout := fs.Duration("timeout", 30*time.Second, "give up if the demo has not finished after this long (a guest's boot included)")
	verbose := fs.Bool("v", false, "also log the vats' connection diagnostics (and a guest's console) to stderr")
	image := fs.String("guest-image", "", "TamaGo `image` of boards/microvm/vat (vat.elf; make demo builds it when a tamago-go toolchain is installed) to boot in QEMU as one more vat")
	qemu := fs.String("qemu", "qemu-system-x86_64", "QEMU `binary` for -guest-image")
	hold := fs.Bool("hold", false, "after the scenes, keep the group running (the host vat on its socket, for captp call) until interrupted")
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
		if len(args) > 0 {
			return usageError{fmt.Errorf("unexpected arguments %q", args)}
		}
		cfg := demoConfig{dir: *dir, timeout: *timeout, guestImage: *image, qemu: *qemu, hold: *hold}
		if *verbose {
			cfg.logger = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
		}
		return runDemo(ctx, stdout, cfg)
	}
}

type demoConfig struct {
	dir        string        // where the host's socket goes; "" means a new temporary directory
	timeout    time.Duration // zero means 30s
	logger     *slog.Logger  // nil discards the vats' logs
	guestImage string        // boards/microvm/vat image; "" skips the guest scene
	qemu       string        // QEMU binary; "" means qemu-system-x86_64
	hold       bool          // keep the group up after the scenes until ctx ends
}

// demoVats are the vats on the netstack network. host is also on a Unix
// socket, where "you" (a client like captp call) reach it.
var demoVats = []string{"host", "alice", "bob", "carol"}

// runDemo runs a unikernel group in this process and narrates what it
// does: a host vat on a Unix socket, vats with TLS identities on an
// in-process netstack network (and a TamaGo guest in QEMU with
// cfg.guestImage), in scenes: promise pipelining, passing capabilities,
// restoring a sturdy ref, a three-party handoff, the guest. Who called
// whom and every count come from wire taps that decode the RPC messages
// on every connection (see wiretap); times are wall-clock.
//
// Each scene checks its results; runDemo returns an error if anything did
// not go as described, and leaves no goroutine, socket or directory.
func runDemo(ctx context.Context, w io.Writer, cfg demoConfig) (err error) {
	start := time.Now()
	parent := ctx
	if cfg.timeout <= 0 {
		cfg.timeout = 30 * time.Second
	}
	timedOut := fmt.Errorf("demo did not finish within %v", cfg.timeout)
	ctx, cancel := context.WithTimeoutCause(ctx, cfg.timeout, timedOut)
	defer cancel()
	defer func() {
		// Whatever failed first, say why it ran out of time.
		if err != nil && context.Cause(ctx) == timedOut && !errors.Is(err, timedOut) {
			err = fmt.Errorf("%w: %w", timedOut, err)
		}
	}()
	logger := cfg.logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	d := &demo{ctx: ctx, w: w, log: logger}

	dir := cfg.dir
	if dir == "" {
		if dir, err = os.MkdirTemp("", "captp-demo-"); err != nil {
			return fmt.Errorf("socket directory: %w", err)
		}
		defer os.RemoveAll(dir)
	}
	hostAddr := "unix:" + filepath.Join(dir, "host.sock")

	// The guest boots (seconds, under TCG) while the other scenes run.
	var guestBoot chan guestStart
	if cfg.guestImage != "" {
		boot := make(chan guestStart, 1)
		guestBoot = boot
		go func() {
			t0 := time.Now()
			g, err := startGuest(ctx, guestConfig{QEMU: cfg.qemu, Image: cfg.guestImage, Net: netStream, BootTimeout: cfg.timeout}, logger.With("vat", "guest"))
			boot <- guestStart{g, err, time.Since(t0)}
		}()
		defer func() {
			if guestBoot != nil { // not taken by the guest scene: stop the boot
				cancel()
				if gs := <-guestBoot; gs.g != nil {
					gs.g.Close()
				}
			}
		}()
	}

	d.g, err = newDemoGroup(logger, demoVats, "carol")
	if err != nil {
		return err
	}
	defer func() {
		if d.g != nil {
			d.release()
			d.g.close()
		}
	}()
	host := d.g.vat("host")
	if err := d.g.serveUnix(host, hostAddr); err != nil {
		return err
	}

	d.say("captp demo — a unikernel group in one process")
	d.say("  %-6s %s  (your entry point; -hold keeps it up for captp call)", "host", hostAddr)
	for _, name := range demoVats {
		v := d.g.vat(name)
		d.say("  %-6s %s  (netstack %s, TLS identity, Level 3)", name, shortRef(v.ref.String()), v.stack.Addr())
	}
	if cfg.guestImage != "" {
		d.say("  %-6s TamaGo %s in QEMU microvm (TCG), booting", "guest", filepath.Base(cfg.guestImage))
	}

	// "you": a client vat on the host's Unix socket, like captp call.
	network, address, err := unix.ParseAddr(hostAddr)
	if err != nil {
		return err
	}
	var dialer net.Dialer
	sock, err := dialer.DialContext(ctx, network, address)
	if err != nil {
		return fmt.Errorf("you: dial %s: %w", hostAddr, err)
	}
	d.you = d.g.connect("you", "host", "unix", sock, &core.Options{})

	totalSaved := 0
	for i, scene := range []struct {
		title string
		run   func() error
	}{
		{"promise pipelining: a chain of calls sent without waiting", d.scenePipelining},
		{"passing capabilities: host gives alice a capability on bob", d.sceneCapabilities},
		{"a sturdy ref: carol saves a service, bob restores it, twice", d.sceneSturdyRef},
		{"three-party handoff: alice introduces bob to carol, then steps aside", d.sceneHandoff},
		{"a TamaGo guest in QEMU joins the group", func() error {
			gb := guestBoot
			guestBoot = nil
			return d.sceneGuest(gb)
		}},
	} {
		d.say("")
		d.say("[%d] %s", i+1, scene.title)
		t0 := time.Now()
		before := d.g.mark()
		if err := scene.run(); err != nil {
			return fmt.Errorf("scene %d (%s): %w", i+1, scene.title, err)
		}
		if d.skipped {
			d.skipped = false
			continue
		}
		events := d.g.since(before)
		t := traceOf(events)
		pipelined := 0
		for _, le := range events {
			pipelined += analyse(le.events, 0).pipelined
		}
		d.say("  %s: %s, %d saved by pipelining; %s; %s", plural(t.calls, "call"), plural(t.calls-pipelined, "round trip"),
			pipelined, plural(t.messages, "message"), fmtDuration(time.Since(t0)))
		totalSaved += pipelined
	}

	if cfg.hold {
		d.say("")
		d.say("holding the group (Ctrl-C ends it); from another shell, for example:")
		d.say("  go run ./cmd/captp call %s 'Test.child(name = \"x\").name()' -schema internal/testcapnp/test.capnp", hostAddr)
		<-parent.Done()
		start = time.Now()
	}
	d.say("")
	d.say("every connection (decoded by a tap on the dialing side, above TLS):")
	links := d.g.linksSnapshot()
	d.release()
	printLinks(w, links)
	g := d.g
	d.g = nil
	if err := g.close(); err != nil {
		return err
	}
	// Not ctx, which -hold may have outlived.
	tctx, tcancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer tcancel()
	if err := g.waitReleased(tctx); err != nil {
		return err
	}
	d.say("pipelining saved %s in all", plural(totalSaved, "round trip"))
	d.say("all connections closed; every vat's objects released (distributed GC); done in %v", time.Since(start).Round(time.Millisecond))
	return nil
}

// guestStart is the outcome of booting the guest.
type guestStart struct {
	g    *guest
	err  error
	took time.Duration
}

// demo is the state the scenes share.
type demo struct {
	ctx  context.Context
	w    io.Writer
	log  *slog.Logger
	g    *demoGroup
	you  *core.Conn
	held []func() // releases capabilities the scenes keep
	// caps are bootstrap capabilities a vat took from another, by from
	// and to, with their connection: the scenes reuse them.
	caps    map[[2]string]vatCap
	skipped bool // the scene just run was skipped
}

func (d *demo) say(format string, args ...any) { fmt.Fprintf(d.w, format+"\n", args...) }

// keep registers a release for the end of the demo (or a failure).
func (d *demo) keep(release func()) { d.held = append(d.held, release) }

func (d *demo) release() {
	d.caps = nil
	for i := len(d.held) - 1; i >= 0; i-- {
		d.held[i]()
	}
	d.held = nil
}

// bootstrap returns conn's bootstrap capability, resolved, kept until the
// end of the demo.
func (d *demo) bootstrap(conn *core.Conn) (testcapnp.Test, error) {
	c := conn.Bootstrap(d.ctx)
	d.keep(c.Release)
	if err := c.Resolve(d.ctx); err != nil {
		return testcapnp.Test{}, fmt.Errorf("bootstrap: %w", err)
	}
	return testcapnp.Test(c), nil
}

// vatCap is a bootstrap capability and its connection.
type vatCap struct {
	conn *core.Conn
	cap  testcapnp.Test
}

// capOf returns to's bootstrap capability as from holds it, dialing to
// with from's secure.Network (so from can hand to's capabilities off)
// the first time.
func (d *demo) capOf(from, to string) (*core.Conn, testcapnp.Test, error) {
	k := [2]string{from, to}
	if vc, ok := d.caps[k]; ok {
		return vc.conn, vc.cap, nil
	}
	conn, err := d.g.vat(from).net.Dial(d.ctx, d.g.vat(to).ref)
	if err != nil {
		return nil, testcapnp.Test{}, err
	}
	c, err := d.bootstrap(conn)
	if err != nil {
		return nil, testcapnp.Test{}, fmt.Errorf("%s → %s: %w", from, to, err)
	}
	if d.caps == nil {
		d.caps = map[[2]string]vatCap{}
	}
	d.caps[k] = vatCap{conn, c}
	return conn, c, nil
}

// shortRef abbreviates the fingerprint in a capnp URI for the listing.
func shortRef(uri string) string {
	const p = "sha-256:"
	i := strings.Index(uri, p)
	j := strings.IndexByte(uri, '@')
	if i < 0 || j < i+len(p)+8 {
		return uri
	}
	return uri[:i+len(p)+6] + "…" + uri[j:]
}

// guestSkipped explains, in one line, why there is no guest scene and
// what to install.
func guestSkipped() string {
	var missing []string
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		missing = append(missing, "qemu-system-x86_64 (apt-get install qemu-system-x86)")
	}
	hint := "make demo builds boards/microvm/vat and passes -guest-image when a tamago-go toolchain is installed (go tool tamago: run `make tamago` once, see README TamaGo)"
	if len(missing) > 0 {
		hint += " and " + strings.Join(missing, ", ") + " is present"
	}
	return "SKIPPED: no -guest-image; " + hint
}

// chain calls child(names[0]).child(names[1])….name() on t and returns
// the name: pipelined, every call sent at once on the promised result of
// the one before; else waiting for each answer first.
func chain(ctx context.Context, t testcapnp.Test, names []string, pipelined bool) (string, error) {
	cur := t.AddRef()
	defer func() { cur.Release() }()
	for _, n := range names {
		f, release := cur.Child(ctx, setChildName(n))
		defer release()
		if pipelined {
			// One Future.Child() per future (see README, Known issues).
			next := f.Child().AddRef()
			cur.Release()
			cur = next
			continue
		}
		res, err := f.Struct()
		if err != nil {
			return "", fmt.Errorf("child(%q): %w", n, err)
		}
		next := res.Child().AddRef()
		cur.Release()
		cur = next
	}
	return callName(ctx, cur)
}

// pipelineTries bounds the attempts at a pipelined chain.
const pipelineTries = 5

// pipelineReport runs the chain both ways on conn's bootstrap capability
// t and describes the difference, measured by conn's tap.
//
// The chain runs once unmeasured first: first calls pay for cold paths
// (a TCG guest translates its code on first use), which would blur the
// times; the counts of that run are in the scene's and the link's totals.
func (d *demo) pipelineReport(from, to string, conn *core.Conn, t testcapnp.Test) error {
	l := d.g.linkOf(conn)
	names := []string{"a", "b", "c"}
	want := names[len(names)-1]
	if _, err := chain(d.ctx, t, names, true); err != nil {
		return fmt.Errorf("%s → %s warm-up chain: %w", from, to, err)
	}
	measure := func(pipelined bool) (stepReport, error) {
		mark, t0 := l.tap.mark(), time.Now()
		got, err := chain(d.ctx, t, names, pipelined)
		r := analyse(l.tap.since(mark), time.Since(t0))
		if err == nil && got != want {
			err = fmt.Errorf("got name %q; want %q", got, want)
		}
		return r, err
	}
	// A call is pipelined only if the answer it is addressed to has not
	// arrived yet; on a fast link with a slow caller (the race detector,
	// a loaded machine) every answer can outrun the next call, and the
	// core then rightly addresses the returned capability. Try again
	// then, and say so.
	var p stepReport
	tries := 0
	for tries < pipelineTries {
		tries++
		var err error
		if p, err = measure(true); err != nil {
			return fmt.Errorf("%s → %s pipelined chain: %w", from, to, err)
		}
		if p.pipelined > 0 {
			break
		}
	}
	a, err := measure(false)
	if err != nil {
		return fmt.Errorf("%s → %s awaited chain: %w", from, to, err)
	}
	saved := a.roundTrips - p.roundTrips
	if saved <= 0 || p.calls != a.calls || p.calls != len(names)+1 {
		return fmt.Errorf("%s → %s: pipelined %d calls in %d round trips, awaited %d calls in %d: pipelining saved nothing",
			from, to, p.calls, p.roundTrips, a.calls, a.roundTrips)
	}
	d.say("  %s → %s  child(\"a\").child(\"b\").child(\"c\").name() → %q", from, to, want)
	d.say("    pipelined: %d calls (%d pipelined) in %s, %s; awaiting each answer: %s, %s",
		p.calls, p.pipelined, plural(p.roundTrips, "round trip"), fmtDuration(p.elapsed), plural(a.roundTrips, "round trip"), fmtDuration(a.elapsed))
	if tries > 1 {
		d.say("    pipelining saved %s (try %d: in the others every answer outran the next call)", plural(saved, "round trip"), tries)
	} else {
		d.say("    pipelining saved %s", plural(saved, "round trip"))
	}
	return nil
}

func (d *demo) scenePipelining() error {
	boot, err := d.bootstrap(d.you)
	if err != nil {
		return fmt.Errorf("you → host: %w", err)
	}
	if err := d.pipelineReport("you", "host", d.you, boot); err != nil {
		return err
	}
	conn, aliceCap, err := d.capOf("host", "alice")
	if err != nil {
		return err
	}
	return d.pipelineReport("host", "alice", conn, aliceCap)
}

// callBack calls t.callBack(cb, data), which makes t's vat call
// cb.echo(data), and checks that data came back.
func callBack(ctx context.Context, t, cb testcapnp.Test, data string) error {
	f, release := t.CallBack(ctx, func(p testcapnp.Test_callBack_Params) error {
		if err := p.SetCb(cb.AddRef()); err != nil {
			return err
		}
		return p.SetData([]byte(data))
	})
	defer release()
	res, err := f.Struct()
	if err != nil {
		return err
	}
	got, err := res.Data()
	if err != nil {
		return err
	}
	if string(got) != data {
		return fmt.Errorf("callBack(cb, %q) returned %q", data, got)
	}
	return nil
}

func (d *demo) sceneCapabilities() error {
	before := d.g.mark()
	_, bobCap, err := d.capOf("host", "bob")
	if err != nil {
		return err
	}
	_, aliceCap, err := d.capOf("host", "alice")
	if err != nil {
		return err
	}
	if err := callBack(d.ctx, aliceCap, bobCap, "hi bob"); err != nil {
		return fmt.Errorf("host → alice callBack(bob, …): %w", err)
	}
	t := traceOf(d.g.since(before))
	direct, relayed := t.callsBetween("alice", "bob", "echo"), t.callsBetween("host", "bob", "echo")
	if t.callsInto("bob", "echo") != 1 || direct+relayed != 1 {
		return fmt.Errorf("bob got %d echo calls (%d from alice, %d from host); want 1", t.callsInto("bob", "echo"), direct, relayed)
	}
	how := "alice called bob directly (Level 3 handoff)"
	if relayed == 1 {
		how = "alice called bob through the host"
	}
	d.say("  host → alice  callBack(cb: bob's object, \"hi bob\") → \"hi bob\": %s", how)
	t.print(d.w, "    ")
	return nil
}

func (d *demo) sceneSturdyRef() error {
	return d.sturdyRef(d.g.vat("carol"), d.g.vat("bob"))
}

func (d *demo) sceneHandoff() error {
	return d.handoff(d.g.vat("alice"), d.g.vat("bob"), d.g.vat("carol"))
}

// sceneGuest takes the guest booted in the background (nil: no image).
func (d *demo) sceneGuest(boot chan guestStart) error {
	if boot == nil {
		d.say("  %s", guestSkipped())
		d.skipped = true
		return nil
	}
	var gs guestStart
	select {
	case gs = <-boot:
	case <-d.ctx.Done():
		// startGuest gives up with ctx; close what it made.
		if gs := <-boot; gs.g != nil {
			gs.g.Close()
		}
		return fmt.Errorf("waiting for the guest to boot: %w", context.Cause(d.ctx))
	}
	if gs.err != nil {
		return fmt.Errorf("boot the guest: %w", gs.err)
	}
	return d.guest(gs)
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
	if d < time.Second {
		return fmt.Sprintf("%.1fms", float64(d)/float64(time.Millisecond))
	}
	return fmt.Sprintf("%.2fs", d.Seconds())
}
