//go:build unix

package core_test

import (
	"context"
	"testing"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
	"github.com/captp-go/captp/internal/testnative"
	"github.com/captp-go/captp/internal/testsock"
)

// The native call path (core.Call, core.Handler) next to the generated
// one (echo_bench_test.go), over a Unix socket pair; allocs/op counts
// both sides. captp bench -transport unix-2proc splits them.

func nativePair(b testing.TB) (testnative.Test, func()) {
	ca, cb := testsock.Pair(b)
	root, _ := testnative.New("bench", nil)
	server := core.NewConn(cb, &core.Options{BootstrapClient: root})
	client := core.NewConn(ca, nil)
	boot := testnative.Test{Client: client.Bootstrap(context.Background())}
	return boot, func() {
		boot.Release()
		client.Close()
		server.Close()
		<-client.Done()
		<-server.Done()
	}
}

func BenchmarkNativeEchoSequential(b *testing.B) {
	boot, done := nativePair(b)
	defer done()
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		p := boot.Echo(ctx, payload16)
		if _, err := p.Data(ctx); err != nil {
			b.Fatal(err)
		}
		p.Release()
	}
}

func BenchmarkNativeEchoInFlight64(b *testing.B) {
	boot, done := nativePair(b)
	defer done()
	ctx := context.Background()
	ring := make([]testnative.EchoCall, 0, 64)
	b.ReportAllocs()
	for b.Loop() {
		if len(ring) == cap(ring) {
			if _, err := ring[0].Data(ctx); err != nil {
				b.Fatal(err)
			}
			ring[0].Release()
			ring = append(ring[:0], ring[1:]...)
		}
		ring = append(ring, boot.Echo(ctx, payload16))
	}
	for _, p := range ring {
		p.Data(ctx)
		p.Release()
	}
}

func BenchmarkNativeEcho1MiB(b *testing.B) {
	boot, done := nativePair(b)
	defer done()
	data := make([]byte, 1<<20)
	ctx := context.Background()
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		p := boot.Echo(ctx, data)
		if _, err := p.Data(ctx); err != nil {
			b.Fatal(err)
		}
		p.Release()
	}
}

func BenchmarkNativePipelined2Hop(b *testing.B) {
	boot, done := nativePair(b)
	defer done()
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if err := nativeTwoHop(ctx, boot); err != nil {
			b.Fatal(err)
		}
	}
}

// nativeTwoHop makes the 2-hop pipelined call: child, then echo on the
// promised child, sent together.
func nativeTwoHop(ctx context.Context, boot testnative.Test) error {
	c := boot.Child(ctx, "x")
	defer c.Release()
	child := c.Child()
	defer child.Release()
	p := child.Echo(ctx, payload16)
	defer p.Release()
	_, err := p.Data(ctx)
	return err
}

// BenchmarkEchoPipelined2Hop is the generated path's 2-hop, for
// comparison with BenchmarkNativePipelined2Hop.
func BenchmarkEchoPipelined2Hop(b *testing.B) {
	ca, cb := testsock.Pair(b)
	server := core.NewConn(cb, &core.Options{BootstrapClient: capnp.Client(testimpl.New("bench", nil).Client())})
	client := core.NewConn(ca, nil)
	boot := testcapnp.Test(client.Bootstrap(context.Background()))
	defer func() {
		boot.Release()
		client.Close()
		server.Close()
	}()
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		c, rel := boot.Child(ctx, func(p testcapnp.Test_child_Params) error { return p.SetName("x") })
		f, rel2 := c.Child().Echo(ctx, func(p testcapnp.Test_echo_Params) error { return p.SetData(payload16) })
		if _, err := f.Struct(); err != nil {
			b.Fatal(err)
		}
		rel2()
		rel()
	}
}
