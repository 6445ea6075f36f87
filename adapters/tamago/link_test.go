package tamago

import (
	"bytes"
	"context"
	"net/netip"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/adapters/netstack"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// cable connects two fake virtio-net cards back to back and returns a
// NIC on each.
func cable(t *testing.T) (*NIC, *NIC) {
	t.Helper()
	da, db := newFakeNet(newFakeMemory()), newFakeNet(newFakeMemory())
	db.mac[5] = 0x57
	da.out, db.out = db.inject, da.inject
	na, err := NewNIC(da, da.mem, nil)
	if err != nil {
		t.Fatal(err)
	}
	nb, err := NewNIC(db, db.mem, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, d := range []*fakeNet{da, db} {
			if errs := d.errors(); len(errs) > 0 {
				t.Errorf("fake device: %v", errs)
			}
			// The cable loses nothing: a lost frame costs TCP a
			// retransmission timeout (seconds after a lost burst).
			if _, dropped := d.counts(); dropped > 0 {
				t.Errorf("fake device %x dropped %d frames", d.mac, dropped)
			}
		}
	})
	return na, nb
}

func newTestStack(t *testing.T, n *NIC, addr string) *netstack.Stack {
	t.Helper()
	s, err := netstack.New(NewLink(n, n.MAC(), nil), netstack.Config{Addrs: []netip.Prefix{netip.MustParsePrefix(addr)}})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// Two TCP/IP stacks on two virtio-net drivers, wired through fake
// devices, carry a captp connection: ARP, TCP, and a transfer larger
// than the queues.
func TestLinkCapTP(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	na, nb := cable(t)
	guest := newTestStack(t, na, "10.0.2.15/24")
	defer guest.Close()
	host := newTestStack(t, nb, "10.0.2.1/24")
	defer host.Close()

	lis, err := guest.Listen("*:4000")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	sctx, stop := context.WithCancel(ctx)
	go func() {
		served <- netstack.Serve(sctx, lis, &core.Options{BootstrapClient: capnp.Client(testimpl.New("guest", nil).Client())})
	}()
	defer func() { stop(); <-served }()

	conn, err := host.Dial(ctx, "10.0.2.15:4000", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	boot := testcapnp.Test(conn.Bootstrap(ctx))
	defer boot.Release()
	big := bytes.Repeat([]byte("virtio-net "), 100_000) // 1.1 MB: many times the 64 buffers
	f, release := boot.Echo(ctx, func(p testcapnp.Test_echo_Params) error { return p.SetData(big) })
	defer release()
	res, err := f.Struct()
	if err != nil {
		t.Fatalf("echo: %v", err)
	}
	if d, _ := res.Data(); !bytes.Equal(d, big) {
		t.Fatalf("echo returned %d bytes, want the %d sent", len(d), len(big))
	}
}

func TestLinkEndpoint(t *testing.T) {
	na, _ := cable(t)
	l := NewLink(na, na.MAC(), nil)
	if l.MTU() != 1500 {
		t.Errorf("MTU %d", l.MTU())
	}
	l.SetMTU(9000)
	if l.MTU() != 1500 {
		t.Errorf("MTU after SetMTU(9000) = %d, want 1500 (the buffers hold 1514-byte frames)", l.MTU())
	}
	if string(l.LinkAddress()) != string(na.MAC()) {
		t.Errorf("LinkAddress %x, want %x", l.LinkAddress(), na.MAC())
	}
	if l.IsAttached() {
		t.Error("attached before Attach")
	}
	// Wait without Attach returns at once; Close is idempotent.
	l.Wait()
	l.Close()
	l.Close()
}
