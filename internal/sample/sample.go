// Package sample holds the sample services that `captp serve` hosts and
// `captp call` calls (schema in sample.capnp): Echo, and Counter, whose
// total lives in its sturdy ref's store record and so survives restarts.
// Both answer persistent.capnp's save() with their sturdy ref.
package sample

import (
	"context"
	"encoding/binary"
	"fmt"
	"sync"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/core/sturdyref"
)

// Record kinds.
const (
	KindEcho    = "echo"    // Data: the service's name
	KindCounter = "counter" // Data: the total, 8 bytes big-endian
)

// NewLoader returns the sturdyref.Loader for the sample services: counters
// write their total to store on every add before answering. saver gives
// each service its Persistent.save() (typically Restorer.SaverFor).
func NewLoader(store sturdyref.Store, saver func(serviceID []byte) sturdyref.Saver) sturdyref.Loader {
	return func(ctx context.Context, id []byte, rec sturdyref.Record) (capnp.Client, error) {
		switch rec.Kind {
		case KindEcho:
			e := &echo{name: string(rec.Data)}
			return sturdyref.WithPersistence(Echo_Methods(nil, e), e, saver(id)), nil
		case KindCounter:
			if len(rec.Data) != 8 {
				return capnp.Client{}, fmt.Errorf("sample: counter record of %d bytes, want 8", len(rec.Data))
			}
			c := &counter{store: store, key: sturdyref.KeyOf(id), total: int64(binary.BigEndian.Uint64(rec.Data))}
			return sturdyref.WithPersistence(Counter_Methods(nil, c), c, saver(id)), nil
		default:
			return capnp.Client{}, fmt.Errorf("sample: unknown service kind %q", rec.Kind)
		}
	}
}

// CounterRecord returns the record of a counter at total.
func CounterRecord(total int64) sturdyref.Record {
	return sturdyref.Record{Kind: KindCounter, Data: binary.BigEndian.AppendUint64(nil, uint64(total))}
}

type echo struct{ name string }

// Echo implements Echo_Server.
func (e *echo) Echo(_ context.Context, call Echo_echo) error {
	t, err := call.Args().Text()
	if err != nil {
		return err
	}
	res, err := call.AllocResults()
	if err != nil {
		return err
	}
	return res.SetText(t)
}

// Name implements Echo_Server.
func (e *echo) Name(_ context.Context, call Echo_name) error {
	res, err := call.AllocResults()
	if err != nil {
		return err
	}
	return res.SetName(e.name)
}

// counter is one restored counter. Several restores of the same counter
// are separate objects over one record; the store's last write wins.
type counter struct {
	store sturdyref.Store
	key   sturdyref.Key

	mu    sync.Mutex
	total int64
}

// Add implements Counter_Server: the new total is on disk before the
// answer.
func (c *counter) Add(ctx context.Context, call Counter_add) error {
	n := call.Args().N()
	c.mu.Lock()
	defer c.mu.Unlock()
	// Re-read: another restore of this counter may have added.
	if rec, ok, err := c.store.Get(ctx, c.key); err == nil && ok && len(rec.Data) == 8 {
		c.total = int64(binary.BigEndian.Uint64(rec.Data))
	}
	total := c.total + n
	if err := c.store.Put(ctx, c.key, CounterRecord(total)); err != nil {
		return fmt.Errorf("sample: counter: %w", err)
	}
	c.total = total
	res, err := call.AllocResults()
	if err != nil {
		return err
	}
	res.SetTotal(total)
	return nil
}

// Get implements Counter_Server.
func (c *counter) Get(ctx context.Context, call Counter_get) error {
	c.mu.Lock()
	if rec, ok, err := c.store.Get(ctx, c.key); err == nil && ok && len(rec.Data) == 8 {
		c.total = int64(binary.BigEndian.Uint64(rec.Data))
	}
	total := c.total
	c.mu.Unlock()
	res, err := call.AllocResults()
	if err != nil {
		return err
	}
	res.SetTotal(total)
	return nil
}
