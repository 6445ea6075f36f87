// Package secure authenticates and encrypts captp connections: each vat
// has a key pair (its Identity), connections run over TLS 1.3, and a
// client accepts a server only if the SHA-256 fingerprint of the server's
// public key matches the one pinned in the sturdy ref it dials. No
// certificate authority is involved: certificates are self-signed, and
// their names and dates are ignored.
//
// The fingerprint is the SHA-256 of the DER SubjectPublicKeyInfo, as in
// OCaml's capnp-rpc (X509.Public_key.fingerprint), so an OCaml vat's
// sturdy ref pins the same key here. As there, the server asks every
// client for a certificate (any key is accepted; PeerFingerprint tells
// which) and the client presents one, so either side may host sturdy
// refs for the other.
//
// It works on any net.Conn, so adapters/unix, adapters/netstack and
// TamaGo (crypto/tls runs there) share it. A wrong fingerprint fails the
// TLS handshake: the server's RPC layer never receives a byte.
package secure

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/captp-go/captp/core/sturdyref"
)

// Identity is a vat's key pair and the self-signed certificate it shows
// in TLS handshakes.
type Identity struct {
	key  crypto.Signer
	cert tls.Certificate
	fp   sturdyref.Fingerprint
	// level3 is set by NewNetwork: the vat offers three-party handoff
	// (ALPN ProtoLevel3) in its handshakes.
	level3 bool
}

// Generate makes a new identity with an ECDSA P-256 key (small and fast;
// OCaml's capnp-rpc defaults to RSA-2048, and accepts either).
func Generate() (*Identity, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("secure: generate key: %w", err)
	}
	return newIdentity(k)
}

func newIdentity(key crypto.Signer) (*Identity, error) {
	spki, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		return nil, fmt.Errorf("secure: public key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("secure: certificate serial: %w", err)
	}
	// Like OCaml's capnp-rpc: CN "capnp", valid from 1970 to 9999. The
	// key is what is checked, never the names or dates.
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "capnp"},
		NotBefore:    time.Date(1970, 1, 1, 1, 1, 1, 0, time.UTC),
		NotAfter:     time.Date(9999, 12, 31, 23, 59, 59, 0, time.UTC),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("secure: self-signed certificate: %w", err)
	}
	return &Identity{
		key:  key,
		cert: tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key},
		fp:   sturdyref.FingerprintOf(spki),
	}, nil
}

// Fingerprint returns the identity's public-key fingerprint, which sturdy
// refs to this vat carry.
func (id *Identity) Fingerprint() sturdyref.Fingerprint { return id.fp }

// FromPEM reads an identity from a PEM private key: PKCS #8 ("PRIVATE
// KEY": ECDSA, Ed25519 or RSA, as written by PEM and by OCaml's x509),
// "EC PRIVATE KEY" or "RSA PRIVATE KEY" (PKCS #1).
func FromPEM(data []byte) (*Identity, error) {
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			return nil, errors.New("secure: no private key in PEM data")
		}
		var key any
		var err error
		switch b.Type {
		case "PRIVATE KEY":
			key, err = x509.ParsePKCS8PrivateKey(b.Bytes)
		case "EC PRIVATE KEY":
			key, err = x509.ParseECPrivateKey(b.Bytes)
		case "RSA PRIVATE KEY":
			key, err = x509.ParsePKCS1PrivateKey(b.Bytes)
		default:
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("secure: parse %s: %w", b.Type, err)
		}
		switch k := key.(type) {
		case *ecdsa.PrivateKey, ed25519.PrivateKey, *rsa.PrivateKey:
			return newIdentity(k.(crypto.Signer))
		default:
			return nil, fmt.Errorf("secure: unsupported private key type %T", key)
		}
	}
}

// PEM returns the private key as PKCS #8 PEM. It is the vat's secret:
// whoever has it can impersonate the vat.
func (id *Identity) PEM() ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(id.key)
	if err != nil {
		return nil, fmt.Errorf("secure: encode key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// LoadOrCreate reads the identity in the PEM file at path, or, if there
// is none, generates one and writes it there (mode 0600, written to a
// temporary file and renamed, so a crash never leaves half a key). A
// server must keep its identity across restarts, or its sturdy refs stop
// working.
func LoadOrCreate(path string) (*Identity, error) {
	data, err := os.ReadFile(path)
	if err == nil {
		id, err := FromPEM(data)
		if err != nil {
			return nil, fmt.Errorf("%w (in %s)", err, path)
		}
		return id, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("secure: read identity: %w", err)
	}
	id, err := Generate()
	if err != nil {
		return nil, err
	}
	data, err = id.PEM()
	if err != nil {
		return nil, err
	}
	if err := writeFileAtomic(path, data, 0o600); err != nil {
		return nil, fmt.Errorf("secure: write identity: %w", err)
	}
	return id, nil
}

func writeFileAtomic(path string, data []byte, mode fs.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path)+"-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// FingerprintError is the handshake error when the peer's key is not the
// pinned one.
type FingerprintError struct {
	Want, Got sturdyref.Fingerprint
}

// Error names both fingerprints.
func (e *FingerprintError) Error() string {
	return fmt.Sprintf("secure: peer's public key has fingerprint %v, but the sturdy ref pins %v: refusing the connection", e.Got, e.Want)
}

// peerFingerprint returns the fingerprint of the leaf certificate's key.
func peerFingerprint(cs tls.ConnectionState) (sturdyref.Fingerprint, error) {
	if len(cs.PeerCertificates) == 0 {
		return sturdyref.Fingerprint{}, errors.New("secure: peer sent no certificate")
	}
	return sturdyref.FingerprintOf(cs.PeerCertificates[0].RawSubjectPublicKeyInfo), nil
}

// ClientConfig returns a TLS 1.3 client configuration that presents id
// and accepts only a server whose key has fingerprint want. Chain and name
// verification are off (there is no CA); the pin replaces them, and TLS
// still checks that the server holds the private key of the certificate
// it shows.
func (id *Identity) ClientConfig(want sturdyref.Fingerprint) *tls.Config {
	return &tls.Config{
		MinVersion:         tls.VersionTLS13,
		Certificates:       []tls.Certificate{id.cert},
		NextProtos:         id.protos(),
		InsecureSkipVerify: true, // no CA chain: the fingerprint pin below is the check
		ServerName:         "capnp",
		VerifyConnection: func(cs tls.ConnectionState) error {
			got, err := peerFingerprint(cs)
			if err != nil {
				return err
			}
			if !got.Equal(want) {
				return &FingerprintError{Want: want, Got: got}
			}
			return nil
		},
	}
}

// ServerConfig returns a TLS 1.3 server configuration for id that asks
// every client for a certificate and accepts any key.
func (id *Identity) ServerConfig() *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{id.cert},
		ClientAuth:   tls.RequireAnyClientCert,
		NextProtos:   id.protos(),
	}
}

