package unix_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"path/filepath"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/adapters/unix"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// A server vat offers a capability on a Unix socket; a client vat dials it,
// takes the bootstrap capability and calls it. Cancelling Serve's context
// shuts the server down.
func ExampleServe() {
	dir, err := os.MkdirTemp("", "captp-example-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	addr := "unix:" + filepath.Join(dir, "vat.sock")

	// Server vat. Any capnpc-go generated client works as the bootstrap
	// capability; here it is the project's test object.
	lis, err := unix.Listen(addr)
	if err != nil {
		log.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() {
		served <- unix.Serve(ctx, lis, &core.Options{
			BootstrapClient: capnp.Client(testimpl.New("greeter", nil).Client()),
		})
	}()

	// Client vat.
	conn, err := unix.Dial(context.Background(), addr, nil)
	if err != nil {
		log.Fatal(err)
	}
	greeter := testcapnp.Test(conn.Bootstrap(context.Background()))
	f, release := greeter.Name(context.Background(), nil)
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
	// the server's bootstrap capability is named greeter
	// Serve returned: context canceled
}
