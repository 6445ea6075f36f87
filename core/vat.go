package core

import (
	"context"
	"errors"
	"maps"
	"slices"
	"sync"
	"time"

	"capnproto.org/go/capnp/v3"
)

// A Network lets the connections of one vat hand capabilities to each
// other's peers directly (rpc.capnp Level 3, three-party handoff): when
// Alice's vat passes Bob a capability it imports from Carol, Bob connects
// to Carol and picks it up there, instead of every call going through
// Alice.
//
// The Network owns identities and addresses: what rpc.capnp leaves to
// the "VatNetwork" (the AnyPointer types ThirdPartyToContact,
// ThirdPartyToAwait and ThirdPartyCompletion). The core owns the protocol
// (Provide, Accept, the vine, the embargo that keeps E-order). A Network
// only hands off between connections it made or accepted, to peers it
// knows speak Level 3: any other peer (go-capnp, the C++ reference, a
// connection made without the Vat) never sees a Level 3 message.
//
// Introduce, Expect and Complete run with a connection's lock held: they
// must not block or call back into the core. Connect may block.
type Network interface {
	// Introduce is asked by the introducer (Alice) before it sends to
	// recipient's peer (Bob) a capability imported from host's peer
	// (Carol). ok false means "proxy as usual" (either peer does not
	// speak Level 3, or the network cannot connect them). Otherwise
	// toContact goes to Bob in a ThirdPartyCapDescriptor and toAwait to
	// Carol in a Provide; they must let Carol recognise Bob, and only
	// Bob, when he presents the matching completion.
	Introduce(host, recipient *Conn) (toContact, toAwait capnp.Ptr, ok bool, err error)

	// Connect is asked by the recipient (Bob) for a connection to the
	// vat named in toContact, which arrived on via: an existing
	// connection of this vat or a new one (made with this Vat in its
	// Options). completion goes to that vat in an Accept.
	Connect(ctx context.Context, via *Conn, toContact capnp.Ptr) (host *Conn, completion capnp.Ptr, err error)

	// Expect is asked by the host (Carol) for a Provide from provider's
	// peer: it returns the key under which the provision waits.
	Expect(provider *Conn, toAwait capnp.Ptr) (key string, err error)

	// Complete is asked by the host for an Accept from recipient's peer:
	// it returns the key of the provision that peer may pick up. It must
	// fold in what the network knows of the peer (its authenticated
	// identity), so that a completion copied by anyone else yields a key
	// that matches nothing.
	Complete(recipient *Conn, completion capnp.Ptr) (key string, err error)
}

// A Vat is the state that the connections of one vat share for
// three-party handoff: its Network and the capabilities it provides to
// third parties. Pass it in Options.Vat to every connection of the vat.
type Vat struct {
	net Network
	// acceptTimeout bounds how long an Accept waits for its Provide.
	acceptTimeout time.Duration

	mu         sync.Mutex // a leaf lock: taken with a Conn's lock held, never the reverse
	provisions map[string]*provision
	early      map[string][]*acceptWait // Accepts that arrived before their Provide
}

// NewVat returns a vat that hands off over net.
func NewVat(net Network) *Vat {
	return &Vat{
		net:           net,
		acceptTimeout: defaultAcceptTimeout,
		provisions:    make(map[string]*provision),
		early:         make(map[string][]*acceptWait),
	}
}

// defaultAcceptTimeout is how long an Accept that arrived before its
// Provide waits for it: the introducer sends the Provide as it sends the
// recipient the capability, so only a lost or forged one takes longer.
const defaultAcceptTimeout = 10 * time.Second

// A provision is a capability this vat was asked (by a Provide) to give
// to a third party.
type provision struct {
	key    string
	conn   *Conn  // the provider's connection
	qid    uint32 // the Provide's question id on conn
	target capnp.Client
	// waiting are embargoed Accepts, by embargo id; released are embargo
	// ids whose Disembargo arrived before their Accept.
	waiting  map[string][]*acceptWait
	released map[string]bool
}

// maxReleasedEmbargoes bounds the embargo ids a provision remembers.
const maxReleasedEmbargoes = 64

// An acceptWait is an Accept answered later: on its Provide (early) or
// on its Disembargo (embargoed).
type acceptWait struct {
	conn    *Conn
	a       *answer
	embargo string
}

// ErrNoProvision is what an Accept gets when nothing was provided to its
// sender under its completion: the same for an unknown, a finished and a
// foreign provision.
var ErrNoProvision = errors.New("captp: no such provision")

// expireEarlyAccepts fails every Accept still waiting for its Provide,
// as their timeouts would; the simulation, which has no timers, calls it
// when time passes. It returns how many there were.
func (v *Vat) expireEarlyAccepts() int {
	v.mu.Lock()
	var ws []*acceptWait
	// In key order, so that the simulation replays its seeds exactly.
	for _, key := range slices.Sorted(maps.Keys(v.early)) {
		ws = append(ws, v.early[key]...)
		delete(v.early, key)
	}
	v.mu.Unlock()
	for _, w := range ws {
		w.conn.schedule(func(fx *effects) {
			if w.a.accept == w {
				w.a.accept = nil
				w.conn.returnAcceptLocked(fx, w.a, capnp.Client{}, ErrNoProvision)
			}
		})
	}
	return len(ws)
}

// stats returns the number of provisions and early accepts, for leak
// checks.
func (v *Vat) stats() (provisions, early int) {
	v.mu.Lock()
	defer v.mu.Unlock()
	for _, w := range v.early {
		early += len(w)
	}
	return len(v.provisions), early
}
