package inspect_test

import (
	"context"
	"fmt"
	"net"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/inspect"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// A vat tracks its connections in a Registry and serves the registry's
// Inspector to whoever may read its tables; here over a connection of its
// own. Fetch reads the report on the other side.
func Example() {
	ctx := context.Background()
	reg := inspect.NewRegistry(&inspect.Options{Name: "example"})

	// An application connection, tracked as the vat accepts it, whose
	// client holds the root capability.
	appClientSide, appServerSide := net.Pipe()
	appServer := core.NewConn(appServerSide, &core.Options{BootstrapClient: capnp.Client(testimpl.New("root", nil).Client())})
	defer appServer.Close()
	reg.Track(appServer, "app client")
	appClient := core.NewConn(appClientSide, nil)
	defer appClient.Close()
	root := testcapnp.Test(appClient.Bootstrap(ctx))
	defer root.Release()
	if err := root.Resolve(ctx); err != nil {
		fmt.Println(err)
		return
	}

	// The inspecting side.
	inClientSide, inServerSide := net.Pipe()
	inServer := core.NewConn(inServerSide, &core.Options{BootstrapClient: capnp.Client(reg.Inspector())})
	defer inServer.Close()
	inClient := core.NewConn(inClientSide, nil)
	defer inClient.Close()
	in := inspect.Inspector(inClient.Bootstrap(ctx))
	defer in.Release()

	rep, err := inspect.Fetch(ctx, in, 0)
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, c := range rep.Conns {
		fmt.Printf("%s: %d exports\n", c.Label, c.Snapshot.Stats.Exports)
		for _, e := range c.Snapshot.Exports {
			fmt.Printf("  export %d (refs %d): %s\n", e.ID, e.Refs, e.What)
		}
	}
	// Output:
	// app client: 1 exports
	//   export 0 (refs 1): local server *testimpl.server
}
