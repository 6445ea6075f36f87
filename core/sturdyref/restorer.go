package sturdyref

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"sync"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/exc"

	"github.com/captp-go/captp/core"
)

// ServiceIDSize is the size of the IDs NewServiceID and DeriveServiceID
// make: 256 bits, beyond guessing.
const ServiceIDSize = 32

// NewServiceID returns a random service ID.
func NewServiceID() ([]byte, error) {
	id := make([]byte, ServiceIDSize)
	if _, err := rand.Read(id); err != nil {
		return nil, fmt.Errorf("sturdyref: random service ID: %w", err)
	}
	return id, nil
}

// DeriveServiceID returns HMAC-SHA256(secret, name): a service ID that a
// vat can recompute after a restart from a secret it keeps (as OCaml's
// capnp-rpc Restorer.Id.derived does), without storing the ID itself.
// secret must be unguessable (NewServiceID makes a suitable one).
func DeriveServiceID(secret []byte, name string) []byte {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(name))
	return m.Sum(nil)
}

// Key is what a Restorer and a Store index services by: the SHA-256 of the
// service ID. A store holds keys, never IDs, so reading a store (or a
// backup of it) does not give away the capabilities.
type Key [sha256.Size]byte

// KeyOf returns the key of a service ID.
func KeyOf(serviceID []byte) Key { return sha256.Sum256(serviceID) }

// ErrUnknownService is the one error a Restorer answers for an ID it does
// not know, whether it never existed, was revoked or is forged: a peer
// learns nothing from it. It is a "failed" exception with the same text
// as OCaml's capnp-rpc.
var ErrUnknownService error = exc.New(exc.Failed, "", "Unknown persistent service ID")

// Record is what a Store keeps for a persistent service: enough for a
// Loader to make the capability again after a restart.
type Record struct {
	// Kind tells the loader what to make (an application-defined name).
	Kind string
	// Data is the service's state, in the loader's format.
	Data []byte
}

// A Store keeps Records by Key and survives restarts (adapters/diskstore
// has one on disk). Methods may be called concurrently.
type Store interface {
	// Put stores rec under k durably before returning, replacing any.
	Put(ctx context.Context, k Key, rec Record) error
	// Get returns the record under k; ok is false if there is none.
	Get(ctx context.Context, k Key) (rec Record, ok bool, err error)
	// Delete removes k durably; deleting a missing key is not an error.
	Delete(ctx context.Context, k Key) error
}

// A Loader makes the capability for a stored record. It runs for every
// restore of a stored service; the Restorer takes ownership of the client.
// serviceID is the ID being restored: a service that keeps state in its
// record updates it with Store.Put(KeyOf(serviceID), …), and one that
// answers Persistent.save() uses Restorer.SaverFor(serviceID).
type Loader func(ctx context.Context, serviceID []byte, rec Record) (capnp.Client, error)

// RestorerOptions configure a Restorer. All fields are optional.
type RestorerOptions struct {
	// Vat is this vat's own sturdy ref without a service ID (its address
	// and fingerprint), from which Ref and save() make sturdy refs.
	Vat Ref
	// Store keeps services added with Save across restarts; Load makes
	// their capabilities again. Without a Store, Save fails.
	Store Store
	Load  Loader
	// Logger receives the reasons of failed restores, which the peer
	// does not see. Nil discards them.
	Logger *slog.Logger
}

// Restorer maps service IDs to capabilities: an in-memory table of live
// capabilities (Add) and, behind it, a persistent Store of records that a
// Loader turns into capabilities (Save). It implements core.Restorer: set
// it as core.Options.Restorer.
//
// IDs are looked up by their SHA-256 (Key) and compared in constant time,
// so the time an answer takes says nothing about how close a forged ID
// came. An unknown, revoked or forged ID all get ErrUnknownService.
type Restorer struct {
	opts RestorerOptions
	log  *slog.Logger

	mu     sync.Mutex
	live   map[Key]liveEntry
	closed bool
}

type liveEntry struct {
	key    Key // again, for the constant-time comparison
	client capnp.Client
}

var _ core.Restorer = (*Restorer)(nil)

// NewRestorer returns an empty Restorer.
func NewRestorer(opts RestorerOptions) *Restorer {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Restorer{opts: opts, log: log, live: make(map[Key]liveEntry)}
}

