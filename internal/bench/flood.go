package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"

	"github.com/captp-go/captp/internal/testcapnp"
)

// Flood is what a server did under a flood of calls from a peer that
// never reads a reply. The server runs in its own process, so its
// resident memory is its own.
type Flood struct {
	Impl Impl `json:"impl"`
	// Finish: every Call is followed by its Finish at once (the flooder
	// lets go of every answer); otherwise calls are never finished, as
	// by a client that waits for Returns it never reads.
	Finish bool `json:"finish"`
	Calls  int  `json:"calls"`
	// Written is how many calls the flooder got into the socket before
	// the server stopped reading, or all of them.
	Written int `json:"written"`
	// Stalled: the flooder's writes made no progress for
	// Counts.FloodQuiet, i.e. the server stopped reading.
	Stalled bool `json:"stalled"`
	// BaseRSS and PeakRSS are the server's resident memory before the
	// flood and at its highest (bytes).
	BaseRSS int64 `json:"base_rss"`
	PeakRSS int64 `json:"peak_rss"`
	// HeapInuse is a Go server's heap in use when the writing phase
	// ended (bytes); zero for C++.
	HeapInuse int64 `json:"heap_inuse,omitempty"`
	// Killed: the server crossed Config.FloodRSSCap and was killed.
	Killed bool `json:"killed,omitempty"`
	// Answered counts distinct calls with a Return (the bootstrap not
	// included); Kinds counts Returns by kind.
	Answered int            `json:"answered"`
	Kinds    map[string]int `json:"kinds"`
	Abort    string         `json:"abort,omitempty"`
	// End is how reading the replies ended ("all answered", an error).
	End     string  `json:"end"`
	Seconds float64 `json:"seconds"`
}

// AllAnswered says whether every call got a Return and the server did
// not abort.
func (f *Flood) AllAnswered() bool { return f.Abort == "" && !f.Killed && f.Answered == f.Calls }

// floodFrames builds the flood: Bootstrap, then calls echo(16 bytes) on
// the bootstrap promise, each followed by its Finish when finish. ends[i]
// is the offset after call i+1's frames.
func floodFrames(calls int, finish bool) (buf []byte, ends []int, err error) {
	frame := func(build func(rpccp.Message) error) error {
		msg, seg, err := capnp.NewMessage(capnp.SingleSegment(nil))
		if err != nil {
			return err
		}
		m, err := rpccp.NewRootMessage(seg)
		if err != nil {
			return err
		}
		if err := build(m); err != nil {
			return err
		}
		b, err := msg.Marshal()
		if err != nil {
			return err
		}
		buf = append(buf, b...)
		return nil
	}
	if err := frame(func(m rpccp.Message) error {
		b, err := m.NewBootstrap()
		b.SetQuestionId(0)
		return err
	}); err != nil {
		return nil, nil, err
	}
	data := payload(16)
	ends = make([]int, calls)
	for i := 1; i <= calls; i++ {
		err := frame(func(m rpccp.Message) error {
			call, err := m.NewCall()
			if err != nil {
				return err
			}
			call.SetQuestionId(uint32(i))
			call.SetInterfaceId(testcapnp.Test_TypeID)
			call.SetMethodId(0) // echo
			tgt, err := call.NewTarget()
			if err != nil {
				return err
			}
			pa, err := tgt.NewPromisedAnswer()
			if err != nil {
				return err
			}
			pa.SetQuestionId(0)
			params, err := call.NewParams()
			if err != nil {
				return err
			}
			p, err := testcapnp.NewTest_echo_Params(params.Segment())
			if err != nil {
				return err
			}
			if err := p.SetData(data); err != nil {
				return err
			}
			return params.SetContent(p.ToPtr())
		})
		if err == nil && finish {
			err = frame(func(m rpccp.Message) error {
				f, err := m.NewFinish()
				f.SetQuestionId(uint32(i))
				f.SetReleaseResultCaps(true)
				return err
			})
		}
		if err != nil {
			return nil, nil, err
		}
		ends[i-1] = len(buf)
	}
	return buf, ends, nil
}

// tally counts what the flooder reads.
type tally struct {
	mu       sync.Mutex
	seen     []bool
	answered int
	returns  atomic.Int64
	kinds    map[string]int
	abort    string
}

func (t *tally) add(m rpccp.Message) {
	t.mu.Lock()
	defer t.mu.Unlock()
	switch m.Which() {
	case rpccp.Message_Which_return:
		t.returns.Add(1)
		ret, err := m.Return()
		if err != nil {
			t.kinds["undecodable"]++
			return
		}
		id := int(ret.AnswerId())
		if id == 0 {
			return // the bootstrap
		}
		kind := ret.Which().String()
		if ret.Which() == rpccp.Return_Which_exception {
			if e, err := ret.Exception(); err == nil {
				kind += " " + e.Type().String()
			}
		}
		t.kinds[kind]++
		if id < len(t.seen) && !t.seen[id] {
			t.seen[id] = true
			t.answered++
		}
	case rpccp.Message_Which_abort:
		reason := "(no reason)"
		if e, err := m.Abort(); err == nil {
			if r, _ := e.Reason(); r != "" {
				reason = r
			}
		}
		t.abort = reason
	default:
		t.kinds["other: "+m.Which().String()]++
	}
}

