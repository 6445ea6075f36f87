package core_test

import (
	"bytes"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testnative"
)

// writeLog is a transport that records the size of each write. It is a
// core.TryWriter whose TryWrite takes at most tryMax bytes (all if 0),
// or fails with tryErr.
type writeLog struct {
	net.Conn
	tryMax int
	tryErr error // TryWrite fails with it

	mu     sync.Mutex
	sizes  []int
	shorts int // TryWrites that took less than offered
}

func (w *writeLog) Write(p []byte) (int, error) {
	w.mu.Lock()
	w.sizes = append(w.sizes, len(p))
	w.mu.Unlock()
	return w.Conn.Write(p)
}

func (w *writeLog) TryWrite(p []byte) (int, error) {
	if w.tryErr != nil {
		return 0, w.tryErr
	}
	if w.tryMax > 0 && len(p) > w.tryMax {
		w.mu.Lock()
		w.shorts++
		w.mu.Unlock()
		p = p[:w.tryMax]
	}
	return w.Write(p) // a socket pair's buffer takes a few KiB at once
}

func (w *writeLog) take() []int {
	w.mu.Lock()
	defer w.mu.Unlock()
	s := w.sizes
	w.sizes = nil
	return s
}

// Calls that arrive together are answered in one write, unless the
// transport can write without waiting (core.TryWriter): then the Returns
// leave about 1 KiB at a time (core's pipelineWriteBytes) while the rest
// are served, so that the peer can start on them, and what TryWrite does
// not take follows, in order. A writer goroutine still finishing an
// earlier write (the bootstrap's Return) can take the batch's Returns in
// its next write instead, so each case gets a few attempts.
func TestReturnsOfABatchLeaveEarlyWithTryWriter(t *testing.T) {
	const (
		calls    = 40 // their frames fit the server's 8 KiB read buffer: one read
		attempts = 10
	)
	for _, tc := range []struct {
		name   string
		try    bool
		tryMax int
	}{
		{"no TryWriter", false, 0},
		{"TryWriter", true, 0},
		{"TryWriter taking 100 bytes at a time", true, 100},
	} {
		a, b := socketPair(t)
		log := &writeLog{Conn: b, tryMax: tc.tryMax}
		var transport net.Conn = log
		if !tc.try {
			transport = struct{ net.Conn }{log} // net.Conn's methods only: no TryWrite
		}
		root, _ := testnative.New("root", new(atomic.Int64))
		server := core.NewConn(transport, &core.Options{BootstrapClient: root})
		p := &rawPeer{t: t, c: a, enc: capnp.NewEncoder(a), dec: capnp.NewDecoder(a)}
		export := bootstrapExport(t, p)

		var got [][]int
		for attempt := range attempts {
			log.take()
			// All the calls in one Write, so that the server reads them
			// at once.
			first := uint32(attempt*calls) + 1
			if _, err := a.Write(echoBatch(p, export, first, calls)); err != nil {
				t.Fatal(err)
			}
			for qid := first; qid < first+calls; qid++ {
				m, err := p.recv()
				if err != nil || m.Which() != rpccp.Message_Which_return {
					t.Fatalf("%s: Return for question %d: %v, %v", tc.name, qid, m.Which(), err)
				}
				ret, _ := m.Return()
				if ret.AnswerId() != qid || ret.Which() != rpccp.Return_Which_results {
					t.Fatalf("%s: got a Return (%v) for question %d, want the results of %d", tc.name, ret.Which(), ret.AnswerId(), qid)
				}
			}
			sizes := log.take()
			got = append(got, sizes)
			total := 0
			for _, n := range sizes {
				total += n
			}
			early := len(sizes) >= max(total/(1<<10)-1, 2) // about one write per KiB
			switch {
			case tc.tryMax > 0 && log.shorts > 0:
				// In order and whole (checked above) with what TryWrite
				// did not take sent after it is the point.
			case tc.tryMax == 0 && tc.try == early:
			case attempt < attempts-1:
				continue
			case tc.tryMax > 0:
				t.Errorf("%s: no TryWrite came up short in %d attempts (writes %v)", tc.name, attempts, got)
			default:
				t.Errorf("%s: %d calls that arrived together were answered in these writes (bytes), attempt by attempt: %v; want about one write per KiB with a TryWriter, else one", tc.name, calls, got)
			}
			break
		}
		a.Close()
		server.Close()
		<-server.Done()
	}
}

// A TryWrite that fails ends the connection like a failed Write: with
// the error, and with nothing left running (TestMain checks goroutines).
// A writer goroutine still finishing an earlier write can take a batch's
// Returns first (then no TryWrite happens), so batches are sent until
// one fails.
func TestTryWriteErrorEndsConnection(t *testing.T) {
	a, b := socketPair(t)
	defer a.Close()
	boom := errors.New("boom")
	root, _ := testnative.New("root", new(atomic.Int64))
	server := core.NewConn(&writeLog{Conn: b, tryErr: boom}, &core.Options{BootstrapClient: root})
	defer server.Close()
	p := &rawPeer{t: t, c: a, enc: capnp.NewEncoder(a), dec: capnp.NewDecoder(a)}
	export := bootstrapExport(t, p)
	const calls, attempts = 40, 10
	for attempt := range attempts {
		if _, err := a.Write(echoBatch(p, export, uint32(attempt*calls)+1, calls)); err != nil {
			t.Fatal(err)
		}
		select {
		case <-server.Done():
			if err := server.Err(); !errors.Is(err, boom) {
				t.Fatalf("connection ended with %v, want the TryWrite error %v", err, boom)
			}
			return
		case <-time.After(time.Second):
		}
	}
	t.Fatalf("the connection outlived %d batches of calls whose Returns the transport's TryWrite failed", attempts)
}

// bootstrapExport has p bootstrap its peer and returns the export id of
// the bootstrap capability.
func bootstrapExport(t *testing.T, p *rawPeer) uint32 {
	t.Helper()
	p.send(func(m rpccp.Message) error {
		bs, err := m.NewBootstrap()
		bs.SetQuestionId(0)
		return err
	})
	m, err := p.recv()
	if err != nil || m.Which() != rpccp.Message_Which_return {
		t.Fatalf("bootstrap: %v, %v", m.Which(), err)
	}
	ret, _ := m.Return()
	res, _ := ret.Results()
	caps, _ := res.CapTable()
	return caps.At(0).SenderHosted()
}

// echoBatch returns the frames of n echo calls with 16 bytes of data to
// export, with question ids from first, for a single Write.
func echoBatch(p *rawPeer, export, first uint32, n int) []byte {
	var batch bytes.Buffer
	enc := p.enc
	p.enc = capnp.NewEncoder(&batch)
	defer func() { p.enc = enc }()
	for qid := first; qid < first+uint32(n); qid++ {
		p.call(qid, export, -1, 0, func(pl rpccp.Payload) error {
			params, err := testcapnp.NewTest_echo_Params(pl.Segment())
			if err == nil {
				err = params.SetData(make([]byte, 16))
			}
			if err == nil {
				err = pl.SetContent(params.ToPtr())
			}
			return err
		})
	}
	return batch.Bytes()
}
