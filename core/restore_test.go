package core

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"

	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// mapRestorer serves named test objects and records the IDs it was asked.
type mapRestorer struct {
	mu    sync.Mutex
	objs  map[string]*testimpl.Object
	asked [][]byte
}

var errTestUnknown = errors.New("unknown or revoked service ID")

func (r *mapRestorer) Restore(ctx context.Context, id []byte) (capnp.Client, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.asked = append(r.asked, append([]byte{}, id...))
	o, ok := r.objs[string(id)]
	if !ok {
		return capnp.Client{}, errTestUnknown
	}
	return capnp.Client(o.Client()), nil
}

func nameOf(t *testing.T, ctx context.Context, c testcapnp.Test) (string, error) {
	t.Helper()
	f, release := c.Name(ctx, nil)
	defer release()
	res, err := f.Struct()
	if err != nil {
		return "", err
	}
	return res.Name()
}

func TestRestoreNamedService(t *testing.T) {
	ctx := context.Background()
	live := new(testimpl.Live)
	r := &mapRestorer{objs: map[string]*testimpl.Object{
		"\x00\xffsecret": testimpl.New("alice", live), // binary IDs survive Text encoding
		"other":          testimpl.New("bob", live),
	}}
	client, server := pipeConns(t, &Options{
		BootstrapClient: capnp.Client(testimpl.New("public", live).Client()),
		Restorer:        r,
	}, nil)

	alice := testcapnp.Test(client.Restore(ctx, []byte("\x00\xffsecret")))
	// A call pipelined before the restorer has answered.
	name, err := nameOf(t, ctx, alice)
	if err != nil || name != "alice" {
		t.Fatalf("restored service: name %q, err %v; want alice", name, err)
	}
	bob := testcapnp.Test(client.Restore(ctx, []byte("other")))
	if name, err := nameOf(t, ctx, bob); err != nil || name != "bob" {
		t.Fatalf("second service: name %q, err %v; want bob", name, err)
	}
	// Without an ID (and with an empty one) the public capability answers.
	for _, c := range []capnp.Client{client.Bootstrap(ctx), client.Restore(ctx, nil)} {
		pub := testcapnp.Test(c)
		if name, err := nameOf(t, ctx, pub); err != nil || name != "public" {
			t.Fatalf("bootstrap: name %q, err %v; want public", name, err)
		}
		pub.Release()
	}
	r.mu.Lock()
	if len(r.asked) != 2 || !bytes.Equal(r.asked[0], []byte("\x00\xffsecret")) {
		t.Errorf("restorer asked %q; want the two service IDs only", r.asked)
	}
	r.mu.Unlock()

	alice.Release()
	bob.Release()
	waitTablesEmpty(t, client, server)
}

