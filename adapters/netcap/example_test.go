package netcap_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/adapters/netcap"
	"github.com/captp-go/captp/core"
)

// A host offers a Network to a guest over a captp connection. Its policy
// allows one destination; the guest dials it with a standard net.Conn,
// and anything else is denied with a typed error.
func ExampleNewNetwork() {
	ctx := context.Background()

	// Somewhere the guest may go: an echo server on the host's loopback.
	echo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	defer echo.Close()
	go func() {
		c, err := echo.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(c, c)
	}()

	// Host: a default-deny policy with one rule, as from -allow-connect.
	var policy netcap.Policy
	if err := policy.Connect.Set("tcp:" + echo.Addr().String()); err != nil {
		log.Fatal(err)
	}
	network := netcap.NewNetwork(&policy, &netcap.KernelBackend{}, nil)
	guestSide, hostSide := net.Pipe() // in real life: a serial port or a virtual NIC
	host := core.NewConn(hostSide, &core.Options{BootstrapClient: capnp.Client(network)})
	defer host.Close()

	// Guest: the host's bootstrap capability is its Network.
	guest := core.NewConn(guestSide, nil)
	defer guest.Close()
	n := netcap.Network(guest.Bootstrap(ctx))
	defer n.Release()

	c, err := netcap.Dial(ctx, n, "tcp", echo.Addr().String())
	if err != nil {
		log.Fatal(err)
	}
	fmt.Fprint(c, "hello")
	buf := make([]byte, 5)
	if _, err := io.ReadFull(c, buf); err != nil {
		log.Fatal(err)
	}
	fmt.Println("echoed:", string(buf))
	c.Close()

	_, err = netcap.Dial(ctx, n, "tcp", "192.0.2.1:25")
	fmt.Println("elsewhere denied:", errors.Is(err, netcap.ErrDenied))
	// Output:
	// echoed: hello
	// elsewhere denied: true
}
