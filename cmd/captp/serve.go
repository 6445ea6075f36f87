package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/adapters/diskstore"
	"github.com/captp-go/captp/adapters/netstack"
	"github.com/captp-go/captp/adapters/secure"
	"github.com/captp-go/captp/adapters/unix"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/inspect"
	"github.com/captp-go/captp/core/sturdyref"
	"github.com/captp-go/captp/internal/sample"
	"github.com/captp-go/captp/internal/serve"
)

// serveConfig is what `captp serve` was asked to do.
type serveConfig struct {
	dir       string   // state: identity, store, sturdy ref files
	listen    string   // unix.Listen address
	host      string   // host name in refs for a wildcard listener
	guestLink string   // serve as a "guest" behind this QEMU-style link socket instead
	guestAddr string   // the guest's address on the link
	insecure  bool     // no TLS
	echo      []string // echo services to host
	counters  []string // counter services to host
	revoke    []string // services to revoke first
	inspect   bool     // also serve an Inspector under the sturdy ref inspectName
	logger    *slog.Logger
}

func setupServe(fs *flag.FlagSet) func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cfg serveConfig
	fs.StringVar(&cfg.dir, "dir", "", "state `directory`: the vat's key (vat.pem), its store (store.log) and one NAME.cap file per service holding its sturdy ref (required; created if missing)")
	fs.StringVar(&cfg.listen, "listen", "", "`address` to listen on: unix:/path, host:port (default: unix:DIR/vat.sock)")
	fs.StringVar(&cfg.host, "host", "", "host `name` to put in sturdy refs when listening on every address (*:port)")
	fs.StringVar(&cfg.guestLink, "guest-link", "", "serve like a guest VM instead: listen on this Unix `socket` as QEMU's -netdev stream does and run the vat on a userspace TCP/IP stack (adapters/netstack) behind it; refs are capnp+guest://")
	fs.StringVar(&cfg.guestAddr, "guest-addr", "10.0.2.15:4000", "with -guest-link: the guest's `ip:port` on the link")
	fs.BoolVar(&cfg.insecure, "insecure", false, "no TLS and no vat identity (tests only; the sturdy refs say capnp://insecure@)")
	echo := fs.String("echo", "echo", "comma-separated `names` of Echo services to host")
	counters := fs.String("counter", "counter", "comma-separated `names` of Counter services to host (their totals survive restarts)")
	revoke := fs.String("revoke", "", "comma-separated `names` of services to revoke before serving: their sturdy refs stop working, and a later run that hosts the name again mints a new ref")
	fs.BoolVar(&cfg.inspect, "inspect", false, "allow inspection: also serve an Inspector of this vat's connections and their tables (captp inspect) under a sturdy ref of its own, printed as 'inspect capnp://…' and kept in DIR/inspect.cap; whoever holds it may read every connection's tables. Without -inspect an earlier inspect ref is revoked")
	verbose := fs.Bool("v", false, "log connections and failed restores to stderr")
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
		if len(args) > 0 {
			return usageError{fmt.Errorf("unexpected arguments %q", args)}
		}
		if cfg.dir == "" {
			return usageError{errors.New("-dir is required")}
		}
		cfg.echo, cfg.counters, cfg.revoke = splitNames(*echo), splitNames(*counters), splitNames(*revoke)
		for _, n := range append(append(append([]string{}, cfg.echo...), cfg.counters...), cfg.revoke...) {
			if !serviceName.MatchString(n) {
				return usageError{fmt.Errorf("service name %q: use letters, digits, '-' and '_'", n)}
			}
		}
		for _, n := range append(append([]string{}, cfg.echo...), cfg.counters...) {
			if n == inspectName {
				return usageError{fmt.Errorf("service name %q is reserved for -inspect", n)}
			}
		}
		if *verbose {
			cfg.logger = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
		}
		return runServe(ctx, cfg, stdout, nil)
	}
}

// inspectName is the service name of the Inspector (-inspect), and
// kindInspect its record kind in the store.
const (
	inspectName = "inspect"
	kindInspect = "captp.inspect"
)

var serviceName = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

func splitNames(s string) []string {
	var out []string
	for _, n := range strings.Split(s, ",") {
		if n = strings.TrimSpace(n); n != "" {
			out = append(out, n)
		}
	}
	return out
}

