package secure_test

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/captp-go/captp/adapters/secure"
	"github.com/captp-go/captp/core/sturdyref"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// The fingerprint is SHA-256 over the DER SubjectPublicKeyInfo of the key
// in the certificate the identity presents (OCaml's X509 fingerprint).
func TestFingerprintIsSPKIDigest(t *testing.T) {
	id, err := secure.Generate()
	if err != nil {
		t.Fatal(err)
	}
	cert := leafOf(t, id)
	if got, want := id.Fingerprint(), sturdyref.Fingerprint(sha256.Sum256(cert.RawSubjectPublicKeyInfo)); got != want {
		t.Fatalf("fingerprint %v; want %v", got, want)
	}
	spki, _ := x509.MarshalPKIXPublicKey(cert.PublicKey)
	if sturdyref.FingerprintOf(spki) != id.Fingerprint() {
		t.Fatal("fingerprint differs from the marshalled public key's")
	}
}

// leafOf handshakes with id's server config to get its certificate.
func leafOf(t *testing.T, id *secure.Identity) *x509.Certificate {
	t.Helper()
	cfg := id.ServerConfig()
	cert, err := x509.ParseCertificate(cfg.Certificates[0].Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

func TestLoadOrCreateKeepsIdentity(t *testing.T) {
	path := filepath.Join(t.TempDir(), "vat.pem")
	a, err := secure.LoadOrCreate(path)
	if err != nil {
		t.Fatal(err)
	}
	b, err := secure.LoadOrCreate(path)
	if err != nil {
		t.Fatal(err)
	}
	if a.Fingerprint() != b.Fingerprint() {
		t.Fatal("identity changed across loads")
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %v; want 0600", fi.Mode().Perm())
	}
}

func TestFromPEMFormats(t *testing.T) {
	rk, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	pkcs1 := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(rk)})
	id, err := secure.FromPEM(pkcs1)
	if err != nil {
		t.Fatalf("PKCS #1 RSA: %v", err)
	}
	spki, _ := x509.MarshalPKIXPublicKey(&rk.PublicKey)
	if id.Fingerprint() != sturdyref.FingerprintOf(spki) {
		t.Fatal("RSA fingerprint is not the SPKI digest")
	}
	again, err := id.PEM()
	if err != nil {
		t.Fatal(err)
	}
	id2, err := secure.FromPEM(again)
	if err != nil || id2.Fingerprint() != id.Fingerprint() {
		t.Fatalf("PKCS #8 round trip: %v", err)
	}
	for name, bad := range map[string][]byte{
		"empty":   nil,
		"no key":  pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{1, 2}}),
		"garbage": pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte("not DER")}),
		"trunc":   pkcs1[:len(pkcs1)/2],
	} {
		if _, err := secure.FromPEM(bad); err == nil {
			t.Errorf("%s: FromPEM succeeded", name)
		}
	}
}

// tlsPair runs Client against a Listener over TCP loopback and returns
// the client's error and what the server side read.
func tlsPair(t *testing.T, server, client *secure.Identity, pin sturdyref.Fingerprint) (clientErr error, serverRead []byte, serverErr error) {
	t.Helper()
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lis := secure.NewListener(raw, server)
	defer lis.Close()
	type result struct {
		b   []byte
		err error
	}
	done := make(chan result, 1)
	go func() {
		c, err := lis.Accept()
		if err != nil {
			done <- result{nil, err}
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		b, err := io.ReadAll(c)
		done <- result{b, err}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	raw2, err := (&net.Dialer{}).DialContext(ctx, "tcp", raw.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	ref := sturdyref.Ref{Fingerprint: pin, Address: sturdyref.Address{Transport: sturdyref.TCP, Host: "127.0.0.1", Port: 1}}
	c, clientErr := secure.Client(ctx, raw2, client, ref)
	if clientErr == nil {
		c.Write([]byte("application data"))
		c.Close()
	}
	r := <-done
	return clientErr, r.b, r.err
}

func TestPinnedFingerprintAccepted(t *testing.T) {
	srv, _ := secure.Generate()
	cerr, got, serr := tlsPair(t, srv, nil, srv.Fingerprint())
	if cerr != nil || serr != nil || string(got) != "application data" {
		t.Fatalf("client %v, server %v, read %q", cerr, serr, got)
	}
}

// A wrong pin fails the handshake on both sides: the client gets a
// FingerprintError, the server's first Read fails, and no application
// byte crosses.
func TestWrongFingerprintRefusedBeforeData(t *testing.T) {
	srv, _ := secure.Generate()
	other, _ := secure.Generate()
	cerr, got, serr := tlsPair(t, srv, nil, other.Fingerprint())
	var fe *secure.FingerprintError
	if !errors.As(cerr, &fe) || fe.Got != srv.Fingerprint() || fe.Want != other.Fingerprint() {
		t.Fatalf("client error %v; want a FingerprintError naming both keys", cerr)
	}
	if !strings.Contains(cerr.Error(), "refusing") {
		t.Errorf("error text %q is not clear", cerr)
	}
	if serr == nil || len(got) != 0 {
		t.Fatalf("server read %q, err %v; want nothing and a handshake error", got, serr)
	}
}

// A client that speaks no TLS, or garbage, gets nowhere either.
func TestPlainClientToTLSServerFails(t *testing.T) {
	srv, _ := secure.Generate()
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lis := secure.NewListener(raw, srv)
	defer lis.Close()
	done := make(chan error, 1)
	go func() {
		c, err := lis.Accept()
		if err != nil {
			done <- err
			return
		}
		defer c.Close()
		_, err = c.Read(make([]byte, 10))
		done <- err
	}()
	c, err := net.Dial("tcp", raw.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("\x00\x00\x00\x00\x02\x00\x00\x00 not a TLS hello at all"))
	defer c.Close()
	if err := <-done; err == nil || !strings.Contains(err.Error(), "handshake") {
		t.Fatalf("server read err %v; want a handshake error", err)
	}
}
