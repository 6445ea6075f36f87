package testnative_test

import (
	"context"
	"fmt"
	"net"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testnative"
)

// Example calls a native object through the stubs capnpc-captp generates:
// the server is an Object (a Test_NativeServer served with
// Test_NativeServerToClient), the client a Test_Native; name() goes to
// the child before child() has returned (promise pipelining).
func Example() {
	ctx := context.Background()
	a, b := net.Pipe()
	obj, _ := testnative.New("root", nil)
	server := core.NewConn(b, &core.Options{BootstrapClient: obj})
	defer server.Close()
	client := core.NewConn(a, nil)
	defer client.Close()

	boot := testnative.Test_Native{Client: client.Bootstrap(ctx)}
	defer boot.Release()
	child := boot.Child(ctx, func(p testcapnp.Test_child_Params) error { return p.SetName("kid") })
	defer child.Release()
	kid := child.Child() // a Test_Native, usable before child() returns
	defer kid.Release()
	call := kid.Name(ctx, nil)
	defer call.Release()
	res, err := call.Struct(ctx)
	if err != nil {
		fmt.Println("error:", err)
		return
	}
	name, _ := res.Name()
	fmt.Println(name)
	// Output: kid
}