// Add serves client under serviceID until Revoke or Close, in memory only:
// after a restart it is gone unless added again. The Restorer takes
// ownership of client. Adding an ID twice is an error.
func (r *Restorer) Add(serviceID []byte, client capnp.Client) error {
	k := KeyOf(serviceID)
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		client.Release()
		return errors.New("sturdyref: restorer closed")
	}
	if _, dup := r.live[k]; dup {
		client.Release()
		return errors.New("sturdyref: service ID already in the table")
	}
	r.live[k] = liveEntry{key: k, client: client}
	return nil
}

// Save stores rec under serviceID in the Store, durably, so that the
// service can be restored after a restart (through the Loader).
func (r *Restorer) Save(ctx context.Context, serviceID []byte, rec Record) error {
	if r.opts.Store == nil {
		return errors.New("sturdyref: restorer has no store")
	}
	if err := r.opts.Store.Put(ctx, KeyOf(serviceID), rec); err != nil {
		return fmt.Errorf("sturdyref: save: %w", err)
	}
	return nil
}

// SaveNew stores rec under a new random service ID and returns the ID.
func (r *Restorer) SaveNew(ctx context.Context, rec Record) ([]byte, error) {
	id, err := NewServiceID()
	if err != nil {
		return nil, err
	}
	if err := r.Save(ctx, id, rec); err != nil {
		return nil, err
	}
	return id, nil
}

// Revoke removes serviceID from the table and the store: from now on it
// restores to ErrUnknownService, like an ID that never existed.
// Capabilities already restored stay usable until released (revoking
// those needs a revocable wrapper, an application matter). Revoking an
// unknown ID returns ErrUnknownService.
func (r *Restorer) Revoke(ctx context.Context, serviceID []byte) error {
	k := KeyOf(serviceID)
	r.mu.Lock()
	e, inTable := r.live[k]
	delete(r.live, k)
	r.mu.Unlock()
	e.client.Release()
	inStore := false
	if st := r.opts.Store; st != nil {
		_, ok, err := st.Get(ctx, k)
		if err != nil {
			return fmt.Errorf("sturdyref: revoke: %w", err)
		}
		if ok {
			inStore = true
			if err := st.Delete(ctx, k); err != nil {
				return fmt.Errorf("sturdyref: revoke: %w", err)
			}
		}
	}
	if !inTable && !inStore {
		return ErrUnknownService
	}
	return nil
}

// Restore returns the capability for serviceID: from the table, else from
// the store through the Loader. It implements core.Restorer.
func (r *Restorer) Restore(ctx context.Context, serviceID []byte) (capnp.Client, error) {
	k := KeyOf(serviceID)
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return capnp.Client{}, ErrUnknownService
	}
	e, ok := r.live[k]
	if ok && subtle.ConstantTimeCompare(e.key[:], k[:]) == 1 {
		c := e.client.AddRef()
		r.mu.Unlock()
		return c, nil
	}
	r.mu.Unlock()
	st, load := r.opts.Store, r.opts.Load
	if st == nil || load == nil {
		return capnp.Client{}, ErrUnknownService
	}
	rec, ok, err := st.Get(ctx, k)
	if err != nil {
		r.log.Error("sturdyref: restore: store", "err", err)
		return capnp.Client{}, errRestoreFailed
	}
	if !ok {
		return capnp.Client{}, ErrUnknownService
	}
	c, err := load(ctx, serviceID, rec)
	if err != nil {
		r.log.Error("sturdyref: restore: load", "kind", rec.Kind, "err", err)
		return capnp.Client{}, errRestoreFailed
	}
	if !c.IsValid() {
		return capnp.Client{}, errRestoreFailed
	}
	return c, nil
}

// errRestoreFailed hides the reason (logged) from the peer.
var errRestoreFailed error = exc.New(exc.Failed, "", "Internal error restoring object")

// Ref returns the sturdy ref of serviceID in this vat (RestorerOptions.Vat
// with the ID). It does not check that the ID is known.
func (r *Restorer) Ref(serviceID []byte) Ref { return r.opts.Vat.WithService(serviceID) }

// Close releases the table's capabilities; later restores fail.
func (r *Restorer) Close() {
	r.mu.Lock()
	live := r.live
	r.live = map[Key]liveEntry{}
	r.closed = true
	r.mu.Unlock()
	for _, e := range live {
		e.client.Release()
	}
}
