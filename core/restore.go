package core

import (
	"context"
	"errors"
	"fmt"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/exc"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"
)

// A Restorer turns the service ID a peer names in its Bootstrap message
// into a capability (Cap'n Proto RPC Level 2: persistent capabilities,
// restored from a sturdy ref). Package core/sturdyref has one backed by a
// table and an optional persistent store.
//
// Restore runs in a goroutine of its own, so it may block; ctx ends when
// the peer cancels the Bootstrap or the connection closes. The connection
// takes ownership of the returned client. The error's text reaches the
// peer: a restorer should answer an unknown and a revoked ID with one and
// the same error, so that a peer cannot tell them apart.
type Restorer interface {
	Restore(ctx context.Context, serviceID []byte) (capnp.Client, error)
}

// RestorerFunc adapts a function to the Restorer interface.
type RestorerFunc func(ctx context.Context, serviceID []byte) (capnp.Client, error)

// Restore calls f.
func (f RestorerFunc) Restore(ctx context.Context, serviceID []byte) (capnp.Client, error) {
	return f(ctx, serviceID)
}

// MaxServiceIDSize bounds the service ID a peer may send in a Bootstrap
// message and that Restore sends.
const MaxServiceIDSize = 1024

// Restore asks the peer for the capability named by serviceID (the secret
// part of a sturdy ref): it sends a Bootstrap message whose
// deprecatedObjectId is serviceID as Text, as OCaml's capnp-rpc does, and
// returns a promise for the answer, like Bootstrap. An empty serviceID
// sends a plain Bootstrap (as OCaml does): the peer's public capability.
// ctx bounds the request only.
func (c *Conn) Restore(ctx context.Context, serviceID []byte) capnp.Client {
	if len(serviceID) > MaxServiceIDSize {
		return brokenClient(fmt.Errorf("captp: restore: service ID of %d bytes is longer than %d", len(serviceID), MaxServiceIDSize))
	}
	if len(serviceID) == 0 {
		serviceID = nil // C++ refuses any object ID, even an empty one
	}
	return c.sendBootstrap(ctx, serviceID)
}

// setObjectID writes id into b's deprecatedObjectId as Text. OCaml's
// capnp-rpc writes and reads the service ID as Text (the bytes are
// arbitrary; only the trailing NUL matters to readers).
func setObjectID(b rpccp.Bootstrap, id []byte) error {
	t, err := capnp.NewTextFromBytes(b.Segment(), id)
	if err != nil {
		return fmt.Errorf("encode service ID: %w", err)
	}
	return b.SetDeprecatedObjectId(t.ToPtr())
}

// objectID reads the service ID of a Bootstrap message: present reports
// whether it has one. Text (as OCaml sends it) and Data are accepted.
func objectID(b rpccp.Bootstrap) (id []byte, present bool, err error) {
	if !b.HasDeprecatedObjectId() {
		return nil, false, nil
	}
	p, err := b.DeprecatedObjectId()
	if err != nil {
		return nil, true, fmt.Errorf("decode bootstrap object ID: %w", err)
	}
	if !p.IsValid() {
		return nil, false, nil
	}
	raw := p.TextBytes()
	if raw == nil {
		raw = p.Data()
	}
	if raw == nil {
		return nil, true, errBadObjectID
	}
	if len(raw) > MaxServiceIDSize {
		return nil, true, errLongObjectID
	}
	// The message is recycled once handled; keep a copy.
	return append([]byte{}, raw...), true, nil
}

var (
	errBadObjectID  = exc.New(exc.Failed, "captp", "bootstrap object ID is neither Text nor Data")
	errLongObjectID = exc.New(exc.Failed, "captp", fmt.Sprintf("bootstrap object ID is longer than %d bytes", MaxServiceIDSize))
	errNoRestorer   = exc.New(exc.Failed, "captp", "this vat has no restorer")
)

// bootstrapRestoreLocked handles a Bootstrap that names a service (or any
// Bootstrap when the vat has a restorer and no bootstrap capability). It
// reports false when the plain bootstrap capability should answer.
func (c *Conn) bootstrapRestoreLocked(fx *effects, a *answer, b rpccp.Bootstrap) bool {
	id, _, err := objectID(b)
	if err == nil && len(id) == 0 && (c.bootstrap.IsValid() || c.restorer == nil) {
		return false // no (or an empty) ID: the public bootstrap capability
	}
	switch {
	case err != nil:
	case c.restorer == nil:
		err = errNoRestorer
	case c.inProgress > c.lim.MaxAnswers: // this answer is already counted
		err = exc.New(exc.Overloaded, "captp", fmt.Sprintf("too many calls in progress (limit %d)", c.lim.MaxAnswers))
	}
	if err != nil {
		a.outErr = err
		c.returnLocked(fx, a)
		return true
	}
	r := c.restorer
	if c.manual {
		// The simulation has no goroutines: restore in the effect.
		fx.add(func() { c.finishRestore(a, r, id) })
	} else {
		fx.add(func() { go c.finishRestore(a, r, id) })
	}
	return true
}

// finishRestore runs the restorer and returns its capability (or error) as
// the Bootstrap's answer, through the answer's Returner methods, which
// cope with a Finish or a shutdown that came first.
func (c *Conn) finishRestore(a *answer, r Restorer, id []byte) {
	client, err := callRestorer(&a.ctx, r, id)
	if err == nil && !client.IsValid() {
		err = errors.New("captp: restorer returned a null capability")
	}
	if err == nil {
		err = a.setBootstrapResult(client)
	}
	a.PrepareReturn(err)
	a.Return()
}

// callRestorer calls r, turning a panic in it into an error: the peer's
// input must never crash the vat.
func callRestorer(ctx context.Context, r Restorer, id []byte) (client capnp.Client, err error) {
	defer func() {
		if p := recover(); p != nil {
			client.Release()
			client, err = capnp.Client{}, exc.New(exc.Failed, "captp", "internal error restoring a capability")
		}
	}()
	client, err = r.Restore(ctx, id)
	if err != nil {
		client.Release()
		return capnp.Client{}, err
	}
	return client, nil
}

// setBootstrapResult makes client (owned) the answer's result: a bare
// capability pointer, as for the bootstrap capability.
func (a *answer) setBootstrapResult(client capnp.Client) error {
	if _, err := a.AllocResults(capnp.ObjectSize{}); err != nil {
		client.Release()
		return err
	}
	payload, err := outResultsPayload(a)
	if err != nil {
		client.Release()
		return fmt.Errorf("captp: restore: %w", err)
	}
	iface := capnp.NewInterface(payload.Segment(), a.out.CapTable().Add(client))
	a.outResults = iface.ToPtr()
	if err := payload.SetContent(a.outResults); err != nil {
		return fmt.Errorf("captp: restore: %w", err)
	}
	return nil
}