func waitTablesEmpty(t *testing.T, conns ...*Conn) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for _, c := range conns {
		for {
			s := c.Stats()
			if s.IsZero() {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("tables not empty: %v", s)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}

func TestRestoreUnknownServiceFails(t *testing.T) {
	ctx := context.Background()
	r := &mapRestorer{objs: map[string]*testimpl.Object{}}
	client, server := pipeConns(t, &Options{Restorer: r}, nil)
	c := testcapnp.Test(client.Restore(ctx, []byte("forged")))
	defer c.Release()
	_, err := nameOf(t, ctx, c)
	if err == nil || !strings.Contains(err.Error(), errTestUnknown.Error()) {
		t.Fatalf("call on an unknown service: err %v; want %q", err, errTestUnknown)
	}
	// The connection stays up: the error is the answer, not an Abort.
	select {
	case <-client.Done():
		t.Fatalf("connection ended: %v", client.Err())
	default:
	}
	c.Release()
	waitTablesEmpty(t, client, server)
}

func TestRestoreWithoutRestorerFails(t *testing.T) {
	ctx := context.Background()
	client, _ := pipeConns(t, &Options{BootstrapClient: capnp.Client(testimpl.New("public", nil).Client())}, nil)
	c := testcapnp.Test(client.Restore(ctx, []byte("some-id")))
	defer c.Release()
	if _, err := nameOf(t, ctx, c); err == nil || !strings.Contains(err.Error(), "no restorer") {
		t.Fatalf("restore from a vat without a restorer: err %v; want 'no restorer'", err)
	}
}

// A plain Bootstrap to a vat with a restorer and no bootstrap capability
// asks the restorer for the empty ID, as OCaml's capnp-rpc does.
func TestPlainBootstrapAsksRestorerForEmptyID(t *testing.T) {
	ctx := context.Background()
	r := &mapRestorer{objs: map[string]*testimpl.Object{"": testimpl.New("main", nil)}}
	client, _ := pipeConns(t, &Options{Restorer: r}, nil)
	c := testcapnp.Test(client.Bootstrap(ctx))
	defer c.Release()
	if name, err := nameOf(t, ctx, c); err != nil || name != "main" {
		t.Fatalf("name %q, err %v; want main", name, err)
	}
}

func TestRestorerPanicIsAnError(t *testing.T) {
	ctx := context.Background()
	r := RestorerFunc(func(context.Context, []byte) (capnp.Client, error) { panic("boom") })
	client, _ := pipeConns(t, &Options{Restorer: r}, nil)
	c := testcapnp.Test(client.Restore(ctx, []byte("x")))
	defer c.Release()
	if _, err := nameOf(t, ctx, c); err == nil || !strings.Contains(err.Error(), "internal error") {
		t.Fatalf("err %v; want internal error", err)
	}
	if strings.Contains(errString(nameOf(t, ctx, c)), "boom") {
		t.Error("the panic's text reached the peer")
	}
}

func errString(_ string, err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// A restorer still running when the connection closes sees its context
// end; its late answer is dropped and nothing leaks (TestMain checks
// goroutines).
func TestRestoreBlockedRestorerEndsWithConnection(t *testing.T) {
	ctx := context.Background()
	started := make(chan struct{})
	ended := make(chan error, 1)
	obj := testimpl.New("late", nil)
	r := RestorerFunc(func(ctx context.Context, _ []byte) (capnp.Client, error) {
		close(started)
		<-ctx.Done()
		ended <- ctx.Err()
		return capnp.Client(obj.Client()), nil // returned after the end: released by the Conn
	})
	client, server := pipeConns(t, &Options{Restorer: r}, nil)
	c := testcapnp.Test(client.Restore(ctx, []byte("x")))
	defer c.Release()
	<-started
	server.Close()
	select {
	case err := <-ended:
		if err == nil {
			t.Fatal("restorer context ended without an error")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("restorer context did not end when the connection closed")
	}
	if _, err := nameOf(t, ctx, c); err == nil {
		t.Fatal("call on a restore the server never answered succeeded")
	}
}

// The peer cancelling its request (Finish before Return) cancels the
// restorer's context.
func TestRestoreCancelledByPeer(t *testing.T) {
	started := make(chan struct{})
	ended := make(chan struct{})
	r := RestorerFunc(func(ctx context.Context, _ []byte) (capnp.Client, error) {
		close(started)
		<-ctx.Done()
		close(ended)
		return capnp.Client{}, ctx.Err()
	})
	client, server := pipeConns(t, &Options{Restorer: r}, nil)
	ctx, cancel := context.WithCancel(context.Background())
	c := client.Restore(ctx, []byte("x"))
	defer c.Release()
	<-started
	cancel() // bounds the request: sends Finish
	select {
	case <-ended:
	case <-time.After(5 * time.Second):
		t.Fatal("restorer context did not end after the peer finished the question")
	}
	waitTablesEmpty(t, client, server)
}

func TestRestoreRejectsLongServiceID(t *testing.T) {
	client, _ := pipeConns(t, nil, nil)
	c := client.Restore(context.Background(), make([]byte, MaxServiceIDSize+1))
	defer c.Release()
	if err := c.Resolve(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := nameOf(t, context.Background(), testcapnp.Test(c)); err == nil || !strings.Contains(err.Error(), "longer") {
		t.Fatalf("err %v; want a too-long error", err)
	}
}

// objectID accepts Text and Data, refuses other pointers and long IDs,
// and never panics.
func TestObjectIDDecoding(t *testing.T) {
	long := bytes.Repeat([]byte("a"), MaxServiceIDSize+1)
	cases := []struct {
		name    string
		set     func(b rpccp.Bootstrap) error
		want    []byte
		present bool
		err     bool
	}{
		{"none", func(rpccp.Bootstrap) error { return nil }, nil, false, false},
		{"text", func(b rpccp.Bootstrap) error { return setObjectID(b, []byte("abc")) }, []byte("abc"), true, false},
		{"data", func(b rpccp.Bootstrap) error {
			d, err := capnp.NewData(b.Segment(), []byte{1, 2, 3})
			if err != nil {
				return err
			}
			return b.SetDeprecatedObjectId(d.ToPtr())
		}, []byte{1, 2, 3}, true, false},
		{"struct", func(b rpccp.Bootstrap) error {
			s, err := capnp.NewStruct(b.Segment(), capnp.ObjectSize{DataSize: 8})
			if err != nil {
				return err
			}
			return b.SetDeprecatedObjectId(s.ToPtr())
		}, nil, true, true},
		{"too long", func(b rpccp.Bootstrap) error { return setObjectID(b, long) }, nil, true, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			msg, m, err := newMessage()
			if err != nil {
				t.Fatal(err)
			}
			defer msg.Release()
			b, err := m.NewBootstrap()
			if err != nil {
				t.Fatal(err)
			}
			if err := tc.set(b); err != nil {
				t.Fatal(err)
			}
			id, present, err := objectID(b)
			if present != tc.present || (err != nil) != tc.err || !bytes.Equal(id, tc.want) {
				t.Fatalf("objectID = %q, %v, %v; want %q, %v, error %v", id, present, err, tc.want, tc.present, tc.err)
			}
		})
	}
}

// A Bootstrap whose object ID is not Text or Data is answered with an
// exception, not a crash or an Abort.
func TestBadObjectIDAnsweredWithError(t *testing.T) {
	r := &mapRestorer{objs: map[string]*testimpl.Object{}}
	ar, bw := io.Pipe()
	br, aw := io.Pipe()
	server := NewConn(&rwPipe{PipeReader: br, PipeWriter: bw}, &Options{Restorer: r})
	peer := &rwPipe{PipeReader: ar, PipeWriter: aw}
	defer func() { peer.Close(); server.Close() }()

	msg, m, err := newMessage()
	if err != nil {
		t.Fatal(err)
	}
	b, err := m.NewBootstrap()
	if err != nil {
		t.Fatal(err)
	}
	b.SetQuestionId(7)
	st, err := capnp.NewStruct(b.Segment(), capnp.ObjectSize{DataSize: 8})
	if err == nil {
		err = b.SetDeprecatedObjectId(st.ToPtr())
	}
	if err == nil {
		err = capnp.NewEncoder(peer).Encode(msg)
	}
	if err != nil {
		t.Fatal(err)
	}
	reply, err := capnp.NewDecoder(peer).Decode()
	if err != nil {
		t.Fatal(err)
	}
	rm, err := rpccp.ReadRootMessage(reply)
	if err != nil || rm.Which() != rpccp.Message_Which_return {
		t.Fatalf("reply %v (err %v); want a Return", rm.Which(), err)
	}
	ret, _ := rm.Return()
	if ret.AnswerId() != 7 || ret.Which() != rpccp.Return_Which_exception {
		t.Fatalf("Return for %d is %v; want an exception for 7", ret.AnswerId(), ret.Which())
	}
	e, _ := ret.Exception()
	if reason, _ := e.Reason(); !strings.Contains(reason, "neither Text nor Data") {
		t.Fatalf("reason %q; want a bad object ID error", reason)
	}
	if len(r.asked) != 0 {
		t.Errorf("restorer was asked %q", r.asked)
	}
	select {
	case <-server.Done():
		t.Fatalf("connection ended: %v", server.Err())
	default:
	}
}

// A vat serves named services through a Restorer; a peer names one with
// Restore (the service ID is the secret part of a sturdy ref; see package
// core/sturdyref for URIs, ID generation and a ready-made Restorer).
func ExampleConn_Restore() {
	ctx := context.Background()
	services := map[string]capnp.Client{"\x8f\x1e…secret": capnp.Client(testimpl.New("alice", nil).Client())}
	defer services["\x8f\x1e…secret"].Release()
	restorer := RestorerFunc(func(ctx context.Context, id []byte) (capnp.Client, error) {
		c, ok := services[string(id)]
		if !ok {
			return capnp.Client{}, errors.New("unknown service")
		}
		return c.AddRef(), nil
	})
	clientSide, serverSide := io.Pipe()
	serverIn, clientOut := io.Pipe()
	server := NewConn(&rwPipe{PipeReader: serverIn, PipeWriter: serverSide}, &Options{Restorer: restorer})
	defer server.Close()
	client := NewConn(&rwPipe{PipeReader: clientSide, PipeWriter: clientOut}, nil)
	defer client.Close()

	alice := testcapnp.Test(client.Restore(ctx, []byte("\x8f\x1e…secret")))
	defer alice.Release()
	f, release := alice.Name(ctx, nil)
	defer release()
	res, err := f.Struct()
	if err != nil {
		fmt.Println(err)
		return
	}
	name, _ := res.Name()
	fmt.Println(name)
	// Output: alice
}

// Restores running at once count against MaxAnswers: a peer cannot start
// unbounded restorer goroutines.
func TestRestoreBoundedByMaxAnswers(t *testing.T) {
	ctx := context.Background()
	release := make(chan struct{})
	var running sync.WaitGroup
	running.Add(2)
	r := RestorerFunc(func(ctx context.Context, _ []byte) (capnp.Client, error) {
		running.Done()
		select {
		case <-release:
		case <-ctx.Done():
		}
		return capnp.Client{}, errTestUnknown
	})
	client, _ := pipeConns(t, &Options{Restorer: r, Limits: Limits{MaxAnswers: 2}}, nil)
	a := client.Restore(ctx, []byte("a"))
	b := client.Restore(ctx, []byte("b"))
	defer a.Release()
	defer b.Release()
	running.Wait()
	c := testcapnp.Test(client.Restore(ctx, []byte("c")))
	defer c.Release()
	_, err := nameOf(t, ctx, c)
	if err == nil || !strings.Contains(err.Error(), "too many calls in progress") {
		t.Fatalf("third restore: %v; want overloaded", err)
	}
	close(release)
	for _, p := range []capnp.Client{a, b} {
		// Settled first: a call pipelined on a restore still running
		// would count against MaxAnswers too and could be refused.
		if err := p.Resolve(ctx); err != nil {
			t.Fatal(err)
		}
		if _, err := nameOf(t, ctx, testcapnp.Test(p)); err == nil || !strings.Contains(err.Error(), errTestUnknown.Error()) {
			t.Fatalf("first restores: %v", err)
		}
	}
}
