package netcap_test

import (
	"bytes"
	"errors"
	"io"
	"net"
	"testing"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/adapters/netcap"
	"github.com/captp-go/captp/adapters/netstack"
	"github.com/captp-go/captp/core"
)

// The host's sockets can live on a userspace stack: the guest's streams
// then stay inside an in-process virtual network.
func TestStackBackend(t *testing.T) {
	vnet := netstack.NewNetwork(nil)
	defer vnet.Close()
	hostStack, err := vnet.NewStack(netstack.Config{Name: "host"})
	if err != nil {
		t.Fatal(err)
	}
	remoteStack, err := vnet.NewStack(netstack.Config{Name: "remote"})
	if err != nil {
		t.Fatal(err)
	}
	lis, err := remoteStack.Listen("*:7")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	served := make(chan struct{})
	go func() {
		defer close(served)
		c, err := lis.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(c, c)
	}()

	p := policy(t, []string{"tcp:" + remoteStack.Addr().String() + ":7"}, []string{"tcp:*:9000"})
	srv, n := netcap.NewServer(p, &netcap.StackBackend{Stack: hostStack}, nil)
	a, b := net.Pipe()
	host := core.NewConn(b, &core.Options{BootstrapClient: capnp.Client(n)})
	guest := core.NewConn(a, nil)
	defer func() {
		guest.Close()
		host.Close()
		srv.Close()
	}()
	gn := netcap.Network(guest.Bootstrap(t.Context()))
	defer gn.Release()

	c, err := netcap.Dial(t.Context(), gn, "tcp", remoteStack.Addr().String()+":7")
	if err != nil {
		t.Fatalf("Dial over the stack: %v", err)
	}
	data := randomBytes(1<<20, 4)
	go func() {
		c.Write(data)
		c.(interface{ CloseWrite() error }).CloseWrite()
	}()
	got, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("echo over the stack: %d bytes, %v", len(got), err)
	}
	c.Close()
	<-served

	// Names cannot be resolved on a stack without a resolver.
	if _, err := netcap.Dial(t.Context(), gn, "tcp", "example.com:7"); !errors.Is(err, netcap.ErrUnreachable) {
		t.Errorf("Dial(name) on a stack without a resolver = %v, want ErrUnreachable", err)
	}
	// Listening on every address of the stack; the remote connects in.
	l, err := netcap.Listen(t.Context(), gn, "tcp", ":9000")
	if err != nil {
		t.Fatalf("Listen on the stack: %v", err)
	}
	defer l.Close()
	go func() {
		rc, err := remoteStack.DialTCP(t.Context(), hostStack.Addr().String()+":9000")
		if err != nil {
			return
		}
		rc.Write([]byte("hi"))
		rc.Close()
	}()
	ac, err := l.Accept()
	if err != nil {
		t.Fatalf("Accept on the stack: %v", err)
	}
	b2, err := io.ReadAll(ac)
	if err != nil || string(b2) != "hi" {
		t.Errorf("accepted stream read %q, %v", b2, err)
	}
	ac.Close()
}
