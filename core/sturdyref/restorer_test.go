package sturdyref_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	"go.uber.org/goleak"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/sturdyref"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.IgnoreAnyFunction("runtime.handleEvent"))
}

type pipeEnd struct {
	*io.PipeReader
	*io.PipeWriter
	once sync.Once
}

func (p *pipeEnd) Close() error {
	p.once.Do(func() { p.PipeReader.Close(); p.PipeWriter.Close() })
	return nil
}

func pipePair() (*pipeEnd, *pipeEnd) {
	ar, bw := io.Pipe()
	br, aw := io.Pipe()
	return &pipeEnd{PipeReader: ar, PipeWriter: aw}, &pipeEnd{PipeReader: br, PipeWriter: bw}
}

// loadTest makes a Test object named by the record's data.
func loadTest(_ context.Context, _ []byte, rec sturdyref.Record) (capnp.Client, error) {
	if rec.Kind != "test" {
		return capnp.Client{}, fmt.Errorf("unknown kind %q", rec.Kind)
	}
	return capnp.Client(testimpl.New(string(rec.Data), nil).Client()), nil
}

// vat is a server vat reachable over in-memory pipes that can be
// "restarted": its connections close and a new Restorer is made on the
// same store, as a new process would.
type vat struct {
	t     *testing.T
	store sturdyref.Store
	self  sturdyref.Ref

	mu    sync.Mutex
	r     *sturdyref.Restorer
	conns []*core.Conn
	down  bool
	dials atomic.Int32
}

func newVat(t *testing.T, store sturdyref.Store) *vat {
	v := &vat{t: t, store: store, self: sturdyref.Ref{Insecure: true, Address: sturdyref.Address{Transport: sturdyref.TCP, Host: "test", Port: 1}}}
	v.start()
	t.Cleanup(v.stop)
	return v
}

func (v *vat) start() {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.r = sturdyref.NewRestorer(sturdyref.RestorerOptions{Vat: v.self, Store: v.store, Load: loadTest})
	v.down = false
}

func (v *vat) stop() {
	v.mu.Lock()
	conns := v.conns
	v.conns = nil
	r := v.r
	v.down = true
	v.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
	r.Close()
}

func (v *vat) restorer() *sturdyref.Restorer {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.r
}

var errDown = errors.New("connection refused")

func (v *vat) dial(ctx context.Context, ref sturdyref.Ref) (*core.Conn, error) {
	v.dials.Add(1)
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.down {
		return nil, errDown
	}
	a, b := pipePair()
	v.conns = append(v.conns, core.NewConn(b, &core.Options{Restorer: v.r}))
	return core.NewConn(a, nil), nil
}

func callName(ctx context.Context, c capnp.Client) (string, error) {
	f, release := testcapnp.Test(c).Name(ctx, nil)
	defer release()
	res, err := f.Struct()
	if err != nil {
		return "", err
	}
	return res.Name()
}

func TestDeriveServiceID(t *testing.T) {
	a := sturdyref.DeriveServiceID([]byte("secret"), "echo")
	if !bytes.Equal(a, sturdyref.DeriveServiceID([]byte("secret"), "echo")) {
		t.Fatal("not deterministic")
	}
	if bytes.Equal(a, sturdyref.DeriveServiceID([]byte("secret2"), "echo")) || bytes.Equal(a, sturdyref.DeriveServiceID([]byte("secret"), "echo2")) {
		t.Fatal("different secret or name gave the same ID")
	}
	x, err := sturdyref.NewServiceID()
	if err != nil {
		t.Fatal(err)
	}
	y, _ := sturdyref.NewServiceID()
	if len(x) != sturdyref.ServiceIDSize || bytes.Equal(x, y) {
		t.Fatalf("random IDs %x, %x", x, y)
	}
}

