package secure

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/sturdyref"
)

// ProtoLevel3 is the ALPN protocol a vat offers in its TLS handshakes when
// it does three-party handoff. Only a connection on which both ends
// offered it gets Level 3 messages; any other peer (an OCaml vat, a
// captp vat without a Network) is proxied as before.
const ProtoLevel3 = "captp-level3"

// Network is a core.Network for vats that know each other by the
// fingerprints of their keys: it lets the connections of one vat hand
// capabilities to each other's peers directly (rpc.capnp Level 3).
//
//   - ThirdPartyToContact (to the recipient): the host's vat ref, the
//     address the introducer dialed it at and its fingerprint, plus a
//     random nonce: "<capnp URI>#<nonce>".
//   - ThirdPartyToAwait (to the host): the recipient's fingerprint and the
//     nonce: "sha-256:<fingerprint>#<nonce>".
//   - ThirdPartyCompletion (from the recipient to the host): the
//     introducer's fingerprint and the nonce.
//
// The host matches a completion only on a connection whose TLS peer is
// the recipient the Provide named, from the introducer the completion
// names, so a copied completion is worth nothing to anyone else. The
// introducer hands off only capabilities of a vat it dialed (it knows
// where that vat listens) to a peer that negotiated ProtoLevel3.
type Network struct {
	id  *Identity
	vat *core.Vat

	mu   sync.Mutex
	dial sturdyref.Dialer
	// dialed are the connections to vats at a known address.
	dialed map[*core.Conn]sturdyref.Ref
}

// NewNetwork returns the network of the vat with identity id. From now on
// id offers ProtoLevel3 in its handshakes; give every connection of the
// vat Options.Vat = n.Vat(), and dial other vats with n.Dial so that a
// capability they host can be handed off. SetDialer must be called
// before a handoff needs a new connection.
func NewNetwork(id *Identity) *Network {
	id.level3 = true
	n := &Network{id: id, dialed: make(map[*core.Conn]sturdyref.Ref)}
	n.vat = core.NewVat(n)
	return n
}

// Vat returns the vat state to put in the Options of the vat's
// connections.
func (n *Network) Vat() *core.Vat { return n.vat }

// SetDialer sets how the network reaches another vat (for example
// unix.SturdyDialer(id, &core.Options{Vat: n.Vat()})).
func (n *Network) SetDialer(d sturdyref.Dialer) {
	n.mu.Lock()
	n.dial = d
	n.mu.Unlock()
}

// Dial connects to the vat ref names with the network's dialer and
// remembers where it is, so that its capabilities can be handed off.
func (n *Network) Dial(ctx context.Context, ref sturdyref.Ref) (*core.Conn, error) {
	n.mu.Lock()
	dial := n.dial
	n.mu.Unlock()
	if dial == nil {
		return nil, errors.New("secure: network has no dialer (SetDialer)")
	}
	c, err := dial(ctx, ref.Vat())
	if err != nil {
		return nil, err
	}
	n.mu.Lock()
	n.dialed[c] = ref.Vat()
	n.mu.Unlock()
	go func() {
		<-c.Done()
		n.mu.Lock()
		delete(n.dialed, c)
		n.mu.Unlock()
	}()
	return c, nil
}

// peer returns the authenticated fingerprint of c's peer and whether the
// connection negotiated Level 3.
func peer(c *core.Conn) (sturdyref.Fingerprint, bool, error) {
	tc := tlsOf(c.Transport())
	if tc == nil {
		return sturdyref.Fingerprint{}, false, errors.New("secure: connection is not TLS")
	}
	cs := tc.ConnectionState()
	if !cs.HandshakeComplete {
		return sturdyref.Fingerprint{}, false, errors.New("secure: handshake not complete")
	}
	fp, err := peerFingerprint(cs)
	return fp, cs.NegotiatedProtocol == ProtoLevel3, err
}

// tlsOf finds the TLS connection under an adapter's wrappers.
func tlsOf(x any) *tls.Conn {
	for range 8 {
		switch v := x.(type) {
		case *tls.Conn:
			return v
		case interface{ TLS() *tls.Conn }:
			return v.TLS()
		case interface{ NetConn() net.Conn }:
			x = v.NetConn()
		default:
			return nil
		}
	}
	return nil
}

func textPtr(s string) (capnp.Ptr, error) {
	_, seg, err := capnp.NewMessage(capnp.SingleSegment(nil))
	if err != nil {
		return capnp.Ptr{}, err
	}
	t, err := capnp.NewText(seg, s)
	if err != nil {
		return capnp.Ptr{}, err
	}
	return t.ToPtr(), nil
}

