package sturdyref_test

import (
	"context"
	"fmt"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/sturdyref"
	"github.com/captp-go/captp/internal/testimpl"
)

// Sturdy ref URIs in OCaml capnp-rpc's format: the vat's key fingerprint,
// its address and the service ID.
func ExampleParse() {
	ref, err := sturdyref.Parse("capnp://sha-256:s16WV4JeGusAL_nTjvICiQOFqm3LqYrDj3K-HXdMi8s@localhost:7000/bWFpbg")
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(ref.Fingerprint)
	fmt.Println(ref.Address.HostPort(), string(ref.ServiceID))
	fmt.Println(ref.Redacted())
	// Output:
	// sha-256:s16WV4JeGusAL_nTjvICiQOFqm3LqYrDj3K-HXdMi8s
	// localhost:7000 main
	// capnp://sha-256:s16WV4JeGusAL_nTjvICiQOFqm3LqYrDj3K-HXdMi8s@localhost:7000/…
}

// A server vat restores services named by sturdy refs; a client asks for
// one with Conn.Restore.
func ExampleRestorer() {
	ctx := context.Background()
	restorer := sturdyref.NewRestorer(sturdyref.RestorerOptions{})
	defer restorer.Close()
	id := sturdyref.DeriveServiceID([]byte("a secret kept by the vat"), "echo")
	restorer.Add(id, capnp.Client(testimpl.New("echo service", nil).Client()))

	clientSide, serverSide := pipePair() // a socket, in real life
	server := core.NewConn(serverSide, &core.Options{Restorer: restorer})
	defer server.Close()
	client := core.NewConn(clientSide, nil)
	defer client.Close()

	svc := client.Restore(ctx, id)
	defer svc.Release()
	name, err := callName(ctx, svc)
	fmt.Println(name, err)

	forged := client.Restore(ctx, []byte("guessed"))
	defer forged.Release()
	_, err = callName(ctx, forged)
	fmt.Println(err)
	// Output:
	// echo service <nil>
	// test.capnp:Test.name: Unknown persistent service ID
}
