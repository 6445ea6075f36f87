package netstack

import (
	"bytes"
	"context"
	"crypto/sha256"
	"hash"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	"go.uber.org/goleak"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/bytestream"
)

// TestByteStreamTransfer sends 256 MiB (32 MiB with -short or -race)
// from one vat to another through a ByteStream capability over the virtual
// network, and compares SHA-256 checksums taken on both sides. It also
// checks that the network dropped nothing and TCP retransmitted nothing:
// the switch applies backpressure instead of dropping.
func TestByteStreamTransfer(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	size := 256 << 20
	if testing.Short() || raceEnabled {
		size = 32 << 20
	}
	ctx := testContext(t)
	network := NewNetwork(&NetworkOptions{Logger: testLogger(t)})
	defer network.Close()
	sender, err := network.NewStack(Config{Name: "sender"})
	if err != nil {
		t.Fatal(err)
	}
	receiver, err := network.NewStack(Config{Name: "receiver"})
	if err != nil {
		t.Fatal(err)
	}

	// The receiver's bootstrap capability hashes what it is sent.
	recv := &hashWriter{h: sha256.New()}
	ended := make(chan struct{})
	lis, err := receiver.Listen("*:4000")
	if err != nil {
		t.Fatal(err)
	}
	serveCtx, stopServe := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() {
		bs := bytestream.NewServer(recv, func(context.Context) error { close(ended); return nil })
		served <- Serve(serveCtx, lis, &core.Options{BootstrapClient: capnp.Client(bs)})
	}()

	conn, err := sender.Dial(ctx, receiver.Addr().String()+":4000", nil)
	if err != nil {
		t.Fatal(err)
	}
	bs := bytestream.ByteStream(conn.Bootstrap(ctx))
	w := bytestream.NewWriter(ctx, bs, nil)
	bs.Release()

	sent := sha256.New()
	rng := rand.NewChaCha8([32]byte{'c', 'a', 'p', 't', 'p'})
	block := make([]byte, 1<<20)
	start := time.Now()
	for n := 0; n < size; n += len(block) {
		rng.Read(block)
		sent.Write(block)
		if _, err := w.Write(block); err != nil {
			t.Fatalf("after %d bytes: %v", n, err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatalf("closing the stream: %v", err)
	}
	elapsed := time.Since(start)
	select {
	case <-ended:
	case <-ctx.Done():
		t.Fatal("the receiver never saw the end of the stream")
	}
	t.Logf("%d MiB in %v: %.0f MiB/s (SHA-256 and data generation included)",
		size>>20, elapsed.Round(time.Millisecond), float64(size)/(1<<20)/elapsed.Seconds())

	if got, n := recv.sum(); n != int64(size) || !bytes.Equal(got, sent.Sum(nil)) {
		t.Errorf("received %d bytes with SHA-256 %x; sent %d bytes with %x", n, got, size, sent.Sum(nil))
	}
	if n := network.Stats().Undeliverable; n != 0 {
		t.Errorf("network dropped %d frames during the transfer", n)
	}
	conn.Close()
	stopServe()
	<-served
	network.Close()

	// Every frame a stack sent reached the other: the switch dropped none
	// and neither stack dropped one for lack of buffer space. (TCP may
	// still count a spurious retransmission, from a timer, or from ACKs
	// that two goroutines sent in a different order.)
	st := network.Stats()
	sst, rst := sender.GVisor().Stats().NICs, receiver.GVisor().Stats().NICs
	t.Logf("network: %+v; sender sent %d and received %d packets, with %d TCP retransmits",
		st, sst.Tx.Packets.Value(), sst.Rx.Packets.Value(), sender.GVisor().Stats().TCP.Retransmits.Value())
	if sent, got := sst.Tx.Packets.Value(), rst.Rx.Packets.Value(); sent != got && st.Undeliverable == 0 {
		t.Errorf("sender sent %d packets, receiver got %d", sent, got)
	}
	if sent, got := rst.Tx.Packets.Value(), sst.Rx.Packets.Value(); sent != got && st.Undeliverable == 0 {
		t.Errorf("receiver sent %d packets, sender got %d", sent, got)
	}
	// A frame that reaches a NIC its stack is already disabling during
	// teardown is counted in DisabledRx instead of Rx.
	received := sst.Rx.Packets.Value() + rst.Rx.Packets.Value() + sst.DisabledRx.Packets.Value() + rst.DisabledRx.Packets.Value()
	if sent := sst.Tx.Packets.Value() + rst.Tx.Packets.Value(); sent != st.Frames || received != st.Frames-st.Undeliverable {
		t.Errorf("stacks sent %d and received %d packets (%d and %d while closing); the network switched %d frames and dropped %d",
			sent, received, sst.DisabledRx.Packets.Value(), rst.DisabledRx.Packets.Value(), st.Frames, st.Undeliverable)
	}
	for _, s := range []*Stack{sender, receiver} {
		if n := s.GVisor().Stats().NICs.TxPacketsDroppedNoBufferSpace.Value(); n != 0 {
			t.Errorf("%s: %d packets dropped for lack of buffer space", s.Name(), n)
		}
	}
}

// hashWriter hashes and counts what is written to it.
type hashWriter struct {
	mu sync.Mutex
	h  hash.Hash
	n  int64
}

func (w *hashWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.n += int64(len(p))
	return w.h.Write(p)
}

func (w *hashWriter) sum() ([]byte, int64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.h.Sum(nil), w.n
}
