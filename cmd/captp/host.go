package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/adapters/netcap"
	"github.com/captp-go/captp/adapters/netstack"
	"github.com/captp-go/captp/adapters/unix"
	"github.com/captp-go/captp/boards/microvm"
	"github.com/captp-go/captp/core"
)

// Network modes of a guest.
const (
	netNone   = "none"   // serial port only
	netStream = "stream" // virtio-net over -netdev stream, served by adapters/netstack
	netUser   = "user"   // virtio-net behind QEMU's user-mode NAT, hostfwd to a loopback port
)

// The guest's TCP service (boards/microvm/vat) and the host's address on
// a -netdev stream link.
var (
	guestTCPAddr = netip.MustParseAddrPort("10.0.2.15:4000")
	hostNetAddr  = netip.MustParsePrefix("10.0.2.1/24")
)

func setupHost(fs *flag.FlagSet) func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cfg guestConfig
	var images hostImages
	fs.Var(&images, "image", "`[NAME=]image` to boot: a TamaGo ELF such as vat.elf from make tamago, with an optional guest name (default: the file's base name); repeat it to boot a group of guests on one Ethernet segment")
	fs.StringVar(&cfg.QEMU, "qemu", "qemu-system-x86_64", "QEMU `binary`")
	fs.StringVar(&cfg.Net, "net", netStream, "guest network: none (serial only), stream (-netdev stream to this process's gVisor stack; with several guests, one segment shared by the guests and this process) or user (QEMU's NAT with hostfwd; one guest only)")
	fs.StringVar(&cfg.Memory, "m", "2G", "guest memory (QEMU -m), per guest")
	via := fs.String("via", "", "which guest connection to re-serve: serial or tcp (default tcp with one guest and a network, else serial)")
	listen := fs.String("listen", "", "`address` to re-serve the guest's bootstrap capability on, such as unix:/tmp/guest.sock; a directory (unix:/tmp/guests/) gets one socket per guest, NAME.sock (required)")
	subnet := fs.String("subnet", defaultSegment.String(), "a group's Ethernet segment, `10.A.B.0/24`: the host is 10.A.B.1, the guests 10.A.B.2, .3, ... through their MAC addresses 52:54:00:A:B:n")
	var forwards hostPorts
	fs.Var(&forwards, "forward", "on a group's segment, forward each guest's TCP `port` to a socket NAME.PORT.sock in the -listen directory, such as 4433 for level3vat's TLS service (repeatable)")
	boot := fs.Duration("boot-timeout", 30*time.Second, "give up if a guest has not answered after this long")
	verbose := fs.Bool("v", false, "log connection diagnostics too, not only the guests' consoles")
	cfg.Policy = netcapFlags(fs)
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
		if len(args) > 0 {
			return usageError{fmt.Errorf("unexpected arguments %q", args)}
		}
		if len(images) == 0 || *listen == "" {
			return usageError{errors.New("-image and -listen are required")}
		}
		level := slog.LevelInfo
		if *verbose {
			level = slog.LevelDebug
		}
		log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
		cfg.BootTimeout = *boot
		if len(images) == 1 && images[0].name == "" && !isDirListen(*listen) && len(forwards) == 0 {
			cfg.Image = images[0].image
			return runHost(ctx, cfg, *via, *listen, stdout, log)
		}
		seg, err := netip.ParsePrefix(*subnet)
		if err != nil {
			return usageError{fmt.Errorf("-subnet: %w", err)}
		}
		return runHostGroup(ctx, hostGroupConfig{
			guest: cfg, images: images, via: *via, listen: *listen, segment: seg, forwards: forwards,
		}, stdout, log)
	}
}

