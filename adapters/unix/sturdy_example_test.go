package unix_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/adapters/secure"
	"github.com/captp-go/captp/adapters/unix"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/sturdyref"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// A vat with an identity serves a service under a sturdy ref; a client
// holding only the ref's URI restores it over TLS, with the server's key
// pinned by the URI's fingerprint.
func ExampleServeSturdy() {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dir, _ := os.MkdirTemp("", "vat")
	defer os.RemoveAll(dir)

	// Server: identity (kept across restarts), listener, restorer.
	id, err := secure.LoadOrCreate(filepath.Join(dir, "vat.pem"))
	if err != nil {
		fmt.Println(err)
		return
	}
	lis, err := unix.Listen("unix:" + filepath.Join(dir, "vat.sock"))
	if err != nil {
		fmt.Println(err)
		return
	}
	addr, _ := unix.SturdyAddress(lis, "")
	restorer := sturdyref.NewRestorer(sturdyref.RestorerOptions{
		Vat: sturdyref.Ref{Fingerprint: id.Fingerprint(), Address: addr},
	})
	defer restorer.Close()
	serviceID, _ := sturdyref.NewServiceID()
	restorer.Add(serviceID, capnp.Client(testimpl.New("alice", nil).Client()))
	uri := restorer.Ref(serviceID).String() // capnp://sha-256:…@/…/vat.sock/…
	served := make(chan error, 1)
	go func() { served <- unix.ServeSturdy(ctx, lis, id, &core.Options{Restorer: restorer}) }()
	defer func() { cancel(); <-served }()

	// Client: all it needs is the URI.
	ref, err := sturdyref.Parse(uri)
	if err != nil {
		fmt.Println(err)
		return
	}
	conn, c, err := unix.RestoreSturdy(ctx, ref, nil)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer conn.Close()
	alice := testcapnp.Test(c)
	defer alice.Release()
	f, release := alice.Name(ctx, nil)
	defer release()
	res, err := f.Struct()
	if err != nil {
		fmt.Println(err)
		return
	}
	name, _ := res.Name()
	fmt.Println(name)
	// Output: alice
}
