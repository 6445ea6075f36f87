package netstack

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	"go.uber.org/goleak"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// testTimeout bounds each test's blocking calls; generous for -race on a
// loaded machine.
const testTimeout = 60 * time.Second

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), testTimeout)
	t.Cleanup(cancel)
	return ctx
}

// serveVat listens on port 4000 of s and serves a new test object named
// name. The returned function stops serving and reports Serve's error.
func serveVat(t *testing.T, s *Stack, name string, live *testimpl.Live) (stop func() error) {
	t.Helper()
	lis, err := s.Listen("*:4000")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() {
		served <- Serve(ctx, lis, &core.Options{BootstrapClient: capnp.Client(testimpl.New(name, live).Client())})
	}()
	return func() error {
		cancel()
		return <-served
	}
}

func callName(ctx context.Context, t testing.TB, c testcapnp.Test) string {
	f, release := c.Name(ctx, nil)
	defer release()
	res, err := f.Struct()
	if err != nil {
		t.Errorf("name(): %v", err)
		return ""
	}
	name, _ := res.Name()
	return name
}

func TestDialBootstrapPipeline(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	ctx := testContext(t)
	network := NewNetwork(&NetworkOptions{Logger: testLogger(t)})
	defer network.Close()
	var live testimpl.Live

	server, err := network.NewStack(Config{Name: "server"})
	if err != nil {
		t.Fatal(err)
	}
	client, err := network.NewStack(Config{Name: "client"})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := server.Addr(), netip.MustParseAddr("10.0.0.1"); got != want {
		t.Errorf("server address %v, want %v", got, want)
	}
	if got, want := client.Addrs(), []netip.Prefix{netip.MustParsePrefix("10.0.0.2/16")}; len(got) != 1 || got[0] != want[0] {
		t.Errorf("client addresses %v, want %v", got, want)
	}
	stop := serveVat(t, server, "server", &live)

	conn, err := client.Dial(ctx, "10.0.0.1:4000", nil)
	if err != nil {
		t.Fatal(err)
	}
	boot := testcapnp.Test(conn.Bootstrap(ctx))
	// Pipelined on the bootstrap promise and then on child's result, all
	// sent before any answer arrives.
	f, release := boot.Child(ctx, func(p testcapnp.Test_child_Params) error { return p.SetName("kid") })
	grand, release2 := f.Child().Child(ctx, func(p testcapnp.Test_child_Params) error { return p.SetName("grandkid") })
	if got := callName(ctx, t, grand.Child()); got != "grandkid" {
		t.Errorf("pipelined name = %q, want grandkid", got)
	}
	if got := callName(ctx, t, boot); got != "server" {
		t.Errorf("bootstrap name = %q, want server", got)
	}
	release2()
	release()
	boot.Release()
	if err := conn.Close(); err != nil {
		t.Errorf("conn.Close: %v", err)
	}
	if err := stop(); !errors.Is(err, context.Canceled) {
		t.Errorf("Serve returned %v, want context.Canceled", err)
	}
	if err := live.WaitZero(ctx); err != nil {
		t.Errorf("%d test objects still live: %v", live.Count(), err)
	}
	// Frames for a stack that is already closed would count; none is.
	if st := network.Stats(); st.Undeliverable != 0 {
		t.Errorf("network dropped %d frames", st.Undeliverable)
	}
	if err := network.Close(); err != nil {
		t.Error(err)
	}
}

func TestIPv6(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	ctx := testContext(t)
	network := NewNetwork(&NetworkOptions{Logger: testLogger(t)})
	defer network.Close()
	a, err := network.NewStack(Config{Name: "a", Addrs: []netip.Prefix{netip.MustParsePrefix("fd00::a/64")}})
	if err != nil {
		t.Fatal(err)
	}
	b, err := network.NewStack(Config{Name: "b", Addrs: []netip.Prefix{
		netip.MustParsePrefix("fd00::b/64"), netip.MustParsePrefix("192.168.7.2/24"),
	}})
	if err != nil {
		t.Fatal(err)
	}
	stop := serveVat(t, b, "b", nil)
	defer stop()

	conn, err := a.Dial(ctx, "[fd00::b]:4000", nil)
	if err != nil {
		t.Fatal(err)
	}
	boot := testcapnp.Test(conn.Bootstrap(ctx))
	if got := callName(ctx, t, boot); got != "b" {
		t.Errorf("name over IPv6 = %q, want b", got)
	}
	boot.Release()
	conn.Close()

	// b's IPv4 address is on a subnet a has no route to.
	if _, err := a.Dial(ctx, "192.168.7.2:4000", nil); err == nil {
		t.Error("dial to an unroutable address succeeded")
	}
}