// runHost boots a guest and re-serves its bootstrap capability on listen
// until ctx ends or the guest exits.
func runHost(ctx context.Context, cfg guestConfig, via, listen string, stdout io.Writer, log *slog.Logger) error {
	if via == "" {
		via = "tcp"
		if cfg.Net == netNone || cfg.Net == "" {
			via = "serial"
		}
	}
	if via != "serial" && via != "tcp" {
		return usageError{fmt.Errorf("-via %q: want serial or tcp", via)}
	}
	lis, err := unix.Listen(listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	g, err := startGuest(ctx, cfg, log)
	if err != nil {
		lis.Close()
		return err
	}
	if via == "tcp" && g.TCP == nil {
		lis.Close()
		g.Close()
		return usageError{errors.New("-via tcp needs -net stream or user")}
	}
	boot := g.Serial.Bootstrap(ctx)
	if via == "tcp" {
		boot.Release()
		boot = g.TCP.Bootstrap(ctx)
	}
	fmt.Fprintf(stdout, "captp host: guest %s booted; its bootstrap capability (via %s) is served on %s\n", filepath.Base(cfg.Image), via, listen)
	sctx, cancel := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() { served <- unix.Serve(sctx, lis, &core.Options{BootstrapClient: boot, Logger: log}) }()
	var guestErr error
	select {
	case <-ctx.Done():
	case <-g.Exited():
		guestErr = fmt.Errorf("guest exited: %w", g.ExitErr())
	case err := <-served:
		// Serve ends early only if accepting failed for good: nobody
		// can reach the guest any more.
		guestErr = fmt.Errorf("re-serving the guest on %s: %w", listen, err)
		served <- err // for the wait below
	}
	cancel()
	<-served
	code, err := g.Close()
	if guestErr != nil {
		return guestErr
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "captp host: guest exited with status %d\n", code)
	return nil
}

// guestConfig describes a QEMU guest (microvm, TCG) running a TamaGo
// image built for boards/microvm.
type guestConfig struct {
	QEMU   string // binary; "" means qemu-system-x86_64
	Image  string // ELF image
	Memory string // -m; "" means 2G
	Net    string // netNone, netStream or netUser; "" means netNone
	// Dir holds the sockets; "" means a new temporary directory, removed
	// on Close.
	Dir string
	// HostFwdPort is the loopback port forwarded to the guest's service
	// with Net netUser; 0 picks a free one.
	HostFwdPort int
	// BootTimeout bounds the wait for the guest to answer; 0 means 30s.
	BootTimeout time.Duration
	// Policy limits the Network the host offers the guest as its
	// bootstrap capability; nil denies everything.
	Policy *netcap.Policy

	// Name labels the guest's log lines and its Switch port; "" means
	// "guest".
	Name string
	// MAC is the guest card's Ethernet address (QEMU's virtio-net mac
	// property), such as 52:54:00:00:00:02; "" keeps QEMU's default.
	// boards/microvm/level3vat takes its IP address from it.
	MAC string
	// Switch, with Net netStream, joins the guest's card to a segment
	// shared with other guests and host stacks (port Name) instead of
	// giving it a host stack of its own; the guest then has no TCP
	// connection (its address is its image's business).
	Switch *netstack.Switch
}

// qemuArgs returns QEMU's command line (without the binary) for cfg with
// the guest's data serial port and network (netStream) connecting to
// serialSock and netSock, which the host listens on. The console (COM1)
// is QEMU's standard output.
func (cfg guestConfig) qemuArgs(serialSock, netSock string) []string {
	mem := cfg.Memory
	if mem == "" {
		mem = "2G"
	}
	args := []string{
		// The PIT is the board's reference for calibrating the TSC.
		"-machine", "microvm,x-option-roms=on,pit=on,pic=off,rtc=on",
		"-global", "virtio-mmio.force-legacy=false",
		"-accel", "tcg", "-cpu", "max",
		"-m", mem,
		"-no-reboot", "-display", "none", "-monitor", "none", "-nodefaults",
		// COM1: console on stdout. An explicit -serial is needed: a
		// -device isa-serial disables QEMU's default serial port.
		"-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con",
		// COM2: the CapTP lifeline. QEMU connects before the guest runs,
		// so no byte is lost.
		"-chardev", "socket,id=ser1,path=" + serialSock + ",server=off",
		"-device", "isa-serial,chardev=ser1,iobase=0x2f8,irq=3,index=1",
		"-device", fmt.Sprintf("isa-debug-exit,iobase=%#x,iosize=0x04", microvm.DebugExit),
	}
	card := "virtio-net-device,netdev=n0"
	if cfg.MAC != "" {
		card += ",mac=" + cfg.MAC
	}
	switch cfg.Net {
	case netStream:
		args = append(args,
			"-netdev", "stream,id=n0,server=off,addr.type=unix,addr.path="+netSock,
			"-device", card)
	case netUser:
		args = append(args,
			"-netdev", fmt.Sprintf("user,id=n0,net=10.0.2.0/24,restrict=on,hostfwd=tcp:127.0.0.1:%d-%s:%d",
				cfg.HostFwdPort, guestTCPAddr.Addr(), guestTCPAddr.Port()),
			"-device", card)
	}
	return append(args, "-kernel", cfg.Image)
}

// A guest is a running QEMU process with captp connections to its vat.
type guest struct {
	cfg    guestConfig
	log    *slog.Logger
	dir    string
	rmDir  bool
	cmd    *exec.Cmd
	output sync.WaitGroup

	// Serial is the connection over the guest's serial port; closing it
	// makes boards/microvm/vat exit.
	Serial *core.Conn
	// TCP is the connection over the guest's network, nil without one.
	TCP   *core.Conn
	stack *netstack.Stack

	// The guest's Network (netcap), offered on Serial and TCP.
	netSrv  *netcap.Server
	network netcap.Network

	exited  chan struct{}
	exitErr error // set before exited closes
	status  int   // QEMU's exit status, set before exited closes

	closeOnce sync.Once
}

// startGuest boots cfg's image and connects to its vat over the serial
// port and, with a network, over TCP. It returns once the guest has
// answered a Bootstrap on each.
func startGuest(ctx context.Context, cfg guestConfig, log *slog.Logger) (_ *guest, err error) {
	if cfg.QEMU == "" {
		cfg.QEMU = "qemu-system-x86_64"
	}
	if cfg.Net == "" {
		cfg.Net = netNone
	}
	if cfg.BootTimeout <= 0 {
		cfg.BootTimeout = 30 * time.Second
	}
	switch cfg.Net {
	case netNone, netStream, netUser:
	default:
		return nil, usageError{fmt.Errorf("network %q: want none, stream or user", cfg.Net)}
	}
	if _, err := os.Stat(cfg.Image); err != nil {
		return nil, fmt.Errorf("guest image: %w", err)
	}
	if cfg.MAC != "" {
		if _, err := net.ParseMAC(cfg.MAC); err != nil {
			return nil, usageError{fmt.Errorf("guest MAC address: %w", err)}
		}
	}
	if cfg.Name == "" {
		cfg.Name = "guest"
	}
	g := &guest{cfg: cfg, log: log, dir: cfg.Dir, exited: make(chan struct{})}
	if g.dir == "" {
		// Short: Unix socket paths are limited to 108 bytes.
		if g.dir, err = os.MkdirTemp("", "captp-host"); err != nil {
			return nil, fmt.Errorf("socket directory: %w", err)
		}
		g.rmDir = true
	}
	defer func() {
		if err != nil {
			g.Close()
		}
	}()
	bootCtx, cancel := context.WithTimeout(ctx, cfg.BootTimeout)
	defer cancel()
	g.startNetwork()

	serialSock, netSock := filepath.Join(g.dir, "serial.sock"), filepath.Join(g.dir, "net.sock")
	serialLis, err := net.Listen("unix", serialSock)
	if err != nil {
		return nil, fmt.Errorf("serial socket: %w", err)
	}
	defer serialLis.Close()
	var netLis net.Listener
	if cfg.Net == netStream {
		if netLis, err = net.Listen("unix", netSock); err != nil {
			return nil, fmt.Errorf("network socket: %w", err)
		}
		defer netLis.Close()
	}
	if cfg.Net == netUser && cfg.HostFwdPort == 0 {
		if cfg.HostFwdPort, err = freePort(); err != nil {
			return nil, err
		}
		g.cfg.HostFwdPort = cfg.HostFwdPort
	}

	args := cfg.qemuArgs(serialSock, netSock)
	g.cmd = exec.Command(cfg.QEMU, args...)
	g.cmd.Stdin = nil
	detachQEMU(g.cmd)
	out, err := g.cmd.StdoutPipe()
	if err != nil {
		return nil, fmt.Errorf("qemu: %w", err)
	}
	g.cmd.Stderr = g.cmd.Stdout
	log.Debug("captp host: starting qemu", "cmd", cfg.QEMU+" "+strings.Join(args, " "))
	if err := g.cmd.Start(); err != nil {
		return nil, fmt.Errorf("qemu: %w", err)
	}
	g.output.Add(1)
	go g.console(out)
	go g.wait()

	if cfg.Net == netStream && cfg.Switch != nil {
		nc, err := accept(bootCtx, netLis, g.exited)
		if err != nil {
			return nil, fmt.Errorf("waiting for qemu to connect the network socket: %w", g.explain(err))
		}
		if err := cfg.Switch.Attach(cfg.Name, nc); err != nil {
			return nil, err
		}
	}

	serialConn, err := accept(bootCtx, serialLis, g.exited)
	if err != nil {
		return nil, fmt.Errorf("waiting for qemu to connect the serial port: %w", g.explain(err))
	}
	g.Serial = core.NewConn(serialConn, g.connOptions())
	if err := g.ready(bootCtx, g.Serial); err != nil {
		return nil, fmt.Errorf("guest vat over the serial port: %w", g.explain(err))
	}

	switch {
	case cfg.Net == netStream && cfg.Switch != nil:
		// On a shared segment: attached above.
	case cfg.Net == netStream:
		// Not :=, which would shadow err and lose dialTCP's error below.
		var nc net.Conn
		if nc, err = accept(bootCtx, netLis, g.exited); err != nil {
			return nil, fmt.Errorf("waiting for qemu to connect the network socket: %w", g.explain(err))
		}
		link := netstack.NewStreamLink(nc, &netstack.StreamLinkOptions{Logger: log})
		if g.stack, err = netstack.New(link, netstack.Config{Name: "captp-host", Addrs: []netip.Prefix{hostNetAddr}, Logger: log}); err != nil {
			nc.Close()
			return nil, fmt.Errorf("host network stack: %w", err)
		}
		g.TCP, err = g.dialTCP(bootCtx, func(ctx context.Context) (*core.Conn, error) {
			return g.stack.Dial(ctx, guestTCPAddr.String(), g.connOptions())
		})
	case cfg.Net == netUser:
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(cfg.HostFwdPort))
		g.TCP, err = g.dialTCP(bootCtx, func(ctx context.Context) (*core.Conn, error) {
			return unix.Dial(ctx, addr, g.connOptions())
		})
	}
	if err != nil {
		return nil, fmt.Errorf("guest vat over TCP: %w", g.explain(err))
	}
	return g, nil
}