// cut splits "<prefix>#<nonce>" and checks the nonce.
func cut(p capnp.Ptr, what string) (string, string, error) {
	s := p.Text()
	i := strings.LastIndexByte(s, '#')
	if i < 0 {
		return "", "", fmt.Errorf("secure: malformed %s", what)
	}
	nonce := s[i+1:]
	if b, err := base64.RawURLEncoding.DecodeString(nonce); err != nil || len(b) != nonceSize {
		return "", "", fmt.Errorf("secure: malformed %s nonce", what)
	}
	return s[:i], nonce, nil
}

const nonceSize = 16

// Introduce implements core.Network.
func (n *Network) Introduce(host, recipient *core.Conn) (capnp.Ptr, capnp.Ptr, bool, error) {
	n.mu.Lock()
	hostRef, known := n.dialed[host]
	n.mu.Unlock()
	if !known {
		return capnp.Ptr{}, capnp.Ptr{}, false, nil // we do not know where the host listens
	}
	if _, l3, err := peer(host); err != nil || !l3 {
		return capnp.Ptr{}, capnp.Ptr{}, false, err
	}
	rfp, l3, err := peer(recipient)
	if err != nil || !l3 {
		return capnp.Ptr{}, capnp.Ptr{}, false, err
	}
	b := make([]byte, nonceSize)
	if _, err := rand.Read(b); err != nil {
		return capnp.Ptr{}, capnp.Ptr{}, false, err
	}
	nonce := base64.RawURLEncoding.EncodeToString(b)
	contact, err := textPtr(hostRef.String() + "#" + nonce)
	if err != nil {
		return capnp.Ptr{}, capnp.Ptr{}, false, err
	}
	await, err := textPtr(rfp.String() + "#" + nonce)
	if err != nil {
		return capnp.Ptr{}, capnp.Ptr{}, false, err
	}
	return contact, await, true, nil
}

// Connect implements core.Network: it reuses a connection to the host's
// fingerprint if the vat has one, else dials the address in toContact.
func (n *Network) Connect(ctx context.Context, via *core.Conn, toContact capnp.Ptr) (*core.Conn, capnp.Ptr, error) {
	uri, nonce, err := cut(toContact, "ThirdPartyToContact")
	if err != nil {
		return nil, capnp.Ptr{}, err
	}
	ref, err := sturdyref.Parse(uri)
	if err != nil {
		return nil, capnp.Ptr{}, fmt.Errorf("secure: ThirdPartyToContact: %w", err)
	}
	if ref.Insecure {
		return nil, capnp.Ptr{}, errors.New("secure: ThirdPartyToContact names an insecure vat")
	}
	provider, _, err := peer(via)
	if err != nil {
		return nil, capnp.Ptr{}, err
	}
	host := n.connTo(ref.Fingerprint)
	if host == nil {
		if host, err = n.Dial(ctx, ref); err != nil {
			return nil, capnp.Ptr{}, fmt.Errorf("secure: reach the host for a handoff: %w", err)
		}
	}
	completion, err := textPtr(provider.String() + "#" + nonce)
	if err != nil {
		return nil, capnp.Ptr{}, err
	}
	return host, completion, nil
}

// connTo returns a live connection this network dialed to fp, if any.
func (n *Network) connTo(fp sturdyref.Fingerprint) *core.Conn {
	n.mu.Lock()
	defer n.mu.Unlock()
	for c, ref := range n.dialed {
		if ref.Fingerprint.Equal(fp) && c.Err() == nil {
			select {
			case <-c.Done():
			default:
				return c
			}
		}
	}
	return nil
}

// Expect implements core.Network.
func (n *Network) Expect(provider *core.Conn, toAwait capnp.Ptr) (string, error) {
	recipient, nonce, err := cut(toAwait, "ThirdPartyToAwait")
	if err != nil {
		return "", err
	}
	rfp, err := sturdyref.ParseFingerprint(recipient)
	if err != nil {
		return "", fmt.Errorf("secure: ThirdPartyToAwait: %w", err)
	}
	pfp, _, err := peer(provider)
	if err != nil {
		return "", err
	}
	return key(pfp, rfp, nonce), nil
}

// Complete implements core.Network.
func (n *Network) Complete(recipient *core.Conn, completion capnp.Ptr) (string, error) {
	provider, nonce, err := cut(completion, "ThirdPartyCompletion")
	if err != nil {
		return "", err
	}
	pfp, err := sturdyref.ParseFingerprint(provider)
	if err != nil {
		return "", fmt.Errorf("secure: ThirdPartyCompletion: %w", err)
	}
	rfp, _, err := peer(recipient)
	if err != nil {
		return "", err
	}
	return key(pfp, rfp, nonce), nil
}

func key(provider, recipient sturdyref.Fingerprint, nonce string) string {
	return provider.String() + ">" + recipient.String() + "#" + nonce
}
