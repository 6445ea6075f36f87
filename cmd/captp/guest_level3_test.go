package main

// Helpers of the Level 3 guest tests (level3_guest_test.go): an Ethernet
// switch in the host process that joins QEMU guests' -netdev stream links
// and host stacks on one segment, a launcher for boards/microvm/level3vat
// on such a segment, and a host vat (Alice) that counts the calls it
// sends.

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
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

// A frameSwitch is a learning Ethernet switch between byte streams that
// carry frames as QEMU's -netdev stream does (a 4-byte big-endian length,
// then the frame): guests' links and host stacks' StreamLinks. A port
// whose queue is full drops the frame, as a switch does; TCP resends.
type frameSwitch struct {
	log *slog.Logger
	wg  sync.WaitGroup

	mu      sync.Mutex
	ports   []*switchPort
	byMAC   map[[6]byte]*switchPort
	unicast map[[2]string]int // unicast frames switched, by source and destination port name
}

type switchPort struct {
	name      string
	rwc       io.ReadWriteCloser
	out       chan []byte
	done      chan struct{}
	closeOnce sync.Once
}

// maxStreamFrame bounds a frame on a stream link (QEMU's limit is 64 KiB
// plus headers; a 1,500-byte MTU makes 1,514-byte frames).
const maxStreamFrame = 65536 + 64

func newFrameSwitch(log *slog.Logger) *frameSwitch {
	return &frameSwitch{log: log, byMAC: make(map[[6]byte]*switchPort), unicast: make(map[[2]string]int)}
}

// attach adds a port on rwc, which the switch owns.
func (s *frameSwitch) attach(name string, rwc io.ReadWriteCloser) {
	p := &switchPort{name: name, rwc: rwc, out: make(chan []byte, 512), done: make(chan struct{})}
	s.mu.Lock()
	s.ports = append(s.ports, p)
	s.mu.Unlock()
	s.wg.Add(2)
	go s.readLoop(p)
	go s.writeLoop(p)
}

func (p *switchPort) close() {
	p.closeOnce.Do(func() {
		close(p.done)
		p.rwc.Close()
	})
}

func (s *frameSwitch) readLoop(p *switchPort) {
	defer s.wg.Done()
	defer p.close()
	var hdr [4]byte
	for {
		if _, err := io.ReadFull(p.rwc, hdr[:]); err != nil {
			return
		}
		n := binary.BigEndian.Uint32(hdr[:])
		if n < 14 || n > maxStreamFrame {
			s.log.Warn("switch: bad frame length; dropping the port", "port", p.name, "len", n)
			return
		}
		f := make([]byte, n)
		if _, err := io.ReadFull(p.rwc, f); err != nil {
			return
		}
		s.forward(p, f)
	}
}

func (s *frameSwitch) writeLoop(p *switchPort) {
	defer s.wg.Done()
	defer p.close()
	for {
		select {
		case f := <-p.out:
			buf := make([]byte, 4+len(f))
			binary.BigEndian.PutUint32(buf, uint32(len(f)))
			copy(buf[4:], f)
			if _, err := p.rwc.Write(buf); err != nil {
				return
			}
		case <-p.done:
			return
		}
	}
}

// forward learns the source's MAC and sends f to the port of its
// destination, or to every other port for a broadcast or an unknown one.
func (s *frameSwitch) forward(src *switchPort, f []byte) {
	var dst, from [6]byte
	copy(dst[:], f[0:6])
	copy(from[:], f[6:12])
	s.mu.Lock()
	if from[0]&1 == 0 {
		s.byMAC[from] = src
	}
	var to []*switchPort
	if q := s.byMAC[dst]; dst[0]&1 == 0 && q != nil {
		to = []*switchPort{q}
		s.unicast[[2]string{src.name, q.name}]++
	} else {
		to = append(to, s.ports...)
	}
	s.mu.Unlock()
	for _, q := range to {
		if q == src {
			continue
		}
		select {
		case q.out <- f: // read-only from here on: shared by the ports it floods to
		default:
		}
	}
}

// frames returns how many unicast frames went from port from to port to.
func (s *frameSwitch) frames(from, to string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.unicast[[2]string{from, to}]
}

// close closes every port and waits for the switch's goroutines.
func (s *frameSwitch) close() {
	s.mu.Lock()
	ports := s.ports
	s.mu.Unlock()
	for _, p := range ports {
		p.close()
	}
	s.wg.Wait()
}