// protos is the ALPN list id offers: Level 3 when it belongs to a Network.
func (id *Identity) protos() []string {
	if id.level3 {
		return []string{ProtoLevel3}
	}
	return nil
}

// PeerFingerprint returns the fingerprint of the peer's key on a TLS
// connection whose handshake is done.
func PeerFingerprint(c *tls.Conn) (sturdyref.Fingerprint, error) {
	return peerFingerprint(c.ConnectionState())
}

// HandshakeTimeout bounds the TLS handshake of Client and of connections
// accepted by a Listener.
const HandshakeTimeout = 10 * time.Second

// Client secures c for dialing ref: a TLS 1.3 handshake as id, pinning
// ref.Fingerprint, done before it returns; for an insecure ref, c itself.
// A nil id uses a fresh one (a client that hosts no sturdy refs needs no
// stable identity). On error c is closed.
func Client(ctx context.Context, c net.Conn, id *Identity, ref sturdyref.Ref) (net.Conn, error) {
	if ref.Insecure {
		return c, nil
	}
	if id == nil {
		var err error
		if id, err = ephemeral(); err != nil {
			c.Close()
			return nil, err
		}
	}
	tc := tls.Client(c, id.ClientConfig(ref.Fingerprint))
	ctx, cancel := context.WithTimeout(ctx, HandshakeTimeout)
	defer cancel()
	if err := tc.HandshakeContext(ctx); err != nil {
		tc.Close()
		var fe *FingerprintError
		if errors.As(err, &fe) {
			return nil, fe
		}
		return nil, fmt.Errorf("secure: TLS handshake with %s: %w", ref.Redacted(), err)
	}
	return tc, nil
}

var (
	ephemeralOnce sync.Once
	ephemeralID   *Identity
	ephemeralErr  error
)

// ephemeral is the process's throwaway client identity.
func ephemeral() (*Identity, error) {
	ephemeralOnce.Do(func() { ephemeralID, ephemeralErr = Generate() })
	return ephemeralID, ephemeralErr
}

// Listener accepts TLS connections as an identity. Each accepted
// connection does its handshake on first use (in the connection's own
// goroutine, so a slow client does not hold up Accept), within
// HandshakeTimeout; a failed handshake fails the connection's first Read,
// before the RPC layer sees any byte.
type Listener struct {
	net.Listener
	config *tls.Config
}

// NewListener wraps lis; a nil id accepts plain connections (insecure
// mode, for tests: the sturdy refs say "insecure").
func NewListener(lis net.Listener, id *Identity) net.Listener {
	if id == nil {
		return lis
	}
	return &Listener{Listener: lis, config: id.ServerConfig()}
}

// Accept returns the next connection, not yet handshaken.
func (l *Listener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &serverConn{Conn: tls.Server(c, l.config)}, nil
}

// serverConn runs the handshake, bounded by HandshakeTimeout, before its
// first Read or Write.
type serverConn struct {
	*tls.Conn
	once sync.Once
	err  error
}

func (c *serverConn) handshake() error {
	c.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), HandshakeTimeout)
		defer cancel()
		if err := c.Conn.HandshakeContext(ctx); err != nil {
			c.err = fmt.Errorf("secure: TLS handshake with %s: %w", c.Conn.RemoteAddr(), err)
		}
	})
	return c.err
}

// Read handshakes first.
func (c *serverConn) Read(p []byte) (int, error) {
	if err := c.handshake(); err != nil {
		return 0, err
	}
	return c.Conn.Read(p)
}

// Write handshakes first.
func (c *serverConn) Write(p []byte) (int, error) {
	if err := c.handshake(); err != nil {
		return 0, err
	}
	return c.Conn.Write(p)
}

// TLS returns the underlying TLS connection (for PeerFingerprint).
func (c *serverConn) TLS() *tls.Conn { return c.Conn }
