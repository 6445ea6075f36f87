package netstack_test

import (
	"context"
	"fmt"
	"log"
	"net/netip"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/adapters/netstack"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// A Switch joins QEMU guests (Attach the connection QEMU makes to each
// guest's -netdev stream socket) and host stacks on one Ethernet segment.
// Here two host stacks stand in for guests; the switch's counters show
// the frames that went from one port to the other.
func ExampleSwitch() {
	ctx := context.Background()
	sw := netstack.NewSwitch(nil)
	defer sw.Close() // closes the stacks too

	carol, err := sw.NewStack(netstack.Config{Name: "carol", Addrs: []netip.Prefix{netip.MustParsePrefix("10.0.0.2/24")}})
	if err != nil {
		log.Fatal(err)
	}
	lis, err := carol.Listen("*:4000")
	if err != nil {
		log.Fatal(err)
	}
	serveCtx, stop := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() {
		served <- netstack.Serve(serveCtx, lis, &core.Options{BootstrapClient: capnp.Client(testimpl.New("carol", nil).Client())})
	}()
	defer func() { stop(); <-served }()

	bob, err := sw.NewStack(netstack.Config{Name: "bob", Addrs: []netip.Prefix{netip.MustParsePrefix("10.0.0.3/24")}})
	if err != nil {
		log.Fatal(err)
	}
	conn, err := bob.Dial(ctx, "10.0.0.2:4000", nil)
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	c := testcapnp.Test(conn.Bootstrap(ctx))
	defer c.Release()
	f, release := c.Name(ctx, nil)
	defer release()
	res, err := f.Struct()
	if err != nil {
		log.Fatal(err)
	}
	name, _ := res.Name()
	fmt.Println("bob called", name)
	fmt.Println("frames bob→carol:", sw.Frames("bob", "carol") > 0, "carol→bob:", sw.Frames("carol", "bob") > 0)
	// Output:
	// bob called carol
	// frames bob→carol: true carol→bob: true
}
