package core_test

import (
	"context"
	"fmt"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// Two vats over an in-memory stream: the server offers a capnpc-go
// generated Test server as its bootstrap capability, the client calls it
// and pipelines on a result it has not received yet.
func ExampleNewConn() {
	ctx := context.Background()
	clientSide, serverSide := pipePair() // any io.ReadWriteCloser pair: a socket, a pipe, a serial line

	server := core.NewConn(serverSide, &core.Options{
		BootstrapClient: capnp.Client(testimpl.New("root", nil).Client()),
	})
	defer server.Close()
	client := core.NewConn(clientSide, nil)
	defer client.Close()

	root := testcapnp.Test(client.Bootstrap(ctx))
	defer root.Release()

	// child() returns a capability; name() is sent to it before child()
	// has returned (promise pipelining): one round trip for both calls.
	child, release := root.Child(ctx, func(p testcapnp.Test_child_Params) error {
		return p.SetName("kid")
	})
	defer release()
	name, releaseName := child.Child().Name(ctx, nil)
	defer releaseName()

	res, err := name.Struct()
	if err != nil {
		fmt.Println("call failed:", err)
		return
	}
	n, _ := res.Name()
	fmt.Println("child's name:", n)
	// Output: child's name: kid
}

// Settle waits for a promise and returns what it settled to. Here the
// server hands out a promise, then resolves it to a new object of the
// client's choosing; calls made on the promise meanwhile wait for it.
func ExampleSettle() {
	ctx := context.Background()
	clientSide, serverSide := pipePair()
	server := core.NewConn(serverSide, &core.Options{
		BootstrapClient: capnp.Client(testimpl.New("root", nil).Client()),
	})
	defer server.Close()
	client := core.NewConn(clientSide, nil)
	defer client.Close()
	root := testcapnp.Test(client.Bootstrap(ctx))
	defer root.Release()

	promised, release := root.Promise(ctx, nil)
	defer release()
	promise := promised.Cap()
	resolved, releaseResolved := root.ResolvePromise(ctx, func(p testcapnp.Test_resolvePromise_Params) error {
		return p.SetCap(testimpl.New("target", nil).Client())
	})
	defer releaseResolved()
	if _, err := resolved.Struct(); err != nil {
		fmt.Println("resolvePromise failed:", err)
		return
	}

	target, err := core.Settle(ctx, capnp.Client(promise))
	if err != nil {
		fmt.Println("settle failed:", err)
		return
	}
	defer target.Release()
	name, releaseName := testcapnp.Test(target).Name(ctx, nil)
	defer releaseName()
	res, err := name.Struct()
	if err != nil {
		fmt.Println("name failed:", err)
		return
	}
	n, _ := res.Name()
	fmt.Println("the promise settled to:", n)
	// Output: the promise settled to: target
}
