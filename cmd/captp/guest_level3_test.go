package main

// Helpers of the Level 3 guest tests (level3_guest_test.go and
// host_group_test.go): a launcher for boards/microvm/level3vat on a
// netstack.Switch segment, and a host vat (Alice) that counts the calls
// it sends.

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"

	"github.com/captp-go/captp/adapters/netstack"
	"github.com/captp-go/captp/adapters/secure"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/sturdyref"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// level3Image returns the level3vat image, which `make tamago-test`
// builds next to vat.elf, or skips loudly.
func level3Image(t *testing.T) string {
	t.Helper()
	img := os.Getenv("CAPTP_LEVEL3_IMAGE")
	if img == "" {
		img = filepath.Join(filepath.Dir(guestImage(t)), "level3vat.elf")
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("SKIPPED: QEMU guest tests need qemu-system-x86_64: apt-get install qemu-system-x86 (make deps)")
	}
	if _, err := os.Stat(img); err != nil {
		t.Fatalf("the Level 3 guest image (boards/microvm/level3vat, built by make tamago-test next to vat.elf; or set CAPTP_LEVEL3_IMAGE): %v", err)
	}
	return img
}

// A level3Guest is boards/microvm/level3vat running in QEMU on a switch.
type level3Guest struct {
	*guest
	name string
	ref  sturdyref.Ref  // its vat's TLS service, as the guest reported it
	test testcapnp.Test // its Test object, over the serial port
}

// startLevel3Guest boots img with the given MAC address (which sets the
// guest's IP address) on sw, and learns the guest vat's sturdy ref over
// the serial port: the name of its bootstrap object.
func startLevel3Guest(ctx context.Context, img, name, mac string, sw *netstack.Switch, log *slog.Logger) (_ *level3Guest, err error) {
	log = log.With("guest", name)
	cfg := guestConfig{Image: img, Net: netStream, BootTimeout: time.Minute, Name: name, MAC: mac, Switch: sw}
	g, err := startGuest(ctx, cfg, log)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			g.Close()
		}
	}()
	lg := &level3Guest{guest: g, name: name, test: testcapnp.Test(g.Serial.Bootstrap(ctx))}
	if lg.ref, err = level3Ref(ctx, lg.test); err != nil {
		lg.test.Release()
		return nil, fmt.Errorf("guest vat over the serial port: %w", g.explain(err))
	}
	return lg, nil
}

// level3Ref asks a level3vat's bootstrap object for its name, which is
// the vat's sturdy ref.
func level3Ref(ctx context.Context, test testcapnp.Test) (sturdyref.Ref, error) {
	f, release := test.Name(ctx, nil)
	defer release()
	res, err := f.Struct()
	if err != nil {
		return sturdyref.Ref{}, err
	}
	uri, err := res.Name()
	if err != nil {
		return sturdyref.Ref{}, fmt.Errorf("guest vat's name: %w", err)
	}
	ref, err := sturdyref.Parse(uri)
	if err != nil {
		return sturdyref.Ref{}, fmt.Errorf("guest vat's name %q is not its sturdy ref: %w", uri, err)
	}
	return ref, nil
}

// close ends the guest: the vat exits when its serial connection closes.
func (g *level3Guest) close() (int, error) {
	g.test.Release()
	return g.guest.Close()
}

// seqLog returns the seq calls a Test object received, in order.
func seqLog(ctx context.Context, name string, test testcapnp.Test) ([]uint32, error) {
	f, release := test.Log(ctx, nil)
	defer release()
	res, err := f.Struct()
	if err != nil {
		return nil, fmt.Errorf("%s.log(): %w", name, err)
	}
	l, err := res.Ns()
	if err != nil {
		return nil, err
	}
	out := make([]uint32, l.Len())
	for i := range out {
		out[i] = l.At(i)
	}
	return out, nil
}

// A hostVat is a Level 3 vat in the test process (Alice): its own
// identity and secure.Network, dialing guests over host stacks on their
// segments. A wiretap on each connection it dials decodes what it sends.
type hostVat struct {
	id     *secure.Identity
	net    *secure.Network
	stacks []*netstack.Stack
	log    *slog.Logger
	// raw opens the byte stream to a vat, TLS not yet started; nil
	// means a TCP connection over the stack on the vat's segment.
	raw func(ctx context.Context, ref sturdyref.Ref) (net.Conn, error)

	mu   sync.Mutex
	taps map[string]*wiretap // by the dialed address
}