// newStack returns a host gVisor stack with a port on the switch, at addr.
func (s *frameSwitch) newStack(name string, addr netip.Prefix, log *slog.Logger) (*netstack.Stack, error) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socketpair: %w", err)
	}
	var conns [2]net.Conn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), name)
		conns[i], err = net.FileConn(f)
		f.Close()
		if err != nil {
			for _, c := range conns {
				if c != nil {
					c.Close()
				}
			}
			return nil, fmt.Errorf("socketpair: %w", err)
		}
	}
	s.attach(name, conns[0])
	link := netstack.NewStreamLink(conns[1], &netstack.StreamLinkOptions{Logger: log})
	st, err := netstack.New(link, netstack.Config{Name: name, Addrs: []netip.Prefix{addr}, Logger: log})
	if err != nil {
		conns[1].Close()
		return nil, fmt.Errorf("host stack %s: %w", name, err)
	}
	return st, nil
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
func startLevel3Guest(ctx context.Context, img, name, mac string, sw *frameSwitch, log *slog.Logger) (_ *level3Guest, err error) {
	log = log.With("guest", name)
	cfg := guestConfig{QEMU: "qemu-system-x86_64", Image: img, Net: netStream, BootTimeout: time.Minute}
	g := &guest{cfg: cfg, log: log, exited: make(chan struct{}), rmDir: true}
	if g.dir, err = os.MkdirTemp("", "captp-l3"); err != nil {
		return nil, fmt.Errorf("socket directory: %w", err)
	}
	defer func() {
		if err != nil {
			g.Close()
		}
	}()
	bootCtx, cancel := context.WithTimeout(ctx, cfg.BootTimeout)
	defer cancel()
	serialSock, netSock := filepath.Join(g.dir, "serial.sock"), filepath.Join(g.dir, "net.sock")
	serialLis, err := net.Listen("unix", serialSock)
	if err != nil {
		return nil, fmt.Errorf("serial socket: %w", err)
	}
	defer serialLis.Close()
	netLis, err := net.Listen("unix", netSock)
	if err != nil {
		return nil, fmt.Errorf("network socket: %w", err)
	}
	defer netLis.Close()

	// The card's MAC address is the guest's configuration: level3vat
	// takes 10.A.B.C/24 from xx:xx:xx:A:B:C.
	args := append(cfg.qemuArgs(serialSock, netSock), "-global", "virtio-net-device.mac="+mac)
	g.cmd = exec.Command(cfg.QEMU, args...)
	out, err := g.cmd.StdoutPipe()
	if err != nil {
		return nil, fmt.Errorf("qemu: %w", err)
	}
	g.cmd.Stderr = g.cmd.Stdout
	log.Debug("level3: starting qemu", "cmd", cfg.QEMU+" "+strings.Join(args, " "))
	if err := g.cmd.Start(); err != nil {
		return nil, fmt.Errorf("qemu: %w", err)
	}
	g.output.Add(1)
	go g.console(out)
	go g.wait()

	nc, err := accept(bootCtx, netLis, g.exited)
	if err != nil {
		return nil, fmt.Errorf("waiting for qemu to connect the network socket: %w", g.explain(err))
	}
	sw.attach(name, nc)
	sc, err := accept(bootCtx, serialLis, g.exited)
	if err != nil {
		return nil, fmt.Errorf("waiting for qemu to connect the serial port: %w", g.explain(err))
	}
	g.Serial = core.NewConn(sc, &core.Options{Logger: log})
	lg := &level3Guest{guest: g, name: name, test: testcapnp.Test(g.Serial.Bootstrap(ctx))}
	defer func() {
		if err != nil {
			lg.test.Release()
		}
	}()
	f, release := lg.test.Name(bootCtx, nil)
	defer release()
	res, err := f.Struct()
	if err != nil {
		return nil, fmt.Errorf("guest vat over the serial port: %w", g.explain(err))
	}
	uri, err := res.Name()
	if err != nil {
		return nil, fmt.Errorf("guest vat's name: %w", err)
	}
	if lg.ref, err = sturdyref.Parse(uri); err != nil {
		return nil, fmt.Errorf("guest vat's name %q is not its sturdy ref: %w", uri, err)
	}
	return lg, nil
}

// close ends the guest: the vat exits when its serial connection closes.
func (g *level3Guest) close() (int, error) {
	g.test.Release()
	return g.guest.Close()
}

