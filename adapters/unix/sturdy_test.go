package unix

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/adapters/secure"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/sturdyref"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// sturdyServer is a vat with an identity and a restorer on a listener.
type sturdyServer struct {
	id       *secure.Identity
	restorer *sturdyref.Restorer
	asked    atomic.Int32 // restores the server's restorer was asked for
	vat      sturdyref.Ref
	done     chan error
	cancel   context.CancelFunc
}

func startSturdy(t *testing.T, network, addr string, insecure bool) *sturdyServer {
	t.Helper()
	lis, err := net.Listen(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	s := &sturdyServer{done: make(chan error, 1)}
	if !insecure {
		if s.id, err = secure.Generate(); err != nil {
			t.Fatal(err)
		}
	}
	sa, err := SturdyAddress(lis, "")
	if err != nil {
		t.Fatal(err)
	}
	s.vat = sturdyref.Ref{Insecure: insecure, Address: sa}
	if s.id != nil {
		s.vat.Fingerprint = s.id.Fingerprint()
	}
	s.restorer = sturdyref.NewRestorer(sturdyref.RestorerOptions{Vat: s.vat})
	counting := core.RestorerFunc(func(ctx context.Context, id []byte) (capnp.Client, error) {
		s.asked.Add(1)
		return s.restorer.Restore(ctx, id)
	})
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	go func() { s.done <- ServeSturdy(ctx, lis, s.id, &core.Options{Restorer: counting}) }()
	t.Cleanup(func() {
		cancel()
		<-s.done
		s.restorer.Close()
	})
	return s
}

func (s *sturdyServer) add(t *testing.T, name string) sturdyref.Ref {
	t.Helper()
	id, err := sturdyref.NewServiceID()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.restorer.Add(id, capnp.Client(testimpl.New(name, nil).Client())); err != nil {
		t.Fatal(err)
	}
	return s.restorer.Ref(id)
}

func nameOf(ctx context.Context, c capnp.Client) (string, error) {
	f, release := testcapnp.Test(c).Name(ctx, nil)
	defer release()
	res, err := f.Struct()
	if err != nil {
		return "", err
	}
	return res.Name()
}

func sturdyListeners(t *testing.T) map[string][2]string {
	return map[string][2]string{
		"unix": {"unix", filepath.Join(t.TempDir(), "vat.sock")},
		"tcp":  {"tcp", "127.0.0.1:0"},
	}
}

// A sturdy ref printed as a URI and parsed back restores its service over
// TLS with the pinned key, on a Unix socket and on TCP.
func TestSturdyRestore(t *testing.T) {
	for name, l := range sturdyListeners(t) {
		t.Run(name, func(t *testing.T) {
			ctx := testCtx(t)
			s := startSturdy(t, l[0], l[1], false)
			uri := s.add(t, "alice").String()
			if !strings.HasPrefix(uri, "capnp://sha-256:") {
				t.Fatalf("uri %q", uri)
			}
			ref, err := sturdyref.Parse(uri)
			if err != nil {
				t.Fatal(err)
			}
			conn, c, err := RestoreSturdy(ctx, ref, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			defer c.Release()
			if n, err := nameOf(ctx, c); err != nil || n != "alice" {
				t.Fatalf("name %q, %v", n, err)
			}
		})
	}
}

// A ref pinning another key is refused in the handshake: a clear error,
// and the server's restorer is never reached.
func TestSturdyWrongFingerprintRefused(t *testing.T) {
	for name, l := range sturdyListeners(t) {
		t.Run(name, func(t *testing.T) {
			ctx := testCtx(t)
			s := startSturdy(t, l[0], l[1], false)
			ref := s.add(t, "alice")
			impostor, _ := secure.Generate()
			ref.Fingerprint = impostor.Fingerprint()
			conn, err := DialSturdy(ctx, ref, nil, nil)
			if err == nil {
				conn.Close()
				t.Fatal("dial with a wrong fingerprint succeeded")
			}
			var fe *secure.FingerprintError
			if !errors.As(err, &fe) || fe.Got != s.id.Fingerprint() {
				t.Fatalf("err %v; want a FingerprintError naming the server's real key", err)
			}
			// The right key still works, and only that restore reached the
			// restorer.
			ref.Fingerprint = s.id.Fingerprint()
			conn, c, err := RestoreSturdy(ctx, ref, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			defer c.Release()
			if _, err := nameOf(ctx, c); err != nil {
				t.Fatal(err)
			}
			if n := s.asked.Load(); n != 1 {
				t.Fatalf("restorer asked %d times; want 1 (the refused connection must not reach it)", n)
			}
		})
	}
}

// Forged and revoked service IDs fail alike; the connection stays usable.
func TestSturdyForgedAndRevokedRefused(t *testing.T) {
	ctx := testCtx(t)
	s := startSturdy(t, "unix", filepath.Join(t.TempDir(), "vat.sock"), false)
	ref := s.add(t, "alice")
	conn, err := DialSturdy(ctx, ref, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	forged := append([]byte{}, ref.ServiceID...)
	forged[len(forged)-1] ^= 1
	if err := s.restorer.Revoke(ctx, ref.ServiceID); err != nil {
		t.Fatal(err)
	}
	var msgs []string
	for _, id := range [][]byte{forged, ref.ServiceID} {
		c := conn.Restore(ctx, id)
		_, err := nameOf(ctx, c)
		c.Release()
		if err == nil {
			t.Fatalf("restore of %x succeeded", id)
		}
		msgs = append(msgs, err.Error())
	}
	if msgs[0] != msgs[1] || !strings.Contains(msgs[0], "Unknown persistent service ID") {
		t.Fatalf("errors %q; want one and the same unknown-service error", msgs)
	}
	select {
	case <-conn.Done():
		t.Fatalf("connection ended: %v", conn.Err())
	default:
	}
}

// Mixing modes fails cleanly: an insecure client to a TLS server, and a
// TLS client to an insecure server.
func TestSturdyModeMismatch(t *testing.T) {
	ctx := testCtx(t)
	tlsSrv := startSturdy(t, "tcp", "127.0.0.1:0", false)
	ref := tlsSrv.add(t, "a")
	ref.Insecure = true
	conn, c, err := RestoreSturdy(ctx, ref, nil)
	if err != nil {
		t.Fatal(err) // plain TCP connects; the failure shows on use
	}
	_, err = nameOf(ctx, c)
	c.Release()
	conn.Close()
	if err == nil || !capnp.IsDisconnected(err) {
		t.Fatalf("insecure client to TLS server: %v; want disconnected", err)
	}
	if n := tlsSrv.asked.Load(); n != 0 {
		t.Fatalf("restorer reached %d times", n)
	}

	plainSrv := startSturdy(t, "tcp", "127.0.0.1:0", true)
	ref = plainSrv.add(t, "b")
	ref.Insecure = false
	ref.Fingerprint = sturdyref.FingerprintOf([]byte("anything"))
	if conn, err := DialSturdy(ctx, ref, nil, nil); err == nil {
		conn.Close()
		t.Fatal("TLS dial to a plain server succeeded")
	}
	if n := plainSrv.asked.Load(); n != 0 {
		t.Fatalf("restorer reached %d times", n)
	}
}

func TestSturdyRefusesOtherTransports(t *testing.T) {
	ref, _ := sturdyref.Parse("capnp+netstack://insecure@10.0.0.1:4000/")
	if _, err := DialSturdy(testCtx(t), ref, nil, nil); !errors.Is(err, ErrBadAddress) {
		t.Fatalf("err %v; want ErrBadAddress", err)
	}
}
