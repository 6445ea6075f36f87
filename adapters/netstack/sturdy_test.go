package netstack

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/adapters/secure"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/sturdyref"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// sturdyVat is a vat with an identity, a restorer and a store, serving
// on a stack. stop and a new sturdyVat with the same identity and store
// is a restart.
type sturdyVat struct {
	stack    *Stack
	restorer *sturdyref.Restorer
	asked    *atomic.Int32
	vat      sturdyref.Ref
	stop     func()
}

func loadNamed(_ context.Context, _ []byte, rec sturdyref.Record) (capnp.Client, error) {
	if rec.Kind != "test" {
		return capnp.Client{}, fmt.Errorf("unknown kind %q", rec.Kind)
	}
	return capnp.Client(testimpl.New(string(rec.Data), nil).Client()), nil
}

func startSturdyVat(t *testing.T, st *Stack, id *secure.Identity, store sturdyref.Store, asked *atomic.Int32) *sturdyVat {
	t.Helper()
	lis, err := st.Listen("*:4000")
	if err != nil {
		t.Fatal(err)
	}
	addr, err := st.SturdyAddress(lis)
	if err != nil {
		t.Fatal(err)
	}
	v := &sturdyVat{stack: st, asked: asked, vat: sturdyref.Ref{Address: addr}}
	if id == nil {
		v.vat.Insecure = true
	} else {
		v.vat.Fingerprint = id.Fingerprint()
	}
	v.restorer = sturdyref.NewRestorer(sturdyref.RestorerOptions{Vat: v.vat, Store: store, Load: loadNamed})
	counting := core.RestorerFunc(func(ctx context.Context, sid []byte) (capnp.Client, error) {
		asked.Add(1)
		return v.restorer.Restore(ctx, sid)
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ServeSturdy(ctx, lis, id, &core.Options{Restorer: counting}) }()
	var once bool
	v.stop = func() {
		if once {
			return
		}
		once = true
		cancel()
		<-done
		v.restorer.Close()
	}
	t.Cleanup(v.stop)
	return v
}

func sturdyCallName(ctx context.Context, c capnp.Client) (string, error) {
	f, release := testcapnp.Test(c).Name(ctx, nil)
	defer release()
	res, err := f.Struct()
	if err != nil {
		return "", err
	}
	return res.Name()
}

// A client on a virtual network holds a capnp+netstack:// sturdy ref; the
// server vat restarts (its stack closes, a new one comes up at the same
// address with the same identity and store) and the client, through
// Reconnecting, gets the capability back.
func TestSturdyNetstackRestart(t *testing.T) {
	ctx := testContext(t)
	network := NewNetwork(nil)
	defer network.Close()
	serverAddr := netip.MustParsePrefix("10.0.0.1/16")
	// A restarted vat keeps its MAC as well as its address (peers' ARP
	// caches still point at it).
	mac := net.HardwareAddr{0x02, 0xca, 0x70, 0, 0, 0x42}
	srvStack, err := network.NewStack(Config{Name: "server", MAC: mac, Addrs: []netip.Prefix{serverAddr}})
	if err != nil {
		t.Fatal(err)
	}
	cliStack, err := network.NewStack(Config{Name: "client", Addrs: []netip.Prefix{netip.MustParsePrefix("10.0.0.2/16")}})
	if err != nil {
		t.Fatal(err)
	}
	id, _ := secure.Generate()
	store := &sturdyref.MemStore{}
	var asked atomic.Int32
	v := startSturdyVat(t, srvStack, id, store, &asked)
	sid, err := v.restorer.SaveNew(ctx, sturdyref.Record{Kind: "test", Data: []byte("durable")})
	if err != nil {
		t.Fatal(err)
	}
	uri := v.restorer.Ref(sid).String()
	if !strings.HasPrefix(uri, "capnp+netstack://sha-256:") || !strings.Contains(uri, "@10.0.0.1:4000/") {
		t.Fatalf("uri %q", uri)
	}
	ref, err := sturdyref.Parse(uri)
	if err != nil {
		t.Fatal(err)
	}
	rc := sturdyref.NewReconnecting(ref, cliStack.SturdyDialer(nil, nil), &sturdyref.ReconnectOptions{MinBackoff: 10 * time.Millisecond, MaxBackoff: 100 * time.Millisecond, DialTimeout: 2 * time.Second})
	defer rc.Close()
	name := func() (string, error) {
		var n string
		err := rc.Do(ctx, func(ctx context.Context, c capnp.Client) (err error) {
			n, err = sturdyCallName(ctx, c)
			return err
		})
		return n, err
	}
	if n, err := name(); err != nil || n != "durable" {
		t.Fatalf("before restart: %q, %v", n, err)
	}

	// Restart: the whole serving stack goes away and comes back.
	v.stop()
	srvStack.Close()
	restarted := make(chan error, 1)
	go func() {
		time.Sleep(50 * time.Millisecond)
		st, err := network.NewStack(Config{Name: "server2", MAC: mac, Addrs: []netip.Prefix{serverAddr}})
		if err == nil {
			startSturdyVat(t, st, id, store, &asked)
		}
		restarted <- err
	}()
	if n, err := name(); err != nil || n != "durable" {
		t.Fatalf("after restart: %q, %v", n, err)
	}
	if err := <-restarted; err != nil {
		t.Fatal(err)
	}
	if n := asked.Load(); n != 2 {
		t.Fatalf("restorers asked %d times; want 2 (once per server life)", n)
	}
}

func TestSturdyNetstackWrongFingerprint(t *testing.T) {
	ctx := testContext(t)
	network := NewNetwork(nil)
	defer network.Close()
	srv, _ := network.NewStack(Config{})
	cli, _ := network.NewStack(Config{})
	id, _ := secure.Generate()
	var asked atomic.Int32
	v := startSturdyVat(t, srv, id, &sturdyref.MemStore{}, &asked)
	sid, _ := sturdyref.NewServiceID()
	v.restorer.Add(sid, capnp.Client(testimpl.New("x", nil).Client()))
	ref := v.restorer.Ref(sid)
	other, _ := secure.Generate()
	ref.Fingerprint = other.Fingerprint()
	conn, err := cli.DialSturdy(ctx, ref, nil, nil)
	if err == nil {
		conn.Close()
		t.Fatal("wrong fingerprint accepted")
	}
	var fe *secure.FingerprintError
	if !errors.As(err, &fe) {
		t.Fatalf("err %v; want a FingerprintError", err)
	}
	// Forged IDs with the right key fail as unknown.
	ref.Fingerprint = id.Fingerprint()
	conn, err = cli.DialSturdy(ctx, ref, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := conn.Restore(ctx, []byte("forged"))
	defer c.Release()
	if _, err := sturdyCallName(ctx, c); err == nil || !strings.Contains(err.Error(), "Unknown persistent service ID") {
		t.Fatalf("forged ID: %v", err)
	}
	if n := asked.Load(); n != 1 {
		t.Fatalf("restorer asked %d times; want 1 (the forged ID only)", n)
	}
}

// DialGuest reaches a vat in a "guest" behind a QEMU -netdev stream
// socket. The test plays QEMU: it listens on the socket and runs the
// guest's stack on the accepted connection.
func TestSturdyGuest(t *testing.T) {
	ctx := testContext(t)
	path := filepath.Join(t.TempDir(), "guest.sock")
	qemu, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer qemu.Close()
	id, _ := secure.Generate()
	var asked atomic.Int32
	guestUp := make(chan *sturdyVat, 1)
	go func() {
		c, err := qemu.Accept()
		if err != nil {
			guestUp <- nil
			return
		}
		// Frames wait in the socket until the vat listens (a SYN
		// handled before that would be refused), as a booting guest's
		// would.
		gc := &gatedConn{Conn: c, open: make(chan struct{})}
		st, err := New(NewStreamLink(gc, nil), Config{Name: "guest", Addrs: []netip.Prefix{netip.MustParsePrefix("10.0.2.15/24")}})
		if err != nil {
			close(gc.open)
			guestUp <- nil
			return
		}
		t.Cleanup(func() { st.Close() })
		v := startSturdyVat(t, st, id, &sturdyref.MemStore{}, &asked)
		close(gc.open)
		guestUp <- v
	}()
	// The ref is known before the guest is up (it is derived from the
	// guest's configuration), as for a unikernel image.
	sid := []byte("guest service")
	ref := sturdyref.Ref{Fingerprint: id.Fingerprint(), ServiceID: sid,
		Address: sturdyref.Address{Transport: sturdyref.Guest, Path: path, Host: "10.0.2.15", Port: 4000}}
	ref, err = sturdyref.Parse(ref.String())
	if err != nil {
		t.Fatal(err)
	}
	type dialed struct {
		conn *core.Conn
		err  error
	}
	dc := make(chan dialed, 1)
	go func() {
		conn, err := DialGuest(ctx, ref, nil)
		dc <- dialed{conn, err}
	}()
	v := <-guestUp
	if v == nil {
		t.Fatal("guest did not come up")
	}
	v.restorer.Add(sid, capnp.Client(testimpl.New("in the guest", nil).Client()))
	d := <-dc
	if d.err != nil {
		t.Fatal(d.err)
	}
	c := d.conn.Restore(ctx, sid)
	if n, err := sturdyCallName(ctx, c); err != nil || n != "in the guest" {
		t.Fatalf("name %q, %v", n, err)
	}
	c.Release()
	d.conn.Close()
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