// runServe hosts the sample services until ctx ends. It prints one
// "NAME URI" line per service, then "serving on ADDRESS". ready, if not
// nil, is called once serving.
func runServe(ctx context.Context, cfg serveConfig, stdout io.Writer, ready func()) error {
	log := cfg.logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(cfg.dir, 0o700); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	var id *secure.Identity
	if !cfg.insecure {
		var err error
		if id, err = secure.LoadOrCreate(filepath.Join(cfg.dir, "vat.pem")); err != nil {
			return err
		}
	}
	store, err := diskstore.Open(filepath.Join(cfg.dir, "store.log"), &diskstore.Options{Logger: log})
	if err != nil {
		return err
	}
	defer store.Close()

	lis, addr, serveOn, cleanup, err := serveListener(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer cleanup()
	vat := sturdyref.Ref{Insecure: id == nil, Address: addr}
	if id != nil {
		vat.Fingerprint = id.Fingerprint()
	}
	var restorer *sturdyref.Restorer
	var reg *inspect.Registry
	if cfg.inspect {
		reg = inspect.NewRegistry(&inspect.Options{Name: "captp serve " + addr.String()})
		// Every connection the adapter accepts is tracked until it ends.
		ctx = serve.WithAcceptHook(ctx, func(c *core.Conn, peer string) {
			if peer == "" || peer == "@" {
				peer = "unix socket peer"
			}
			if !reg.Track(c, peer) {
				log.Warn("inspect: too many connections to track", "peer", peer)
			}
		})
	}
	sampleLoad := sample.NewLoader(store, func(sid []byte) sturdyref.Saver { return restorer.SaverFor(sid) })
	load := func(ctx context.Context, sid []byte, rec sturdyref.Record) (capnp.Client, error) {
		if rec.Kind != kindInspect {
			return sampleLoad(ctx, sid, rec)
		}
		if reg == nil {
			return capnp.Client{}, errors.New("inspection is off (captp serve without -inspect)")
		}
		return capnp.Client(reg.Inspector()), nil
	}
	restorer = sturdyref.NewRestorer(sturdyref.RestorerOptions{Vat: vat, Store: store, Load: load, Logger: log})
	defer restorer.Close()

	for _, name := range cfg.revoke {
		if err := revokeService(ctx, cfg.dir, restorer, name); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "revoked %s\n", name)
	}
	revoked := map[string]bool{}
	for _, n := range cfg.revoke {
		revoked[n] = true
	}
	type svc struct{ name, kind string }
	var svcs []svc
	for _, n := range cfg.echo {
		svcs = append(svcs, svc{n, sample.KindEcho})
	}
	for _, n := range cfg.counters {
		svcs = append(svcs, svc{n, sample.KindCounter})
	}
	if cfg.inspect && !revoked[inspectName] {
		svcs = append(svcs, svc{inspectName, kindInspect})
	} else if _, err := os.Stat(capFile(cfg.dir, inspectName)); err == nil && !revoked[inspectName] {
		// Inspection is allowed only while the vat is started with
		// -inspect: a ref from an earlier run stops working.
		if err := revokeService(ctx, cfg.dir, restorer, inspectName); err != nil {
			return err
		}
		log.Info("inspect: revoked the inspect sturdy ref of an earlier run (no -inspect)")
	}
	for _, s := range svcs {
		if revoked[s.name] {
			continue
		}
		sid, err := ensureService(ctx, cfg.dir, restorer, store, s.name, s.kind)
		if err != nil {
			return err
		}
		ref := restorer.Ref(sid)
		// Rewrite the file: the address may have changed since.
		if err := writeCapFile(cfg.dir, s.name, ref); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "%s %s\n", s.name, ref)
	}
	fmt.Fprintf(stdout, "serving on %s\n", addr)
	if ready != nil {
		ready()
	}
	err = serveOn(ctx, lis, id, &core.Options{Restorer: restorer, Logger: log})
	if ctx.Err() != nil {
		return nil // interrupted: a normal end
	}
	return err
}

// serveListener opens the listener for cfg: a Unix socket or TCP
// address, or with -guest-link a userspace stack behind a link socket.
func serveListener(ctx context.Context, cfg serveConfig, log *slog.Logger) (lis net.Listener, addr sturdyref.Address, serve func(context.Context, net.Listener, *secure.Identity, *core.Options) error, cleanup func(), err error) {
	if cfg.guestLink != "" {
		return guestListener(cfg, log)
	}
	listen := cfg.listen
	if listen == "" {
		abs, err := filepath.Abs(filepath.Join(cfg.dir, "vat.sock"))
		if err != nil {
			return nil, addr, nil, nil, err
		}
		listen = "unix:" + abs
	}
	lis, err = unix.Listen(listen)
	if err != nil {
		return nil, addr, nil, nil, err
	}
	addr, err = unix.SturdyAddress(lis, cfg.host)
	if err != nil {
		lis.Close()
		return nil, addr, nil, nil, err
	}
	serve = func(ctx context.Context, lis net.Listener, id *secure.Identity, opts *core.Options) error {
		return unix.ServeSturdy(ctx, lis, id, opts)
	}
	return lis, addr, serve, func() { lis.Close() }, nil
}

