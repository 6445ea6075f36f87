//go:build unix

package core_test

import (
	"context"
	"testing"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
	"github.com/captp-go/captp/internal/testsock"
)

// Go benchmarks of the call path over a Unix socket pair, both ends ours,
// for quick A/B comparisons with benchstat (`make bench` is the full
// comparison against go-capnp, C++ and the raw floor). allocs/op counts
// both sides.

func echoPair(b *testing.B) (testcapnp.Test, func()) {
	ca, cb := testsock.Pair(b)
	server := core.NewConn(cb, &core.Options{BootstrapClient: capnp.Client(testimpl.New("bench", nil).Client())})
	client := core.NewConn(ca, nil)
	boot := testcapnp.Test(client.Bootstrap(context.Background()))
	return boot, func() {
		boot.Release()
		client.Close()
		server.Close()
		<-client.Done()
		<-server.Done()
	}
}

var payload16 = []byte("0123456789abcdef")

func echo(ctx context.Context, t testcapnp.Test, data []byte) (testcapnp.Test_echo_Results_Future, capnp.ReleaseFunc) {
	return t.Echo(ctx, func(p testcapnp.Test_echo_Params) error { return p.SetData(data) })
}

func BenchmarkEchoSequential(b *testing.B) {
	boot, done := echoPair(b)
	defer done()
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		f, rel := echo(ctx, boot, payload16)
		if _, err := f.Struct(); err != nil {
			b.Fatal(err)
		}
		rel()
	}
}

func BenchmarkEchoInFlight64(b *testing.B) {
	boot, done := echoPair(b)
	defer done()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	type pending struct {
		f   testcapnp.Test_echo_Results_Future
		rel capnp.ReleaseFunc
	}
	ring := make([]pending, 0, 64)
	b.ReportAllocs()
	for b.Loop() {
		if len(ring) == cap(ring) {
			if _, err := ring[0].f.Struct(); err != nil {
				b.Fatal(err)
			}
			ring[0].rel()
			ring = append(ring[:0], ring[1:]...)
		}
		f, rel := echo(ctx, boot, payload16)
		ring = append(ring, pending{f, rel})
	}
	for _, p := range ring {
		p.f.Struct()
		p.rel()
	}
}

func BenchmarkEcho1MiB(b *testing.B) {
	boot, done := echoPair(b)
	defer done()
	data := make([]byte, 1<<20)
	ctx := context.Background()
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		f, rel := echo(ctx, boot, data)
		if _, err := f.Struct(); err != nil {
			b.Fatal(err)
		}
		rel()
	}
}
