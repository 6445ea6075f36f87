package sturdyref

import (
	"context"
	"fmt"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/server"
	"capnproto.org/go/capnp/v3/std/capnp/persistent"
)

// Saver implements persistent.capnp's Persistent.save(): it answers with
// the sturdy ref the function returns, as Text holding the URI in
// SaveResults.sturdyRef (what OCaml's capnp-rpc puts there). sealFor is
// ignored, as OCaml does.
type Saver func(ctx context.Context) (Ref, error)

var _ persistent.Persistent_Server = Saver(nil)

// Save implements persistent.Persistent_Server.
func (s Saver) Save(ctx context.Context, call persistent.Persistent_save) error {
	ref, err := s(ctx)
	if err != nil {
		return err
	}
	res, err := call.AllocResults()
	if err != nil {
		return fmt.Errorf("sturdyref: save: %w", err)
	}
	t, err := capnp.NewText(res.Segment(), ref.String())
	if err != nil {
		return fmt.Errorf("sturdyref: save: %w", err)
	}
	return res.SetSturdyRef(t.ToPtr())
}

// SaverFor returns a Saver for serviceID: save() answers its sturdy ref
// while the ID is known to r (in the table or the store), and
// ErrUnknownService once it has been revoked.
func (r *Restorer) SaverFor(serviceID []byte) Saver {
	id := append([]byte{}, serviceID...)
	k := KeyOf(id)
	return func(ctx context.Context) (Ref, error) {
		r.mu.Lock()
		_, live := r.live[k]
		r.mu.Unlock()
		if !live {
			st := r.opts.Store
			if st == nil {
				return Ref{}, ErrUnknownService
			}
			_, ok, err := st.Get(ctx, k)
			if err != nil {
				return Ref{}, fmt.Errorf("sturdyref: save: %w", err)
			}
			if !ok {
				return Ref{}, ErrUnknownService
			}
		}
		return r.Ref(id), nil
	}
}

// WithPersistence returns a client for a server made of methods (from a
// generated X_Methods(nil, impl)) plus Persistent.save answered by save.
// impl is the server's brand, and its Shutdown (if it has one) runs when
// the last reference is released.
func WithPersistence(methods []server.Method, impl any, save Saver) capnp.Client {
	methods = persistent.Persistent_Methods(methods, save)
	shutdown, _ := impl.(server.Shutdowner)
	return capnp.NewClient(server.New(methods, impl, shutdown))
}

// Save calls Persistent.save() on c and parses the sturdy ref it returns
// (a URI as Text, as OCaml's capnp-rpc and this package write it).
func Save(ctx context.Context, c capnp.Client) (Ref, error) {
	f, release := persistent.Persistent(c).Save(ctx, nil)
	defer release()
	res, err := f.Struct()
	if err != nil {
		return Ref{}, fmt.Errorf("sturdyref: save: %w", err)
	}
	p, err := res.SturdyRef()
	if err != nil {
		return Ref{}, fmt.Errorf("sturdyref: save: %w", err)
	}
	uri, ok := textOf(p)
	if !ok {
		return Ref{}, fmt.Errorf("%w: save() returned a sturdy ref that is not Text", ErrBadURI)
	}
	ref, err := Parse(uri)
	if err != nil {
		return Ref{}, fmt.Errorf("sturdyref: save: %w", err)
	}
	return ref, nil
}

func textOf(p capnp.Ptr) (string, bool) {
	if b := p.TextBytes(); b != nil {
		return string(b), true
	}
	return "", false
}