func newHostVat(log *slog.Logger, stacks ...*netstack.Stack) (*hostVat, error) {
	id, err := secure.Generate()
	if err != nil {
		return nil, err
	}
	v := &hostVat{id: id, net: secure.NewNetwork(id), stacks: stacks, log: log, taps: make(map[string]*wiretap)}
	v.net.SetDialer(v.dialVat)
	return v, nil
}

// dialVat is the network's dialer: TLS pinned to ref's fingerprint over
// the stack on ref's segment (or v.raw), recorded.
func (v *hostVat) dialVat(ctx context.Context, ref sturdyref.Ref) (*core.Conn, error) {
	dial := v.raw
	if dial == nil {
		dial = v.dialTCP
	}
	raw, err := dial(ctx, ref)
	if err != nil {
		return nil, err
	}
	tc, err := secure.Client(ctx, raw, v.id, ref)
	if err != nil {
		return nil, err
	}
	tap := newWiretap(tc)
	v.mu.Lock()
	v.taps[ref.Address.HostPort()] = tap
	v.mu.Unlock()
	return core.NewConn(tap, &core.Options{Vat: v.net.Vat(), Logger: v.log}), nil
}

// dialTCP connects to ref's address over the stack on its segment.
func (v *hostVat) dialTCP(ctx context.Context, ref sturdyref.Ref) (net.Conn, error) {
	ip, err := netip.ParseAddr(ref.Address.Host)
	if err != nil {
		return nil, fmt.Errorf("host vat: address %q: %w", ref.Address.Host, err)
	}
	var st *netstack.Stack
	for _, s := range v.stacks {
		for _, p := range s.Addrs() {
			if p.Contains(ip) {
				st = s
			}
		}
	}
	if st == nil {
		return nil, fmt.Errorf("host vat: no stack on %v's segment", ip)
	}
	return st.DialTCP(ctx, ref.Address.HostPort())
}

// calls counts the Call messages this vat has sent to the vat at ref.
func (v *hostVat) calls(ref sturdyref.Ref) int {
	v.mu.Lock()
	tap := v.taps[ref.Address.HostPort()]
	v.mu.Unlock()
	if tap == nil {
		return 0
	}
	n := 0
	for _, ev := range tap.since(0) {
		if ev.dir == sent && ev.kind == rpccp.Message_Which_call {
			n++
		}
	}
	return n
}

// The host vat's call counter over a netstack.Switch, without QEMU: two
// host stacks on a switch, one serving a Test over TLS, the other dialing
// it as a hostVat.
func TestHostVatOverSwitch(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	log := testLogger(t)
	sw := netstack.NewSwitch(&netstack.SwitchOptions{Logger: log})
	defer sw.Close()
	a, err := sw.NewStack(netstack.Config{Name: "a", Addrs: []netip.Prefix{netip.MustParsePrefix("10.0.9.1/24")}, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := sw.NewStack(netstack.Config{Name: "b", Addrs: []netip.Prefix{netip.MustParsePrefix("10.0.9.2/24")}, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()

	id, err := secure.Generate()
	if err != nil {
		t.Fatal(err)
	}
	lis, err := b.Listen("*:4433")
	if err != nil {
		t.Fatal(err)
	}
	addr, err := b.SturdyAddress(lis)
	if err != nil {
		t.Fatal(err)
	}
	sctx, stop := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() {
		served <- netstack.ServeSturdy(sctx, lis, id, &core.Options{BootstrapClient: capnp.Client(testimpl.New("b", nil).Client())})
	}()
	defer func() { stop(); <-served }()

	alice, err := newHostVat(log, a)
	if err != nil {
		t.Fatal(err)
	}
	ref := sturdyref.Ref{Fingerprint: id.Fingerprint(), Address: addr}
	c, err := alice.net.Dial(ctx, ref)
	if err != nil {
		t.Fatalf("dial over the switch: %v", err)
	}
	defer func() { c.Close(); <-c.Done() }()
	boot := testcapnp.Test(c.Bootstrap(ctx))
	defer boot.Release()
	for i := range uint32(3) {
		f, rel := boot.Seq(ctx, func(p testcapnp.Test_seq_Params) error { p.SetN(i); return nil })
		if _, err := f.Struct(); err != nil {
			t.Fatalf("seq(%d) over the switch: %v", i, err)
		}
		rel()
	}
	if got := alice.calls(ref); got != 3 {
		t.Errorf("the host vat counted %d Calls; want 3", got)
	}
	if sw.Frames("a", "b") == 0 || sw.Frames("b", "a") == 0 {
		t.Errorf("unicast frames a→b %d, b→a %d; want some each way", sw.Frames("a", "b"), sw.Frames("b", "a"))
	}
}