// log returns the seq calls the guest's Test object received, in order,
// asked over the serial port.
func (g *level3Guest) log(ctx context.Context) ([]uint32, error) {
	f, release := g.test.Log(ctx, nil)
	defer release()
	res, err := f.Struct()
	if err != nil {
		return nil, fmt.Errorf("%s.log(): %w", g.name, err)
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
// segments. It records what it writes to each vat it dials.
type hostVat struct {
	id     *secure.Identity
	net    *secure.Network
	stacks []*netstack.Stack
	log    *slog.Logger

	mu   sync.Mutex
	taps map[string]*tapConn // by the dialed address
}

func newHostVat(log *slog.Logger, stacks ...*netstack.Stack) (*hostVat, error) {
	id, err := secure.Generate()
	if err != nil {
		return nil, err
	}
	v := &hostVat{id: id, net: secure.NewNetwork(id), stacks: stacks, log: log, taps: make(map[string]*tapConn)}
	v.net.SetDialer(v.dialVat)
	return v, nil
}

// dialVat is the network's dialer: TLS pinned to ref's fingerprint over
// the stack on ref's segment, recorded.
func (v *hostVat) dialVat(ctx context.Context, ref sturdyref.Ref) (*core.Conn, error) {
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
	raw, err := st.DialTCP(ctx, ref.Address.HostPort())
	if err != nil {
		return nil, err
	}
	tc, err := secure.Client(ctx, raw, v.id, ref)
	if err != nil {
		return nil, err
	}
	tap := &tapConn{Conn: tc}
	v.mu.Lock()
	v.taps[ref.Address.HostPort()] = tap
	v.mu.Unlock()
	return core.NewConn(tap, &core.Options{Vat: v.net.Vat(), Logger: v.log}), nil
}

// calls counts the Call messages this vat has sent to the vat at ref.
func (v *hostVat) calls(ref sturdyref.Ref) int {
	v.mu.Lock()
	tap := v.taps[ref.Address.HostPort()]
	v.mu.Unlock()
	if tap == nil {
		return 0
	}
	return tap.calls()
}

// A tapConn keeps a copy of what is written to its connection. NetConn
// lets secure.Network find the TLS connection underneath.
type tapConn struct {
	net.Conn
	mu  sync.Mutex
	out bytes.Buffer
}

func (c *tapConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	c.out.Write(p)
	c.mu.Unlock()
	return c.Conn.Write(p)
}

func (c *tapConn) NetConn() net.Conn { return c.Conn }

// calls decodes the messages written so far and counts the Calls.
func (c *tapConn) calls() int {
	c.mu.Lock()
	data := bytes.Clone(c.out.Bytes())
	c.mu.Unlock()
	dec := capnp.NewDecoder(bytes.NewReader(data))
	n := 0
	for {
		msg, err := dec.Decode()
		if err != nil {
			return n
		}
		m, err := rpccp.ReadRootMessage(msg)
		if err == nil && m.Which() == rpccp.Message_Which_call {
			n++
		}
	}
}

// The switch and the host vat's call counter, without QEMU: two host
// stacks on a switch, one serving a Test over TLS, the other dialing it
// as a hostVat; and a port that sends a malformed frame is dropped.
func TestFrameSwitchAndHostVat(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	log := testLogger(t)
	sw := newFrameSwitch(log)
	defer sw.close()
	a, err := sw.newStack("a", netip.MustParsePrefix("10.0.9.1/24"), log)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := sw.newStack("b", netip.MustParsePrefix("10.0.9.2/24"), log)
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
	if sw.frames("a", "b") == 0 || sw.frames("b", "a") == 0 {
		t.Errorf("unicast frames a→b %d, b→a %d; want some each way", sw.frames("a", "b"), sw.frames("b", "a"))
	}

	// A port that sends a 3-byte frame is dropped, and the others go on.
	bad, peer := net.Pipe()
	sw.attach("bad", bad)
	go peer.Write([]byte{0, 0, 0, 3, 1, 2, 3})
	if _, err := io.ReadAll(peer); err != nil {
		t.Errorf("the malformed port's stream: %v", err)
	}
	peer.Close()
	f, rel := boot.Name(ctx, nil)
	defer rel()
	if _, err := f.Struct(); err != nil {
		t.Errorf("a call after the malformed port was dropped: %v", err)
	}
}