// guestListener plays a guest VM's side of a QEMU -netdev stream link: it
// listens on the link socket, and each host that connects gets a fresh
// userspace stack (the guest's address) on which the vat listens.
func guestListener(cfg serveConfig, log *slog.Logger) (net.Listener, sturdyref.Address, func(context.Context, net.Listener, *secure.Identity, *core.Options) error, func(), error) {
	var addr sturdyref.Address
	ap, err := netip.ParseAddrPort(cfg.guestAddr)
	if err != nil || !ap.Addr().Is4() {
		return nil, addr, nil, nil, usageError{fmt.Errorf("-guest-addr %q: want an IPv4 ip:port", cfg.guestAddr)}
	}
	path, err := filepath.Abs(cfg.guestLink)
	if err != nil {
		return nil, addr, nil, nil, err
	}
	link, err := unix.Listen("unix:" + path)
	if err != nil {
		return nil, addr, nil, nil, err
	}
	addr = sturdyref.Address{Transport: sturdyref.Guest, Path: path, Host: ap.Addr().String(), Port: ap.Port()}
	serve := func(ctx context.Context, link net.Listener, id *secure.Identity, opts *core.Options) error {
		var wg sync.WaitGroup
		defer wg.Wait()
		stop := context.AfterFunc(ctx, func() { link.Close() })
		defer stop()
		for {
			c, err := link.Accept()
			if err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				return fmt.Errorf("guest link: %w", err)
			}
			// Frames wait in the socket until the vat listens: a SYN
			// handled before that would be refused.
			gc := &gatedConn{Conn: c, open: make(chan struct{})}
			sl := netstack.NewStreamLink(gc, nil)
			st, err := netstack.New(sl, netstack.Config{Name: "guest", Addrs: []netip.Prefix{netip.PrefixFrom(ap.Addr(), 24)}, Logger: log})
			if err != nil {
				close(gc.open)
				log.Error("guest link: stack", "err", err)
				continue
			}
			lis, err := st.Listen(fmt.Sprintf("*:%d", ap.Port()))
			close(gc.open)
			if err != nil {
				st.Close()
				log.Error("guest link: listen", "err", err)
				continue
			}
			wg.Go(func() {
				// One host per link connection, as with QEMU: serve
				// until it goes away or ctx ends.
				sctx, cancel := context.WithCancel(ctx)
				defer cancel()
				o := *opts
				go func() {
					select {
					case <-sl.Done():
					case <-sctx.Done():
					}
					cancel()
				}()
				netstack.ServeSturdy(sctx, lis, id, &o)
				st.Close()
			})
		}
	}
	return link, addr, serve, func() { link.Close() }, nil
}

// gatedConn holds reads until open is closed.
type gatedConn struct {
	net.Conn
	open chan struct{}
}

func (g *gatedConn) Read(p []byte) (int, error) {
	<-g.open
	return g.Conn.Read(p)
}

func capFile(dir, name string) string { return filepath.Join(dir, name+".cap") }

// ensureService returns the ID of the service called name, from its .cap
// file if the store still has it, or newly minted (random ID, record
// saved) otherwise.
func ensureService(ctx context.Context, dir string, r *sturdyref.Restorer, store sturdyref.Store, name, kind string) ([]byte, error) {
	data, err := os.ReadFile(capFile(dir, name))
	switch {
	case err == nil:
		ref, perr := sturdyref.Parse(strings.TrimSpace(string(data)))
		if perr != nil {
			return nil, fmt.Errorf("%s: %w", capFile(dir, name), perr)
		}
		rec, ok, gerr := store.Get(ctx, sturdyref.KeyOf(ref.ServiceID))
		if gerr != nil {
			return nil, gerr
		}
		if ok && rec.Kind == kind {
			return ref.ServiceID, nil
		}
	case !errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("read %s: %w", capFile(dir, name), err)
	}
	rec := sturdyref.Record{Kind: kind, Data: []byte(name)}
	if kind == sample.KindCounter {
		rec = sample.CounterRecord(0)
	}
	return r.SaveNew(ctx, rec)
}

func revokeService(ctx context.Context, dir string, r *sturdyref.Restorer, name string) error {
	data, err := os.ReadFile(capFile(dir, name))
	if err != nil {
		return fmt.Errorf("revoke %s: %w", name, err)
	}
	ref, err := sturdyref.Parse(strings.TrimSpace(string(data)))
	if err != nil {
		return fmt.Errorf("revoke %s: %w", name, err)
	}
	if err := r.Revoke(ctx, ref.ServiceID); err != nil && !errors.Is(err, sturdyref.ErrUnknownService) {
		return fmt.Errorf("revoke %s: %w", name, err)
	}
	return os.Remove(capFile(dir, name))
}

// writeCapFile stores a service's sturdy ref (a secret) for the operator,
// mode 0600, as OCaml's capnp-rpc writes its .cap files.
func writeCapFile(dir, name string, ref sturdyref.Ref) error {
	tmp := capFile(dir, name) + ".new"
	if err := os.WriteFile(tmp, []byte(ref.String()+"\n"), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, capFile(dir, name))
}
