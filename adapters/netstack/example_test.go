package netstack_test

import (
	"context"
	"fmt"
	"log"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/adapters/netstack"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// Two vats on an in-process virtual network: the server vat offers a
// capability on port 4000 of its stack, the client vat dials the server's
// address, takes the bootstrap capability and calls it. No host socket is
// involved. Closing the network tears down both stacks.
func ExampleNewNetwork() {
	ctx := context.Background()
	network := netstack.NewNetwork(nil) // 10.0.0.0/16, MTU 65,535
	defer network.Close()

	// Server vat. Any capnpc-go generated client works as the bootstrap
	// capability; here it is the project's test object.
	server, err := network.NewStack(netstack.Config{Name: "server"})
	if err != nil {
		log.Fatal(err)
	}
	lis, err := server.Listen("*:4000")
	if err != nil {
		log.Fatal(err)
	}
	serveCtx, stop := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() {
		served <- netstack.Serve(serveCtx, lis, &core.Options{
			BootstrapClient: capnp.Client(testimpl.New("greeter", nil).Client()),
		})
	}()

	// Client vat.
	client, err := network.NewStack(netstack.Config{Name: "client"})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("server at", server.Addr(), "client at", client.Addr())
	conn, err := client.Dial(ctx, "10.0.0.1:4000", nil)
	if err != nil {
		log.Fatal(err)
	}
	greeter := testcapnp.Test(conn.Bootstrap(ctx))
	f, release := greeter.Name(ctx, nil)
	res, err := f.Struct()
	if err != nil {
		log.Fatal(err)
	}
	name, _ := res.Name()
	fmt.Println("the server's bootstrap capability is named", name)
	release()
	greeter.Release()
	conn.Close()

	stop()
	fmt.Println("Serve returned:", <-served)
	// Output:
	// server at 10.0.0.1 client at 10.0.0.2
	// the server's bootstrap capability is named greeter
	// Serve returned: context canceled
}
