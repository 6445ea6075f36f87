package main

import (
	"errors"
	"flag"
	"io"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/captp-go/captp/adapters/netcap"
	"github.com/captp-go/captp/core"
)

func TestHostNetcapFlags(t *testing.T) {
	fs := flag.NewFlagSet("host", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	p := netcapFlags(fs)
	if err := fs.Parse([]string{
		"-allow-connect", "tcp:10.0.0.0/8:80-443",
		"-allow-connect", "tcp:example.com:443",
		"-allow-listen", "tcp:127.0.0.1:8000",
		"-net-max-streams", "5",
	}); err != nil {
		t.Fatal(err)
	}
	if got := p.Connect.String(); got != "tcp:10.0.0.0/8:80-443 tcp:example.com:443" {
		t.Errorf("connect rules %q", got)
	}
	if got := p.Listen.String(); got != "tcp:127.0.0.1:8000" {
		t.Errorf("listen rules %q", got)
	}
	if p.MaxStreams != 5 || p.MaxListeners != netcap.DefaultMaxListeners {
		t.Errorf("limits %d, %d", p.MaxStreams, p.MaxListeners)
	}
	fs = flag.NewFlagSet("host", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	netcapFlags(fs)
	if err := fs.Parse([]string{"-allow-connect", "10.0.0.0/8"}); err == nil {
		t.Error("a malformed rule was accepted")
	}
}

// hostGuest is a guest struct as startGuest makes it, without QEMU: the
// "guest" is a captp connection in this process, as the TamaGo vat's
// serial connection would be.
func hostGuest(t *testing.T, p *netcap.Policy) (*guest, netcap.Network) {
	t.Helper()
	g := &guest{cfg: guestConfig{Policy: p}, log: testLogger(t), exited: make(chan struct{})}
	g.startNetwork()
	guestSide, hostSide := net.Pipe()
	g.Serial = core.NewConn(hostSide, g.connOptions())
	vat := core.NewConn(guestSide, nil)
	n := netcap.Network(vat.Bootstrap(t.Context()))
	t.Cleanup(func() {
		n.Release()
		vat.Close()
		g.Close()
	})
	return g, n
}

// The host offers its guest a Network limited by the -allow flags; the
// guest's sockets close with the guest.
func TestHostOffersNetwork(t *testing.T) {
	echo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	remoteEnd := make(chan net.Conn, 1)
	go func() {
		c, err := echo.Accept()
		if err != nil {
			return
		}
		remoteEnd <- c
	}()
	port := strconv.Itoa(echo.Addr().(*net.TCPAddr).Port)
	fs := flag.NewFlagSet("host", flag.ContinueOnError)
	p := netcapFlags(fs)
	if err := fs.Parse([]string{"-allow-connect", "tcp:127.0.0.1:" + port}); err != nil {
		t.Fatal(err)
	}
	g, n := hostGuest(t, p)

	c, err := netcap.Dial(t.Context(), n, "tcp", echo.Addr().String())
	if err != nil {
		t.Fatalf("guest Dial: %v", err)
	}
	defer c.Close()
	rc := <-remoteEnd
	defer rc.Close()
	if _, err := c.Write([]byte("from the guest")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 14)
	if _, err := io.ReadFull(rc, buf); err != nil || string(buf) != "from the guest" {
		t.Fatalf("remote read %q, %v", buf, err)
	}
	if _, err := netcap.Dial(t.Context(), n, "tcp", "127.0.0.1:1"); !errors.Is(err, netcap.ErrDenied) {
		t.Errorf("Dial to a port not allowed = %v, want ErrDenied", err)
	}
	if _, err := netcap.Listen(t.Context(), n, "tcp", "127.0.0.1:0"); !errors.Is(err, netcap.ErrDenied) {
		t.Errorf("Listen without -allow-listen = %v, want ErrDenied", err)
	}

	// The guest going away closes its sockets.
	g.Close()
	rc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := rc.Read(buf); err != io.EOF {
		t.Errorf("remote end after the guest closed: %v, want EOF", err)
	}
}

// Without -allow flags the guest still gets a Network, which denies
// everything.
func TestHostDefaultNetworkDenies(t *testing.T) {
	fs := flag.NewFlagSet("host", flag.ContinueOnError)
	p := netcapFlags(fs)
	if err := fs.Parse(nil); err != nil {
		t.Fatal(err)
	}
	_, n := hostGuest(t, p)
	if _, err := netcap.Dial(t.Context(), n, "tcp", "127.0.0.1:80"); !errors.Is(err, netcap.ErrDenied) {
		t.Errorf("Dial = %v, want ErrDenied", err)
	}
	_, n = hostGuest(t, nil)
	if _, err := netcap.Listen(t.Context(), n, "tcp", ":8080"); !errors.Is(err, netcap.ErrDenied) {
		t.Errorf("Listen with a nil policy = %v, want ErrDenied", err)
	}
}