// freePort returns a loopback TCP port that was free a moment ago.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("picking a port for hostfwd: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// accept accepts one connection, giving up when ctx ends or QEMU exits.
func accept(ctx context.Context, lis net.Listener, exited <-chan struct{}) (net.Conn, error) {
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		select {
		case <-ctx.Done():
		case <-exited:
		case <-stop:
			return
		}
		lis.Close()
	}()
	c, err := lis.Accept()
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, err
	}
	return c, nil
}

// ready waits until the vat on conn has answered a Bootstrap.
func (g *guest) ready(ctx context.Context, conn *core.Conn) error {
	boot := conn.Bootstrap(ctx)
	defer boot.Release()
	return boot.Resolve(ctx)
}

// dialTCP dials the guest's service until it answers: the guest listens
// only once its network is up, and QEMU's hostfwd accepts connections
// before the guest does. It backs off from 50ms to 1s between attempts.
func (g *guest) dialTCP(ctx context.Context, dial func(context.Context) (*core.Conn, error)) (*core.Conn, error) {
	backoff := 50 * time.Millisecond
	for {
		conn, err := dial(ctx)
		if err == nil {
			rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			err = g.ready(rctx, conn)
			cancel()
			if err == nil {
				return conn, nil
			}
			conn.Close()
		}
		g.log.Debug("captp host: guest TCP not ready", "err", err)
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("%w (last attempt: %v)", ctx.Err(), err)
		case <-g.exited:
			t.Stop()
			return nil, errors.New("qemu exited")
		case <-t.C:
		}
		backoff = min(2*backoff, time.Second)
	}
}

