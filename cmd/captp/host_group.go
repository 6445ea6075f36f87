package main

// captp host with a group of guests: several TamaGo guests on one
// Ethernet segment (a netstack.Switch in this process, which the host's
// own stack joins too), each with its own MAC address, serial connection
// and re-served bootstrap socket.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/captp-go/captp/adapters/netstack"
	"github.com/captp-go/captp/adapters/unix"
	"github.com/captp-go/captp/core"
)

// defaultSegment is a group's subnet unless -subnet says otherwise.
var defaultSegment = netip.MustParsePrefix("10.0.0.0/24")

// A hostImage is one -image flag: a guest's name (empty: from the file
// name) and its image.
type hostImage struct{ name, image string }

// hostImages is the repeatable -image flag.
type hostImages []hostImage

var guestNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]*$`)

func (h *hostImages) String() string {
	if h == nil {
		return ""
	}
	var s []string
	for _, i := range *h {
		if i.name != "" {
			s = append(s, i.name+"="+i.image)
		} else {
			s = append(s, i.image)
		}
	}
	return strings.Join(s, ",")
}

// Set takes NAME=IMAGE or IMAGE. A NAME is letters, digits, - and _.
func (h *hostImages) Set(v string) error {
	if v == "" {
		return errors.New("empty image")
	}
	if name, img, ok := strings.Cut(v, "="); ok && !strings.Contains(name, "/") {
		if !guestNameRE.MatchString(name) {
			return fmt.Errorf("guest name %q: use letters, digits, - and _", name)
		}
		if img == "" {
			return fmt.Errorf("guest %s: no image after =", name)
		}
		*h = append(*h, hostImage{name: name, image: img})
		return nil
	}
	*h = append(*h, hostImage{image: v})
	return nil
}

// hostPorts is the repeatable -forward flag.
type hostPorts []uint16

func (p *hostPorts) String() string {
	if p == nil {
		return ""
	}
	var s []string
	for _, n := range *p {
		s = append(s, strconv.Itoa(int(n)))
	}
	return strings.Join(s, ",")
}

func (p *hostPorts) Set(v string) error {
	n, err := strconv.ParseUint(v, 10, 16)
	if err != nil || n == 0 {
		return fmt.Errorf("port %q: want 1-65535", v)
	}
	*p = append(*p, uint16(n))
	return nil
}

// isDirListen reports whether -listen names a directory: it ends in a
// slash or is an existing directory.
func isDirListen(listen string) bool {
	path, ok := strings.CutPrefix(listen, "unix:")
	if !ok {
		return false
	}
	if strings.HasSuffix(path, "/") {
		return true
	}
	fi, err := os.Stat(path)
	return err == nil && fi.IsDir()
}

// hostGroupConfig is captp host's command line for a group.
type hostGroupConfig struct {
	guest    guestConfig // shared settings; Image, Name, MAC and Switch are per guest
	images   hostImages
	via      string
	listen   string
	segment  netip.Prefix
	forwards hostPorts
}

// A hostGroup is a running group of guests.
type hostGroup struct {
	cfg    hostGroupConfig
	log    *slog.Logger
	out    *lockedWriter
	dir    string
	host   netip.Prefix     // the host stack's address
	sw     *netstack.Switch // nil with -net none
	stack  *netstack.Stack  // the host's port on the segment
	guests []*groupGuest
}

// A groupGuest is one guest of a group.
type groupGuest struct {
	name, image string
	mac         string
	addr        netip.Addr // by level3vat's convention: 10.A.B.C for MAC xx:xx:xx:A:B:C
	sock        string     // its re-served bootstrap
	lis         net.Listener
	fwds        []*portForward
	g           *guest
}

// hostGroupReady, if set, is called once a group is served (tests read
// its switch's counters).
var hostGroupReady func(*hostGroup)

// runHostGroup boots the group's guests on one segment, re-serves each
// guest's bootstrap capability (over its serial port) on DIR/NAME.sock
// and forwards the requested TCP ports, until ctx ends or a guest exits;
// then it stops them all.
func runHostGroup(ctx context.Context, gc hostGroupConfig, stdout io.Writer, log *slog.Logger) (err error) {
	hg := &hostGroup{cfg: gc, log: log, out: &lockedWriter{w: stdout}}
	if err := hg.check(); err != nil {
		return err
	}
	if _, err := os.Stat(hg.dir); errors.Is(err, os.ErrNotExist) {
		// Ours: removed on the way out once its sockets are gone (a
		// directory someone else put a file in stays).
		defer os.Remove(hg.dir)
	}
	if err := os.MkdirAll(hg.dir, 0o700); err != nil {
		return fmt.Errorf("socket directory: %w", err)
	}
	defer hg.close()
	if gc.guest.Net == netStream {
		hg.sw = netstack.NewSwitch(&netstack.SwitchOptions{Logger: log})
		if hg.stack, err = hg.sw.NewStack(netstack.Config{Name: "host", Addrs: []netip.Prefix{hg.host}, Logger: log}); err != nil {
			return fmt.Errorf("host network stack: %w", err)
		}
	}
	for _, gg := range hg.guests {
		if gg.lis, err = unix.Listen("unix:" + gg.sock); err != nil {
			return fmt.Errorf("guest %s: listen: %w", gg.name, err)
		}
		for _, port := range gc.forwards {
			f, err := newPortForward(filepath.Join(hg.dir, fmt.Sprintf("%s.%d.sock", gg.name, port)),
				netip.AddrPortFrom(gg.addr, port), hg.stack, log)
			if err != nil {
				return fmt.Errorf("guest %s: forward port %d: %w", gg.name, port, err)
			}
			gg.fwds = append(gg.fwds, f)
		}
	}
	if err := hg.boot(ctx); err != nil {
		return err
	}

	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var serving sync.WaitGroup
	for _, gg := range hg.guests {
		boot := gg.g.Serial.Bootstrap(ctx)
		serving.Add(1)
		go func() {
			defer serving.Done()
			if err := unix.Serve(sctx, gg.lis, &core.Options{BootstrapClient: boot, Logger: log.With("guest", gg.name)}); err != nil && sctx.Err() == nil {
				log.Warn("captp host: re-serving stopped", "guest", gg.name, "err", err)
			}
		}()
		for _, f := range gg.fwds {
			serving.Add(1)
			go func() { defer serving.Done(); f.serve(sctx) }()
		}
	}
	if hostGroupReady != nil {
		hostGroupReady(hg)
	}
	where := "serial ports only (-net none)"
	if hg.sw != nil {
		where = fmt.Sprintf("segment %v, host %v", gc.segment, hg.host.Addr())
	}
	fmt.Fprintf(hg.out, "captp host: %d guests' bootstrap capabilities (via serial) served on unix:%s%c (NAME.sock; %s)\n",
		len(hg.guests), hg.dir, filepath.Separator, where)

	exited := make(chan *groupGuest, len(hg.guests))
	for _, gg := range hg.guests {
		// Taken here: stop clears gg.g, and a watcher that started only
		// then would race with it (and dereference nil).
		guestExited := gg.g.Exited()
		go func() {
			select {
			case <-guestExited:
				exited <- gg
			case <-sctx.Done():
			}
		}()
	}
	var guestErr error
	select {
	case <-ctx.Done():
	case gg := <-exited:
		guestErr = fmt.Errorf("guest %s exited: %v; stopping the others", gg.name, gg.g.ExitErr())
		if gg.g.ExitErr() == nil {
			guestErr = fmt.Errorf("guest %s exited (status 0) while serving; stopping the others", gg.name)
		}
		fmt.Fprintf(hg.out, "captp host: %v\n", guestErr)
	}
	cancel()
	for _, gg := range hg.guests {
		for _, f := range gg.fwds {
			f.close()
		}
	}
	serving.Wait()
	if err := hg.stop(); err != nil && guestErr == nil {
		guestErr = err
	}
	return guestErr
}

// check validates the command line and fills the group's guests.
func (hg *hostGroup) check() error {
	gc := hg.cfg
	switch gc.guest.Net {
	case netStream, netNone:
	case netUser:
		return usageError{errors.New("-net user gives each guest its own NAT, so it boots one guest: use -net stream (the default) for a group on one segment")}
	default:
		return usageError{fmt.Errorf("-net %q: want stream or none", gc.guest.Net)}
	}
	switch gc.via {
	case "", "serial":
	case "tcp":
		return usageError{errors.New("-via tcp re-serves the TCP connection a lone guest has on a link of its own: a group is re-served over its serial ports (-forward PORT reaches the guests' TCP services)")}
	default:
		return usageError{fmt.Errorf("-via %q: want serial or tcp", gc.via)}
	}
	if len(gc.forwards) > 0 && gc.guest.Net != netStream {
		return usageError{errors.New("-forward needs the guests' segment: -net stream")}
	}
	path, ok := strings.CutPrefix(gc.listen, "unix:")
	if !ok || !isDirListen(gc.listen) {
		return usageError{fmt.Errorf("-listen %q: with several guests (or NAME=image, or -forward), name a directory, such as unix:/tmp/guests/ (one socket per guest, NAME.sock)", gc.listen)}
	}
	hg.dir = filepath.Clean(path)
	seg := gc.segment
	if !seg.Addr().Is4() || seg.Bits() != 24 || seg.Addr().As4()[0] != 10 || seg.Masked() != seg {
		return usageError{fmt.Errorf("-subnet %v: want 10.A.B.0/24 (guests take 10.A.B.n from their MAC addresses 52:54:00:A:B:n)", seg)}
	}
	if len(gc.images) > 253 {
		return usageError{fmt.Errorf("%d guests: a /24 segment has room for 253 besides the host", len(gc.images))}
	}
	hg.host = netip.PrefixFrom(seg.Addr().Next(), 24)
	seen := map[string]bool{"host": true} // the host's own switch port
	addr := hg.host.Addr()
	for _, im := range gc.images {
		name := im.name
		if name == "" {
			base := strings.TrimSuffix(filepath.Base(im.image), filepath.Ext(im.image))
			name = base
			for i := 2; seen[name]; i++ {
				name = fmt.Sprintf("%s-%d", base, i)
			}
		}
		if seen[name] {
			return usageError{fmt.Errorf("two guests named %s (host is the host's own)", name)}
		}
		seen[name] = true
		if _, err := os.Stat(im.image); err != nil {
			return fmt.Errorf("guest %s: guest image: %w", name, err)
		}
		addr = addr.Next()
		a := addr.As4()
		hg.guests = append(hg.guests, &groupGuest{
			name:  name,
			image: im.image,
			mac:   fmt.Sprintf("52:54:00:%02x:%02x:%02x", a[1], a[2], a[3]),
			addr:  addr,
			sock:  filepath.Join(hg.dir, name+".sock"),
		})
	}
	return nil
}

// boot starts every guest at once and waits until each has answered over
// its serial port.
func (hg *hostGroup) boot(ctx context.Context) error {
	for _, gg := range hg.guests {
		at := ""
		if hg.sw != nil {
			at = fmt.Sprintf(", mac %s, at %v", gg.mac, gg.addr)
		}
		fmt.Fprintf(hg.out, "captp host: booting %s (%s%s)…\n", gg.name, filepath.Base(gg.image), at)
	}
	errs := make([]error, len(hg.guests))
	var wg sync.WaitGroup
	for i, gg := range hg.guests {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cfg := hg.cfg.guest
			cfg.Image, cfg.Name, cfg.MAC, cfg.Switch = gg.image, gg.name, gg.mac, hg.sw
			start := time.Now()
			g, err := startGuest(ctx, cfg, hg.log.With("guest", gg.name))
			if err != nil {
				errs[i] = fmt.Errorf("guest %s (%s): %w", gg.name, gg.image, err)
				fmt.Fprintf(hg.out, "captp host: %s failed to boot after %.1f s\n", gg.name, time.Since(start).Seconds())
				return
			}
			gg.g = g
			at := ""
			if hg.sw != nil {
				at = fmt.Sprintf(" at %v", gg.addr)
			}
			fmt.Fprintf(hg.out, "captp host: %s ready in %.1f s%s; bootstrap on unix:%s\n", gg.name, time.Since(start).Seconds(), at, gg.sock)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%w (see the guests' consoles in the log; -boot-timeout gives slow machines longer, -v shows more)", err)
	}
	return nil
}

// stop closes every guest (in parallel: each waits for its vat to exit)
// and reports their exit statuses and the switch's counters.
func (hg *hostGroup) stop() error {
	errs := make([]error, len(hg.guests))
	codes := make([]int, len(hg.guests))
	var wg sync.WaitGroup
	for i, gg := range hg.guests {
		if gg.g == nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			codes[i], errs[i] = gg.g.Close()
			gg.g = nil
		}()
	}
	wg.Wait()
	for i, gg := range hg.guests {
		if errs[i] != nil {
			errs[i] = fmt.Errorf("guest %s: %w", gg.name, errs[i])
			continue
		}
		fmt.Fprintf(hg.out, "captp host: guest %s exited with status %d\n", gg.name, codes[i])
	}
	if hg.sw != nil {
		var pairs []string
		for _, p := range hg.sw.Pairs() {
			pairs = append(pairs, fmt.Sprintf("%s→%s %d", p.From, p.To, p.Frames))
		}
		if len(pairs) > 0 {
			fmt.Fprintf(hg.out, "captp host: unicast frames switched: %s\n", strings.Join(pairs, ", "))
		}
	}
	return errors.Join(errs...)
}

// close releases whatever is left: guests not yet stopped (a failed
// boot), listeners, forwards, the host stack and the switch.
func (hg *hostGroup) close() {
	for _, gg := range hg.guests {
		for _, f := range gg.fwds {
			f.close()
		}
		if gg.lis != nil {
			gg.lis.Close()
		}
	}
	var wg sync.WaitGroup
	for _, gg := range hg.guests {
		if g := gg.g; g != nil {
			wg.Add(1)
			go func() { defer wg.Done(); g.Close() }()
		}
	}
	wg.Wait()
	if hg.sw != nil {
		hg.sw.Close() // closes the host stack too
	}
}

// A portForward relays byte streams from a Unix socket on the host to a
// guest's TCP port on the segment, through the host's stack: a way in for
// programs outside this process (such as a Level 3 vat that dials a
// guest's TLS service).
type portForward struct {
	path   string
	target netip.AddrPort
	stack  *netstack.Stack
	log    *slog.Logger
	lis    net.Listener

	mu     sync.Mutex
	closed bool
	conns  map[net.Conn]struct{}
	wg     sync.WaitGroup
	once   sync.Once
}

func newPortForward(path string, target netip.AddrPort, st *netstack.Stack, log *slog.Logger) (*portForward, error) {
	lis, err := unix.Listen("unix:" + path)
	if err != nil {
		return nil, err
	}
	return &portForward{path: path, target: target, stack: st, lis: lis, log: log, conns: make(map[net.Conn]struct{})}, nil
}

// serve accepts connections until the listener is closed.
func (f *portForward) serve(ctx context.Context) {
	for {
		c, err := f.lis.Accept()
		if err != nil {
			return
		}
		if !f.track(c, true) {
			return
		}
		go func() {
			defer f.wg.Done()
			f.relay(ctx, c)
		}()
	}
}

// track records c so that close can end it, and with relay counts a
// relay that close waits for; false (c closed) once closed.
func (f *portForward) track(c net.Conn, relay bool) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		c.Close()
		return false
	}
	f.conns[c] = struct{}{}
	if relay {
		f.wg.Add(1)
	}
	return true
}

func (f *portForward) untrack(c net.Conn) {
	f.mu.Lock()
	delete(f.conns, c)
	f.mu.Unlock()
	c.Close()
}

// relay copies both ways between c and the guest until either side ends.
func (f *portForward) relay(ctx context.Context, c net.Conn) {
	defer f.untrack(c)
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	g, err := f.stack.DialTCP(dctx, f.target.String())
	cancel()
	if err != nil {
		f.log.Warn("captp host: forward: guest unreachable", "socket", f.path, "to", f.target, "err", err)
		return
	}
	if !f.track(g, false) {
		return
	}
	defer f.untrack(g)
	done := make(chan struct{}, 2)
	copyOne := func(dst, src net.Conn) {
		io.Copy(dst, src)
		// Either side's end ends both: neither stream has a half-close
		// that the other would rely on.
		dst.Close()
		src.Close()
		done <- struct{}{}
	}
	go copyOne(g, c)
	go copyOne(c, g)
	<-done
	<-done
}

// close stops accepting, ends every relayed connection and waits for
// the relays.
func (f *portForward) close() {
	f.once.Do(func() {
		f.lis.Close()
		f.mu.Lock()
		f.closed = true
		for c := range f.conns {
			c.Close()
		}
		f.mu.Unlock()
		f.wg.Wait()
	})
}

// A lockedWriter serializes the status lines of guests booting at once.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