// runFlood floods a fresh server of im (in its own process) over a Unix
// socket and reports what happened.
func runFlood(ctx context.Context, cfg *Config, cpp *cppProgram, im Impl, finish bool) (*Flood, error) {
	c := cfg.Counts
	rssCap := cfg.FloodRSSCap
	if rssCap == 0 {
		rssCap = 1 << 30
	}
	buf, ends, err := floodFrames(c.Flood, finish)
	if err != nil {
		return nil, err
	}
	var (
		srv  *child
		sock string
	)
	if im == Cpp {
		srv, sock, err = startCppServer(ctx, cpp)
	} else {
		srv, sock, err = startGoServer(ctx, cfg, im)
	}
	if err != nil {
		return nil, err
	}
	defer srv.stop()
	conn, err := net.Dial("unix", sock)
	if err != nil {
		return nil, err
	}
	defer conn.Close()

	f := &Flood{Impl: im, Finish: finish, Calls: c.Flood, Kinds: map[string]int{}}
	start := time.Now()
	pid := srv.pid()
	f.BaseRSS, _ = procStatus(pid, "VmRSS")
	f.PeakRSS = f.BaseRSS
	sample := func() {
		if rss, ok := procStatus(pid, "VmRSS"); ok {
			f.PeakRSS = max(f.PeakRSS, rss)
			if rss > rssCap && !f.Killed {
				f.Killed = true
				srv.kill()
			}
		}
	}

	// Write in batches, counting the calls that are fully written.
	var written atomic.Int64
	werr := make(chan error, 1)
	go func() {
		const batch = 256
		off := 0
		for i := 0; i < len(ends); i += batch {
			j := min(i+batch, len(ends))
			if _, err := conn.Write(buf[off:ends[j-1]]); err != nil {
				werr <- err
				return
			}
			off = ends[j-1]
			written.Store(int64(j))
		}
		werr <- nil
	}()

	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	deadline := time.Now().Add(c.FloodLimit)
	last, since := int64(-1), time.Now()
	writerDone := false
writing:
	for {
		select {
		case <-werr:
			writerDone = true
			break writing
		case <-srv.exited:
			break writing
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-tick.C:
		}
		sample()
		if f.Killed {
			break
		}
		if n := written.Load(); n != last {
			last, since = n, time.Now()
		} else if time.Since(since) >= c.FloodQuiet {
			f.Stalled = true
			break
		}
		if time.Now().After(deadline) {
			f.Stalled = true
			break
		}
	}
	f.Written = int(written.Load())
	cfg.progress("flood/%s: %d calls written (stalled %v, killed %v); reading the replies", im, f.Written, f.Stalled, f.Killed)
	if im != Cpp && !f.Killed {
		if kv, err := srv.command(ctx, "stats", 10*time.Second); err == nil {
			f.HeapInuse = kv["heap_inuse"]
		}
	}

	// Now read everything the server sends, while it keeps running.
	t := &tally{seen: make([]bool, c.Flood+1), kinds: f.Kinds}
	rdone := make(chan error, 1)
	if !f.Killed {
		conn.SetReadDeadline(time.Now().Add(c.FloodLimit))
		go func() {
			dec := capnp.NewDecoder(bufio.NewReaderSize(conn, 256<<10))
			for {
				msg, err := dec.Decode()
				if err != nil {
					rdone <- err
					return
				}
				m, err := rpccp.ReadRootMessage(msg)
				if err != nil {
					rdone <- fmt.Errorf("undecodable message: %w", err)
					return
				}
				t.add(m)
				msg.Release()
				if t.returns.Load() == int64(c.Flood)+1 {
					rdone <- nil
					return
				}
			}
		}()
	reading:
		for {
			select {
			case err := <-rdone:
				switch {
				case err == nil:
					f.End = "all answered"
				case errors.Is(err, io.EOF):
					f.End = "connection closed by the server"
				default:
					f.End = err.Error()
				}
				break reading
			case <-ctx.Done():
				return nil, ctx.Err()
			case <-tick.C:
			}
			sample()
			if f.Killed {
				f.End = "killed"
				conn.Close()
				<-rdone
				break
			}
		}
	} else {
		f.End = "killed"
	}
	if hwm, ok := procStatus(pid, "VmHWM"); ok && !f.Killed {
		f.PeakRSS = max(f.PeakRSS, hwm)
	}
	conn.Close()
	if !writerDone {
		<-werr
	}
	t.mu.Lock()
	f.Answered, f.Abort = t.answered, t.abort
	t.mu.Unlock()
	f.Seconds = time.Since(start).Seconds()
	cfg.progress("flood/%s: %d answered; %s", im, f.Answered, f.End)
	return f, nil
}