// console logs the guest's console (and QEMU's messages) line by line.
func (g *guest) console(r io.Reader) {
	defer g.output.Done()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 4096), 64<<10)
	for sc.Scan() {
		g.log.Info("guest", "console", sc.Text())
	}
}

func (g *guest) wait() {
	g.output.Wait() // Wait must follow the end of the pipe's reads
	err := g.cmd.Wait()
	g.status = g.cmd.ProcessState.ExitCode()
	if err != nil {
		if code, ok := microvm.ExitStatus(g.status); ok && code != 0 {
			err = fmt.Errorf("guest exit code %d (qemu status %d)", code, g.status)
		} else if ok {
			err = nil // isa-debug-exit with code 0
		}
	}
	g.exitErr = err
	close(g.exited)
}

// explain adds why QEMU ended to err, if it did.
func (g *guest) explain(err error) error {
	select {
	case <-g.exited:
		return fmt.Errorf("%w (qemu exited with status %d: %v; see the log for its output)", err, g.status, g.exitErr)
	default:
		return err
	}
}

// Bootstrap returns the guest's bootstrap capability over TCP if there is
// a network, else over the serial port.
func (g *guest) Bootstrap(ctx context.Context) capnp.Client {
	if g.TCP != nil {
		return g.TCP.Bootstrap(ctx)
	}
	return g.Serial.Bootstrap(ctx)
}