// A forged ID, a revoked table entry and a revoked stored record all get
// the very same error, for a local Restore and over the wire.
func TestUnknownAndRevokedLookAlike(t *testing.T) {
	ctx := context.Background()
	v := newVat(t, &sturdyref.MemStore{})
	r := v.restorer()
	tableID, _ := sturdyref.NewServiceID()
	if err := r.Add(tableID, capnp.Client(testimpl.New("table", nil).Client())); err != nil {
		t.Fatal(err)
	}
	storedID, err := r.SaveNew(ctx, sturdyref.Record{Kind: "test", Data: []byte("stored")})
	if err != nil {
		t.Fatal(err)
	}
	for id, want := range map[string]string{string(tableID): "table", string(storedID): "stored"} {
		c, err := r.Restore(ctx, []byte(id))
		if err != nil {
			t.Fatal(err)
		}
		if name, err := callName(ctx, c); err != nil || name != want {
			t.Fatalf("restored %q, %v; want %q", name, err, want)
		}
		c.Release()
	}
	for _, id := range [][]byte{tableID, storedID} {
		if err := r.Revoke(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	if err := r.Revoke(ctx, tableID); !errors.Is(err, sturdyref.ErrUnknownService) {
		t.Fatalf("second revoke: %v; want ErrUnknownService", err)
	}
	forged := append([]byte{}, storedID...)
	forged[0] ^= 1
	var wireErrs []string
	for _, id := range [][]byte{tableID, storedID, forged, nil} {
		if _, err := r.Restore(ctx, id); err != sturdyref.ErrUnknownService {
			t.Fatalf("local restore of %x: %v; want ErrUnknownService", id, err)
		}
		conn, _ := v.dial(ctx, sturdyref.Ref{})
		c := conn.Restore(ctx, id)
		_, err := callName(ctx, c)
		c.Release()
		conn.Close()
		if err == nil {
			t.Fatalf("restore of %x over the wire succeeded", id)
		}
		wireErrs = append(wireErrs, err.Error())
	}
	for _, e := range wireErrs[1:] {
		if e != wireErrs[0] {
			t.Fatalf("errors differ: %q", wireErrs)
		}
	}
	if !strings.Contains(wireErrs[0], "Unknown persistent service ID") {
		t.Fatalf("error %q", wireErrs[0])
	}
}

// A loader's failure is logged, not shown to the peer.
func TestLoaderErrorIsHidden(t *testing.T) {
	ctx := context.Background()
	st := &sturdyref.MemStore{}
	r := sturdyref.NewRestorer(sturdyref.RestorerOptions{Store: st, Load: loadTest})
	defer r.Close()
	id, _ := r.SaveNew(ctx, sturdyref.Record{Kind: "secret-kind"})
	_, err := r.Restore(ctx, id)
	if err == nil || strings.Contains(err.Error(), "secret-kind") {
		t.Fatalf("err %v; want a generic error", err)
	}
}

// nameOnly is a Test server with only name(): enough to show that a
// capability with persistence keeps its own methods.
type nameOnly struct {
	testcapnp.Test_Server // nil: other methods are never called
	name                  string
}

func (n *nameOnly) Name(_ context.Context, call testcapnp.Test_name) error {
	res, err := call.AllocResults()
	if err != nil {
		return err
	}
	return res.SetName(n.name)
}

// save() on a persistent capability returns its sturdy ref (a URI as
// Text); after revocation it fails like an unknown ID.
func TestPersistentSave(t *testing.T) {
	ctx := context.Background()
	v := newVat(t, &sturdyref.MemStore{})
	r := v.restorer()
	id, _ := sturdyref.NewServiceID()
	obj := &nameOnly{name: "saved"}
	client := sturdyref.WithPersistence(testcapnp.Test_Methods(nil, obj), obj, r.SaverFor(id))
	if err := r.Add(id, client); err != nil {
		t.Fatal(err)
	}
	conn, _ := v.dial(ctx, sturdyref.Ref{})
	defer conn.Close()
	c := conn.Restore(ctx, id)
	defer c.Release()
	ref, err := sturdyref.Save(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(ref.ServiceID, id) || ref.Address != v.self.Address || !ref.Insecure {
		t.Fatalf("save() = %v; want the vat's ref with the service ID", ref.Redacted())
	}
	if name, err := callName(ctx, c); err != nil || name != "saved" {
		t.Fatalf("the persistent capability's own methods: %q, %v", name, err)
	}
	if err := r.Revoke(ctx, id); err != nil {
		t.Fatal(err)
	}
	if _, err := sturdyref.Save(ctx, c); err == nil || !strings.Contains(err.Error(), "Unknown persistent service ID") {
		t.Fatalf("save() after revoke: %v", err)
	}
}

// The Reconnecting client connects on first use and, after the server
// vat restarts (same store, new restorer, old connections gone), gets the
// capability back.
func TestReconnectingSurvivesRestart(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	v := newVat(t, &sturdyref.MemStore{})
	id, err := v.restorer().SaveNew(ctx, sturdyref.Record{Kind: "test", Data: []byte("durable")})
	if err != nil {
		t.Fatal(err)
	}
	rc := sturdyref.NewReconnecting(v.self.WithService(id), v.dial, &sturdyref.ReconnectOptions{MinBackoff: 10 * time.Millisecond})
	defer rc.Close()
	if v.dials.Load() != 0 {
		t.Fatal("dialled before first use")
	}
	name := func() (string, error) {
		var n string
		err := rc.Do(ctx, func(ctx context.Context, c capnp.Client) (err error) {
			n, err = callName(ctx, c)
			return err
		})
		return n, err
	}
	if n, err := name(); err != nil || n != "durable" {
		t.Fatalf("first call: %q, %v", n, err)
	}
	v.stop()
	// While the vat is down, calls wait and redial with backoff.
	go func() {
		time.Sleep(100 * time.Millisecond)
		v.start()
	}()
	if n, err := name(); err != nil || n != "durable" {
		t.Fatalf("call after restart: %q, %v", n, err)
	}
	if d := v.dials.Load(); d < 3 || d > 30 {
		t.Errorf("%d dials; want a few (a refused one or more, then one that works), not a busy loop", d)
	}
}

func TestReconnectingRespectsContext(t *testing.T) {
	var dials atomic.Int32
	dial := func(ctx context.Context, _ sturdyref.Ref) (*core.Conn, error) {
		dials.Add(1)
		return nil, errDown
	}
	rc := sturdyref.NewReconnecting(sturdyref.Ref{}, dial, &sturdyref.ReconnectOptions{MinBackoff: 20 * time.Millisecond, MaxBackoff: 40 * time.Millisecond})
	defer rc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := rc.Client(ctx)
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), errDown.Error()) {
		t.Fatalf("err %v; want the deadline and the last dial error", err)
	}
	if el := time.Since(start); el > 2*time.Second {
		t.Fatalf("returned %v after the deadline", el)
	}
	if n := dials.Load(); n < 3 || n > 20 {
		t.Fatalf("%d dials in 300 ms with 20-40 ms backoff", n)
	}
	rc.Close()
	if _, err := rc.Client(context.Background()); !errors.Is(err, sturdyref.ErrClosed) {
		t.Fatalf("after Close: %v", err)
	}
}

// A revoked service is not a connection loss: Do returns its error at
// once instead of reconnecting.
func TestReconnectingRevokedIsNotRetried(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	v := newVat(t, &sturdyref.MemStore{})
	rc := sturdyref.NewReconnecting(v.self.WithService([]byte("forged")), v.dial, nil)
	defer rc.Close()
	err := rc.Do(ctx, func(ctx context.Context, c capnp.Client) error {
		_, err := callName(ctx, c)
		return err
	})
	if err == nil || !strings.Contains(err.Error(), "Unknown persistent service ID") {
		t.Fatalf("err %v", err)
	}
	if d := v.dials.Load(); d != 1 {
		t.Fatalf("%d dials; want 1", d)
	}
}
