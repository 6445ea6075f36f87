package core_test

import (
	"context"
	"fmt"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/core"
)

// greeter is a native object: a Handler with a method switch, as a code
// generator would write for each interface. Method 0 greets its Text
// argument.
type greeter struct{}

func (greeter) HandleCall(ctx context.Context, call *core.ServerCall) {
	if call.Method().MethodID != 0 {
		call.Return(fmt.Errorf("greeter: no method %d", call.Method().MethodID))
		return
	}
	name, err := call.Args().Ptr(0)
	if err != nil {
		call.Return(err)
		return
	}
	res, err := call.Results(capnp.ObjectSize{PointerCount: 1})
	if err == nil {
		err = res.SetText(0, "hello, "+name.Text())
	}
	call.Return(err) // inline, on the connection's read loop: no goroutine
}

// A native server (core.NewClient) and a native call (core.Call) over an
// in-memory stream: no go-capnp Promise, Answer or server goroutine per
// call on either side.
func ExampleCall() {
	ctx := context.Background()
	clientSide, serverSide := pipePair()
	server := core.NewConn(serverSide, &core.Options{BootstrapClient: core.NewClient(greeter{})})
	defer server.Close()
	client := core.NewConn(clientSide, nil)
	defer client.Close()
	root := client.Bootstrap(ctx)
	defer root.Release()

	call := core.Call(ctx, root, capnp.Send{
		Method:    capnp.Method{InterfaceID: 0x1234, MethodID: 0},
		ArgsSize:  capnp.ObjectSize{PointerCount: 1},
		PlaceArgs: func(args capnp.Struct) error { return args.SetText(0, "vat") },
	})
	defer call.Release() // sends Finish; the results are invalid after it
	res, err := call.Wait(ctx)
	if err != nil {
		fmt.Println("call failed:", err)
		return
	}
	greeting, _ := res.Ptr(0)
	fmt.Println(greeting.Text())
	// Output: hello, vat
}