func TestDialErrors(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	ctx := testContext(t)
	network := NewNetwork(nil)
	defer network.Close()
	s, err := network.NewStack(Config{})
	if err != nil {
		t.Fatal(err)
	}
	peer, err := network.NewStack(Config{})
	if err != nil {
		t.Fatal(err)
	}
	for _, addr := range []string{"*:4000", "localhost:4000", "10.0.0.2", "10.0.0.2:99999"} {
		if _, err := s.Dial(ctx, addr, nil); !errors.Is(err, ErrBadAddress) {
			t.Errorf("Dial(%q) = %v, want ErrBadAddress", addr, err)
		}
	}
	// Nobody listens: the peer resets the connection.
	if _, err := s.Dial(ctx, peer.Addr().String()+":4000", nil); err == nil {
		t.Error("dial to a closed port succeeded")
	} else {
		t.Log(err)
	}
	// An address nobody has: ARP fails, or ctx ends first.
	short, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	if _, err := s.Dial(short, "10.0.9.9:4000", nil); err == nil {
		t.Error("dial to a missing host succeeded")
	}
	s.Close()
	if _, err := s.Dial(ctx, peer.Addr().String()+":4000", nil); !errors.Is(err, ErrClosed) {
		t.Errorf("dial on a closed stack: %v, want ErrClosed", err)
	}
	if _, err := s.Listen("*:1"); !errors.Is(err, ErrClosed) {
		t.Errorf("listen on a closed stack: %v, want ErrClosed", err)
	}
	network.Close()
	if _, err := network.NewStack(Config{}); !errors.Is(err, ErrClosed) {
		t.Errorf("NewStack on a closed network: %v, want ErrClosed", err)
	}
}

func TestNewStackErrors(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	network := NewNetwork(&NetworkOptions{Prefix: netip.MustParsePrefix("10.1.0.0/30")})
	defer network.Close()
	mac := net.HardwareAddr{0x02, 0, 0, 0, 0, 1}
	if _, err := network.NewStack(Config{MAC: mac}); err != nil {
		t.Fatal(err)
	}
	if _, err := network.NewStack(Config{MAC: mac}); err == nil {
		t.Error("two stacks with one MAC address")
	}
	if _, err := network.NewStack(Config{MAC: net.HardwareAddr{1, 2}}); err == nil {
		t.Error("a 2-byte MAC address was accepted")
	}
	// A /30 has two host addresses; the first went to the first stack.
	if _, err := network.NewStack(Config{}); err != nil {
		t.Fatal(err)
	}
	if _, err := network.NewStack(Config{}); err == nil {
		t.Error("NewStack assigned an address beyond the prefix")
	}
	if _, err := network.NewStack(Config{Addrs: []netip.Prefix{{}}}); err == nil {
		t.Error("an invalid address was accepted")
	}
	_, err := network.NewStack(Config{
		Addrs:  []netip.Prefix{netip.MustParsePrefix("10.2.0.1/24")},
		Routes: []Route{{Dest: netip.MustParsePrefix("0.0.0.0/0"), Gateway: netip.MustParseAddr("fd00::1")}},
	})
	if err == nil {
		t.Error("an IPv4 route through an IPv6 gateway was accepted")
	}
}

func TestParseAddr(t *testing.T) {
	for _, tt := range []struct {
		in, want string // want "" means an error
	}{
		{"10.0.0.1:4000", "10.0.0.1:4000"},
		{"10.0.0.1:04000", "10.0.0.1:4000"},
		{"[fd00::1]:80", "[fd00::1]:80"},
		{"[::ffff:10.0.0.1]:80", "10.0.0.1:80"},
		{"*:0", "invalid AddrPort"},
		{"*:4000", "invalid AddrPort"},
		{"", ""},
		{"10.0.0.1", ""},
		{"10.0.0.1:", ""},
		{":4000", ""},
		{"localhost:4000", ""},
		{"10.0.0.1:65536", ""},
		{"10.0.0.1:http", ""},
		{"fd00::1:80", ""},
		{"[fe80::1%eth0]:80", ""},
	} {
		ap, err := ParseAddr(tt.in)
		switch {
		case tt.want == "" && err == nil:
			t.Errorf("ParseAddr(%q) = %v, want an error", tt.in, ap)
		case tt.want == "" && !errors.Is(err, ErrBadAddress):
			t.Errorf("ParseAddr(%q) error %v does not wrap ErrBadAddress", tt.in, err)
		case tt.want != "" && err != nil:
			t.Errorf("ParseAddr(%q): %v", tt.in, err)
		case tt.want != "" && ap.String() != tt.want:
			t.Errorf("ParseAddr(%q) = %v, want %v", tt.in, ap, tt.want)
		}
	}
	for _, in := range []string{"10.0.0.1:80", "[fd00::1]:80", "*:80"} {
		ap, _ := ParseAddr(in)
		if got := FormatAddr(net.TCPAddrFromAddrPort(ap)); got != in {
			t.Errorf("FormatAddr(ParseAddr(%q)) = %q", in, got)
		}
	}
}

var _ = fmt.Sprint
