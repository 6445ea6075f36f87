package main

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	"go.uber.org/goleak"

	"github.com/captp-go/captp/adapters/netcap"
	"github.com/captp-go/captp/adapters/unix"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// TestMain fails the run if a goroutine outlives the tests: the vat's
// serving through the host's network ends with its context.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// records is a slog.Handler that keeps each record's message and
// attributes, as the vat's console would show them.
type records struct {
	mu     sync.Mutex
	msgs   []map[string]string
	notify chan struct{}
}

func newRecords() *records { return &records{notify: make(chan struct{})} }

func (r *records) Enabled(context.Context, slog.Level) bool { return true }
func (r *records) WithAttrs([]slog.Attr) slog.Handler       { return r }
func (r *records) WithGroup(string) slog.Handler            { return r }
func (r *records) Handle(_ context.Context, rec slog.Record) error {
	m := map[string]string{"msg": rec.Message}
	rec.Attrs(func(a slog.Attr) bool {
		m[a.Key] = a.Value.String()
		return true
	})
	r.mu.Lock()
	r.msgs = append(r.msgs, m)
	close(r.notify)
	r.notify = make(chan struct{})
	r.mu.Unlock()
	return nil
}

// wait returns the attributes of the first record with message msg.
func (r *records) wait(t *testing.T, msg string) map[string]string {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		r.mu.Lock()
		for _, m := range r.msgs {
			if m["msg"] == msg {
				r.mu.Unlock()
				return m
			}
		}
		ch := r.notify
		r.mu.Unlock()
		select {
		case <-ch:
		case <-timeout:
			t.Fatalf("no log record %q; got %v", msg, r.msgs)
		}
	}
}

func (r *records) has(msg string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, m := range r.msgs {
		if m["msg"] == msg {
			return true
		}
	}
	return false
}

// hostVat runs useHostNetwork as the TamaGo vat does: the host offers a
// Network with policy p (nil: no bootstrap capability at all) as its side
// of a captp connection, and the vat bootstraps it. It returns when
// useHostNetwork has, with the vat's log records and the host's Server;
// the test's cleanup stops the vat and waits until it stopped serving.
func hostVat(t *testing.T, p *netcap.Policy) (*records, *netcap.Server) {
	t.Helper()
	var srv *netcap.Server
	hostOpts := &core.Options{}
	if p != nil {
		var n netcap.Network
		srv, n = netcap.NewServer(p, &netcap.KernelBackend{}, nil)
		hostOpts.BootstrapClient = capnp.Client(n)
	}
	a, b := net.Pipe()
	host := core.NewConn(b, hostOpts)
	obj := testimpl.New("guest", nil)
	vat := core.NewConn(a, &core.Options{BootstrapClient: capnp.Client(obj.Client())})
	ctx, cancel := context.WithCancel(context.Background())
	rec := newRecords()
	useHostNetwork(ctx, slog.New(rec), netcap.Network(vat.Bootstrap(ctx)), capnp.Client(obj.Client()))
	t.Cleanup(func() {
		cancel()
		if rec.has(msgServing) {
			rec.wait(t, "vat: stopped serving through the host's network")
		}
		vat.Close()
		host.Close()
		if srv != nil {
			srv.Close()
		}
	})
	return rec, srv
}

func policy(t *testing.T, connect, listen string) *netcap.Policy {
	t.Helper()
	p := &netcap.Policy{}
	if connect != "" {
		if err := p.Connect.Set(connect); err != nil {
			t.Fatal(err)
		}
	}
	if listen != "" {
		if err := p.Listen.Set(listen); err != nil {
			t.Fatal(err)
		}
	}
	return p
}

func TestHostNetworkDeniesEverything(t *testing.T) {
	rec, srv := hostVat(t, &netcap.Policy{})
	m := rec.wait(t, msgListenFailed)
	if m["addr"] != hostListenAddr || m["kind"] != netcap.KindDenied.String() {
		t.Errorf("listen failure logged as %v, want %s denied", m, hostListenAddr)
	}
	if rec.has(msgServing) || rec.has(msgLoopbackError) || rec.has(msgLoopbackOK) {
		t.Errorf("the vat went on after the denied listen: %v", rec.msgs)
	}
	if st := srv.Stats(); st.Denied != 1 {
		t.Errorf("host stats %+v, want 1 denial", st)
	}
}

// A peer that offers no Network (another host, or none) is harmless:
// the failure is logged.
func TestHostNetworkAbsent(t *testing.T) {
	rec, _ := hostVat(t, nil)
	if m := rec.wait(t, msgListenFailed); m["kind"] == netcap.KindDenied.String() {
		t.Errorf("listen without a Network logged as %v, want a kind other than denied", m)
	}
}

// Listening allowed: the host's processes reach the vat on the host's
// loopback; the vat's own connect is denied without a connect rule.
func TestHostNetworkListen(t *testing.T) {
	rec, srv := hostVat(t, policy(t, "", "tcp:127.0.0.1:0"))
	addr := rec.wait(t, msgServing)["addr"]
	if m := rec.wait(t, msgLoopbackError); m["addr"] != addr || m["kind"] != netcap.KindDenied.String() {
		t.Errorf("loopback check logged as %v, want %s denied", m, addr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := unix.Dial(ctx, addr, nil)
	if err != nil {
		t.Fatalf("dial the vat at %s: %v", addr, err)
	}
	defer conn.Close()
	boot := testcapnp.Test(conn.Bootstrap(ctx))
	defer boot.Release()
	f, release := boot.Echo(ctx, func(p testcapnp.Test_echo_Params) error { return p.SetData([]byte("hi")) })
	defer release()
	r, err := f.Struct()
	if err != nil {
		t.Fatalf("echo: %v", err)
	}
	if d, _ := r.Data(); string(d) != "hi" {
		t.Errorf("echo = %q", d)
	}
	if st := srv.Stats(); st.Listeners != 1 || st.Streams != 1 || st.Denied != 1 {
		t.Errorf("host stats %+v, want 1 listener, 1 stream, 1 denial", st)
	}
}

func TestHostNetworkLoopback(t *testing.T) {
	rec, _ := hostVat(t, policy(t, "tcp:127.0.0.1:*", "tcp:127.0.0.1:0"))
	addr := rec.wait(t, msgServing)["addr"]
	if m := rec.wait(t, msgLoopbackOK); m["addr"] != addr || m["echo"] != "loopback" {
		t.Errorf("loopback check logged as %v, want %s and echo loopback", m, addr)
	}
}

func TestKindOf(t *testing.T) {
	if k := kindOf(&netcap.Error{Kind: netcap.KindLimit}); k != "limit" {
		t.Errorf("kindOf(limit) = %q", k)
	}
	if k := kindOf(errors.New("x")); k != "other" {
		t.Errorf("kindOf(plain error) = %q", k)
	}
}