// Exited is closed when QEMU has exited.
func (g *guest) Exited() <-chan struct{} { return g.exited }

// ExitErr is why QEMU exited (nil for a guest exit code 0); valid after
// Exited is closed.
func (g *guest) ExitErr() error { return g.exitErr }

// guestExitTimeout bounds how long Close waits for the guest to exit
// after its serial connection closed, before killing QEMU.
const guestExitTimeout = 10 * time.Second

// Close closes the connections, which makes the vat exit, waits for QEMU
// (killing it after guestExitTimeout) and returns the guest's exit code.
func (g *guest) Close() (code int, err error) {
	g.closeOnce.Do(func() {
		if g.TCP != nil {
			g.TCP.Close()
		}
		if g.stack != nil {
			g.stack.Close()
		}
		if g.Serial != nil {
			g.Serial.Close()
		}
		g.stopNetwork()
		if g.cmd != nil && g.cmd.Process != nil {
			wait := guestExitTimeout
			if g.Serial == nil {
				wait = 0 // the vat never connected: nothing tells it to exit
			}
			t := time.NewTimer(wait)
			select {
			case <-g.exited:
			case <-t.C:
				g.log.Warn("captp host: guest did not exit; killing qemu")
				g.cmd.Process.Kill()
				<-g.exited
			}
			t.Stop()
		}
		if g.rmDir {
			os.RemoveAll(g.dir)
		}
	})
	if g.cmd == nil || g.cmd.Process == nil {
		return 0, nil
	}
	<-g.exited
	code, ok := microvm.ExitStatus(g.status)
	if !ok {
		return 0, fmt.Errorf("qemu exited with status %d, not through isa-debug-exit: %v", g.status, g.exitErr)
	}
	return code, g.exitErr
}
