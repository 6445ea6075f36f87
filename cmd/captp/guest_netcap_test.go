package main

import (
	"context"
	"flag"
	"log/slog"
	"net/netip"
	"regexp"
	"sync"
	"testing"
	"time"

	"github.com/captp-go/captp/adapters/netcap"
	"github.com/captp-go/captp/adapters/unix"
	"github.com/captp-go/captp/internal/testcapnp"
)

// consoleWatch is a slog.Handler that keeps the guest's console lines
// (startGuest logs each as the attribute "console") for a test to wait
// on, and passes every record on.
type consoleWatch struct {
	slog.Handler
	c *console
}

type console struct {
	mu     sync.Mutex
	lines  []string
	notify chan struct{} // closed and replaced on every new line
}

func (h consoleWatch) Handle(ctx context.Context, r slog.Record) error {
	r.Attrs(func(a slog.Attr) bool {
		if a.Key == "console" {
			h.c.mu.Lock()
			h.c.lines = append(h.c.lines, a.Value.String())
			close(h.c.notify)
			h.c.notify = make(chan struct{})
			h.c.mu.Unlock()
		}
		return true
	})
	return h.Handler.Handle(ctx, r)
}

func (h consoleWatch) WithAttrs(as []slog.Attr) slog.Handler {
	return consoleWatch{h.Handler.WithAttrs(as), h.c}
}

func (h consoleWatch) WithGroup(name string) slog.Handler {
	return consoleWatch{h.Handler.WithGroup(name), h.c}
}

// wait returns the submatches of the first console line matching re,
// waiting for it at most 30s, until ctx ends or until the guest exits.
func (c *console) wait(t *testing.T, ctx context.Context, g *guest, re *regexp.Regexp) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for i := 0; ; {
		c.mu.Lock()
		for ; i < len(c.lines); i++ {
			if m := re.FindStringSubmatch(c.lines[i]); m != nil {
				c.mu.Unlock()
				return m
			}
		}
		ch := c.notify
		c.mu.Unlock()
		select {
		case <-ch:
		case <-g.Exited():
			t.Fatalf("the guest exited before its console showed %s: %v", re, g.ExitErr())
		case <-ctx.Done():
			t.Fatalf("the guest's console never showed %s: %v", re, ctx.Err())
		}
	}
}

// bootNetcapGuest boots the vat, serial port only, with the host
// policy of the captp host flags args, and watches its console.
func bootNetcapGuest(t *testing.T, ctx context.Context, args ...string) (*guest, *console) {
	t.Helper()
	img := guestImage(t)
	fs := flag.NewFlagSet("host", flag.ContinueOnError)
	p := netcapFlags(fs)
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	c := &console{notify: make(chan struct{})}
	log := slog.New(consoleWatch{testLogger(t).Handler(), c})
	g, err := startGuest(ctx, guestConfig{Image: img, Net: netNone, Policy: p}, log)
	if err != nil {
		t.Fatalf("startGuest: %v", err)
	}
	t.Cleanup(func() {
		code, err := g.Close()
		if err != nil || code != 0 {
			t.Errorf("guest exit: code %d, %v; want 0", code, err)
		}
	})
	return g, c
}

// The vat's console lines about the host's Network (boards/microvm/vat).
var (
	reServing      = regexp.MustCompile(`msg="vat: serving through the host's network" addr=(\S+)`)
	reListenFailed = regexp.MustCompile(`msg="vat: host network: listen failed" addr=(\S+) kind=(\w+)`)
	reLoopbackFail = regexp.MustCompile(`msg="vat: host network: loopback check failed" addr=(\S+) kind=(\w+)`)
	reLoopbackOK   = regexp.MustCompile(`msg="vat: host network: loopback check ok" addr=(\S+) echo=(\w+)`)
)

// A host that allows the listen gets the vat served on its loopback,
// through its own sockets: a process on the host reaches the guest (which
// has no network card) with a plain TCP connection. The vat's connect to
// that address is denied, as the policy allows no connect, and the vat
// logs the kind.
func TestGuestNetcapListen(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	g, con := bootNetcapGuest(t, ctx, "-allow-listen", "tcp:127.0.0.1:0")
	addr := con.wait(t, ctx, g, reServing)[1]
	ap, err := netip.ParseAddrPort(addr)
	if err != nil || ap.Addr() != netip.MustParseAddr("127.0.0.1") || ap.Port() == 0 {
		t.Fatalf("the vat serves on %q, want 127.0.0.1 and the port the host chose (%v)", addr, err)
	}
	if m := con.wait(t, ctx, g, reLoopbackFail); m[1] != addr || m[2] != netcap.KindDenied.String() {
		t.Errorf("the vat's connect to %s failed with kind %s, want denied", m[1], m[2])
	}
	if st := g.netSrv.Stats(); st.Listeners != 1 || st.Denied != 1 {
		t.Errorf("host network stats %+v, want 1 listener and 1 denial", st)
	}

	conn, err := unix.Dial(ctx, addr, nil)
	if err != nil {
		t.Fatalf("dial the vat through the host's network: %v", err)
	}
	defer conn.Close()
	boot := testcapnp.Test(conn.Bootstrap(ctx))
	defer boot.Release()
	const data = "through the host's loopback"
	if got, err := echo(ctx, boot, data); err != nil || got != data {
		t.Fatalf("echo through the host's network = %q, %v; want %q", got, err, data)
	}
	if st := g.netSrv.Stats(); st.Streams != 1 {
		t.Errorf("host network stats %+v, want the accepted stream", st)
	}
}

// With a connect rule too, the vat reaches its own listener through the
// host and its echo check succeeds.
func TestGuestNetcapLoopback(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	g, con := bootNetcapGuest(t, ctx, "-allow-listen", "tcp:127.0.0.1:0", "-allow-connect", "tcp:127.0.0.1:*")
	addr := con.wait(t, ctx, g, reServing)[1]
	if m := con.wait(t, ctx, g, reLoopbackOK); m[1] != addr || m[2] != "loopback" {
		t.Errorf("the vat's loopback check: addr %s, echo %q; want %s and \"loopback\"", m[1], m[2], addr)
	}
	if st := g.netSrv.Stats(); st.Denied != 0 {
		t.Errorf("host network stats %+v, want no denial", st)
	}
}

// By default the host denies everything: the vat logs the denied listen
// and serves on its serial port as before.
func TestGuestNetcapDenied(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	g, con := bootNetcapGuest(t, ctx)
	if m := con.wait(t, ctx, g, reListenFailed); m[1] != "127.0.0.1:0" || m[2] != netcap.KindDenied.String() {
		t.Errorf("the vat's listen on %s failed with kind %s, want 127.0.0.1:0 denied", m[1], m[2])
	}
	if st := g.netSrv.Stats(); st.Denied != 1 || st.Listeners != 0 {
		t.Errorf("host network stats %+v, want 1 denial and no listener", st)
	}
	boot := testcapnp.Test(g.Bootstrap(ctx))
	defer boot.Release()
	if got, err := echo(ctx, boot, "serial"); err != nil || got != "serial" {
		t.Errorf("echo over the serial port = %q, %v", got, err)
	}
}
