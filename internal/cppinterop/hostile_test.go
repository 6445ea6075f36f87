package cppinterop

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"

	"github.com/captp-go/captp/adapters/unix"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testimpl"
)

// Outcome classes of hostile input.
const (
	classAbort    = "Abort, then close"
	classClose    = "close, no Abort"
	classOpen     = "stays open"
	classUnimpl   = "Unimplemented, stays open"
	classReplied  = "replies, stays open"
	observeWindow = time.Second // how long "stays open" is watched
)

// hostileTarget is a server under test: the C++ reference or ours.
type hostileTarget struct {
	name string
	addr string
	// mem samples the server's memory: for C++ VmRSS and VmSize of the
	// process; for ours, bytes allocated so far and live heap (the Go
	// server runs in this test process).
	mem func(t *testing.T) memSample
}

type memSample struct {
	rss, vsize       int64 // C++: kB from /proc/PID/status
	allocated, inuse int64 // ours: runtime.MemStats TotalAlloc, HeapAlloc after GC
}

func procMem(t *testing.T, pid int) memSample {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatalf("reading the C++ server's memory: %v", err)
	}
	var m memSample
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		switch k {
		case "VmRSS":
			m.rss = n * 1024
		case "VmSize":
			m.vsize = n * 1024
		}
	}
	return m
}

func goMem(*testing.T) memSample {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return memSample{allocated: int64(ms.TotalAlloc), inuse: int64(ms.HeapAlloc)}
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

// startGoHostile serves a testimpl object with unix.Serve on a Unix
// socket, with options.
func startGoHostile(t *testing.T, options ...unix.Option) string {
	t.Helper()
	lis, err := unix.Listen(listenAddr(t, "unix"))
	if err != nil {
		t.Fatal(err)
	}
	addr := unix.FormatAddr(lis.Addr())
	live := new(testimpl.Live)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	opts := &core.Options{
		BootstrapClient: capnp.Client(testimpl.New("server", live).Client()),
		Logger:          testLogger(t),
	}
	go func() { done <- unix.Serve(ctx, lis, opts, options...) }()
	t.Cleanup(func() {
		cancel()
		<-done
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := live.WaitZero(ctx); err != nil {
			t.Errorf("Go server: %d Test objects live after Serve returned", live.Count())
		}
	})
	return addr
}

func dialRaw(t *testing.T, addr string) net.Conn {
	t.Helper()
	network, address, err := unix.ParseAddr(addr)
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial(network, address)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// outcome is what one hostile case did to one server.
type outcome struct {
	class  string
	detail string // Abort reason, timing or memory
}

// classify watches c for window after the input was sent.
func classify(c net.Conn, window time.Duration) (outcome, received) {
	start := time.Now()
	r := readAll(c, start.Add(window))
	took := time.Since(start).Round(10 * time.Millisecond)
	var o outcome
	switch {
	case r.gotAbort && isEOF(r.end):
		o = outcome{classAbort, fmt.Sprintf("%q", shorten(r.abort))}
	case isEOF(r.end):
		o = outcome{classClose, fmt.Sprintf("after %v", took)}
	case isTimeout(r.end):
		o.class = classOpen
		for _, w := range r.msgs {
			if w == rpccp.Message_Which_unimplemented {
				o.class = classUnimpl
			} else if o.class == classOpen {
				o.class = classReplied
			}
		}
	default:
		o = outcome{"error", r.end.Error()}
	}
	return o, r
}

func shorten(s string) string {
	if len(s) > 70 {
		return s[:67] + "..."
	}
	return s
}

// frameHeader is a stream frame header declaring segments of the given
// sizes in words.
func frameHeader(words ...uint32) []byte {
	var b []byte
	b = binary.LittleEndian.AppendUint32(b, uint32(len(words)-1))
	for _, w := range words {
		b = binary.LittleEndian.AppendUint32(b, w)
	}
	if len(words)%2 == 0 {
		b = append(b, 0, 0, 0, 0)
	}
	return b
}

func concat(bs ...[]byte) []byte {
	var out []byte
	for _, b := range bs {
		out = append(out, b...)
	}
	return out
}

// hostileCase is one kind of garbage or protocol violation.
type hostileCase struct {
	name  string
	input []byte
	// ours is the class our server must produce (with timeouts, if the
	// case runs against the server with WithFrameTimeout).
	ours, oursTimeout string
	// memory: measure how the server's memory changes while the
	// connection is held open after the input.
	memory bool
}

func hostileCases() []hostileCase {
	r := rand.New(rand.NewPCG(4, 2))
	random := make([]byte, 4096)
	for i := range random {
		random[i] = byte(r.Uint32())
	}
	manySegs := make([]uint32, 1000)
	const bigWords = 64<<20/8 - 1 // a 64 MiB frame, header included, within both sides' limits
	return []hostileCase{
		{name: "4 KiB of random bytes", input: random, ours: classAbort},
		{name: "frame with 1000 segments", input: frameHeader(manySegs...), ours: classAbort},
		{name: "frame header claiming 1 GiB", input: frameHeader(1 << 27), ours: classAbort},
		{name: "half a frame, then idle", input: bootstrapFrame(0)[:20], ours: classOpen, oursTimeout: classClose},
		{name: "64 MiB frame header + 1 MiB of body, then stall", input: concat(frameHeader(bigWords), make([]byte, 1<<20)),
			ours: classOpen, oursTimeout: classClose, memory: true},
		{name: "Call to an unknown import id", input: callFrame(0, 42, true, 0, []byte("x")), ours: classAbort},
		{name: "question id reused (two Bootstraps with id 0)", input: concat(bootstrapFrame(0), bootstrapFrame(0)), ours: classAbort},
		{name: "Return for an unknown question", input: rpcFrame(func(m rpccp.Message) error {
			ret, err := m.NewReturn()
			if err != nil {
				return err
			}
			ret.SetAnswerId(7)
			_, err = ret.NewResults()
			return err
		}), ours: classAbort},
		{name: "Release of an unknown export", input: rpcFrame(func(m rpccp.Message) error {
			rel, err := m.NewRelease()
			if err != nil {
				return err
			}
			rel.SetId(42)
			rel.SetReferenceCount(1)
			return nil
		}), ours: classAbort},
		{name: "Finish for an unknown question", input: finishFrame(42), ours: classAbort},
		{name: "Disembargo (senderLoopback) for an unknown target", input: rpcFrame(func(m rpccp.Message) error {
			d, err := m.NewDisembargo()
			if err != nil {
				return err
			}
			mt, err := d.NewTarget()
			if err != nil {
				return err
			}
			mt.SetImportedCap(42)
			d.Context().SetSenderLoopback(0)
			return nil
		}), ours: classAbort},
	}
}

// hostileResults collects the comparison for the table.
type hostileResults struct {
	mu   sync.Mutex
	rows map[string]map[string]outcome // case -> target -> outcome
}

func (h *hostileResults) add(c, target string, o outcome) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.rows == nil {
		h.rows = map[string]map[string]outcome{}
	}
	if h.rows[c] == nil {
		h.rows[c] = map[string]outcome{}
	}
	h.rows[c][target] = o
}

const (
	targetCpp     = "C++ 0.9.2"
	targetOurs    = "captp"
	targetTimeout = "captp, WithFrameTimeout(300ms)"
)

// TestHostileInput sends the same garbage and protocol violations to the
// C++ reference server and to ours (unix.Serve, with and without a frame
// timeout), classifies what each does, asserts our class, and logs a
// markdown table of both (go test -run TestHostileInput -v).
func TestHostileInput(t *testing.T) {
	requireCpp(t)
	ctx := testCtx(t, 60*time.Second)
	cpp := startCppServer(t, ctx, "unix")
	targets := []hostileTarget{
		{targetCpp, cpp.addr, func(t *testing.T) memSample { return procMem(t, cpp.pid) }},
		{targetOurs, startGoHostile(t), goMem},
		{targetTimeout, startGoHostile(t, unix.WithFrameTimeout(300*time.Millisecond)), goMem},
	}
	var res hostileResults
	cases := hostileCases()
	// Cases without memory measurement run in parallel; the others run
	// alone afterwards, so nothing else allocates meanwhile.
	t.Run("behaviour", func(t *testing.T) {
		for _, hc := range cases {
			if hc.memory {
				continue
			}
			t.Run(hc.name, func(t *testing.T) {
				t.Parallel()
				for _, tg := range targets {
					want := hc.ours
					if tg.name == targetTimeout {
						if hc.oursTimeout == "" {
							continue
						}
						want = hc.oursTimeout
					}
					t.Run(tg.name, func(t *testing.T) {
						t.Parallel()
						c := dialRaw(t, tg.addr)
						if _, err := c.Write(hc.input); err != nil {
							t.Logf("write: %v", err)
						}
						o, r := classify(c, observeWindow)
						t.Logf("%s: %s %s (messages %v, end %v)", tg.name, o.class, o.detail, r.msgs, r.end)
						res.add(hc.name, tg.name, o)
						if tg.name != targetCpp && o.class != want {
							t.Errorf("%s: %s (%s); want %s", tg.name, o.class, o.detail, want)
						}
					})
				}
			})
		}
	})
	for _, hc := range cases {
		if !hc.memory {
			continue
		}
		t.Run(hc.name, func(t *testing.T) {
			for _, tg := range targets {
				t.Run(tg.name, func(t *testing.T) {
					testHostileMemory(t, hc, tg, &res)
				})
			}
		})
	}
	t.Run("flood", func(t *testing.T) {
		for _, tg := range targets[:2] {
			t.Run(tg.name, func(t *testing.T) { testFlood(t, tg, &res) })
		}
	})
	t.Logf("hostile input, outcome per server:\n%s", res.table(cases))
}

// testHostileMemory sends the case's input on several connections and
// measures the server's memory while they are held open.
func testHostileMemory(t *testing.T, hc hostileCase, tg hostileTarget, res *hostileResults) {
	const conns = 4
	before := tg.mem(t)
	cs := make([]net.Conn, conns)
	for i := range cs {
		cs[i] = dialRaw(t, tg.addr)
		if _, err := cs[i].Write(hc.input); err != nil {
			t.Fatalf("write: %v", err)
		}
	}
	time.Sleep(300 * time.Millisecond) // let the server read what arrived
	after := tg.mem(t)
	var detail string
	if tg.name == targetCpp {
		detail = fmt.Sprintf("%d conns: VmSize +%s, VmRSS +%s", conns, mib(after.vsize-before.vsize), mib(after.rss-before.rss))
	} else {
		detail = fmt.Sprintf("%d conns: allocated %s in all", conns, mib(after.allocated-before.allocated))
		// Each connection allocates about three times the 1 MiB that
		// arrived (buffers of 256 KiB, 1 MiB, then 2 MiB as bytes come
		// in) plus its own state, never the 64 MiB declared.
		if got, limit := after.allocated-before.allocated, int64(conns)*(5<<20); got > limit {
			t.Errorf("ours allocated %s for %d connections that each sent 1 MiB of a 64 MiB frame; want at most %s", mib(got), conns, mib(limit))
		}
	}
	want := hc.ours
	if tg.name == targetTimeout {
		want = hc.oursTimeout
	}
	o, _ := classify(cs[0], observeWindow)
	for _, c := range cs[1:] {
		c.Close()
	}
	o.detail = detail
	t.Logf("%s: %s; %s", tg.name, o.class, detail)
	res.add(hc.name, tg.name, o)
	if tg.name != targetCpp && o.class != want {
		t.Errorf("%s: %s; want %s", tg.name, o.class, want)
	}
}

// floodCalls is how many calls the flood sends without reading a reply:
// CAPTP_FLOOD_CALLS, or 50,000 (the C++ server needs about 9 KiB per
// unread call, so 200,000 costs it 1.8 GB; the README's table was made
// with CAPTP_FLOOD_CALLS=200000).
var floodCalls = func() int {
	if n, err := strconv.Atoi(os.Getenv("CAPTP_FLOOD_CALLS")); err == nil && n > 0 {
		return n
	}
	return 50_000
}()

// testFlood sends a Bootstrap and floodCalls pipelined echo calls (no
// Finish) without reading anything, samples the server's memory while it
// reads, then looks at how the connection ends.
func testFlood(t *testing.T, tg hostileTarget, res *hostileResults) {
	var buf []byte
	buf = append(buf, bootstrapFrame(0)...)
	payload := []byte("0123456789abcdef")
	for i := uint32(1); i <= uint32(floodCalls); i++ {
		buf = append(buf, callFrame(i, 0, false, 0, payload)...)
	}
	c := dialRaw(t, tg.addr)
	before := tg.mem(t)
	start := time.Now()
	written := make(chan int, 1)
	go func() {
		// The write stops when the server closes the connection, stops
		// reading (backpressure; the deadline ends the write) or has read
		// everything.
		c.SetWriteDeadline(time.Now().Add(30 * time.Second))
		n, _ := c.Write(buf)
		written <- n
	}()
	// The peak while the server reads is what the flood costs it; ours
	// frees everything once it gives up.
	peak := before
	sample := func() {
		m := tg.mem(t)
		peak.rss = max(peak.rss, m.rss)
		peak.inuse = max(peak.inuse, m.inuse)
	}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	timeout := time.After(35 * time.Second)
	var n int
wait:
	for {
		select {
		case n = <-written:
			break wait
		case <-tick.C:
			sample()
		case <-timeout:
			t.Fatal("flood write did not return")
		}
	}
	took := time.Since(start).Round(10 * time.Millisecond)
	time.Sleep(200 * time.Millisecond)
	sample()
	var mem string
	if tg.name == targetCpp {
		mem = "VmRSS peak +" + mib(peak.rss-before.rss)
	} else {
		mem = "live heap peak +" + mib(peak.inuse-before.inuse)
	}
	end, r := classify(c, observeWindow)
	then := "stays open"
	switch end.class {
	case classAbort:
		then = "Abort (" + end.detail + "), close"
	case classClose:
		then = "close, no Abort"
	}
	o := outcome{
		class:  fmt.Sprintf("server read %s of %s in %v, then %s", mib(int64(n)), mib(int64(len(buf))), took, then),
		detail: mem,
	}
	t.Logf("%s: %s; %s (%d messages read afterwards, end %v)", tg.name, o.class, o.detail, len(r.msgs), r.end)
	res.add(fmt.Sprintf("flood: %d calls, replies never read", floodCalls), tg.name, o)
	// Ours keeps at most 4×MaxAnswers calls unfinished, then gives up.
	if limit := 4 * core.DefaultLimits.MaxAnswers; tg.name == targetOurs && floodCalls > limit {
		// (It may read all of them: after its Abort it discards input
		// for a while, so that the flooder gets to read the Abort.)
		if end.class != classAbort {
			t.Errorf("ours ended the flood without an Abort the flooder could read: %s", o.class)
		}
		// Up to limit answers are dropped at their Return
		// (noFinishNeeded: no capabilities in the results), their ids
		// remembered, before limit more are kept unfinished.
		if answered := len(r.msgs); answered > 2*limit+1 {
			t.Errorf("ours answered %d calls; it keeps at most %d unfinished or dropped unfinished", answered, 2*limit)
		}
		if !isEOF(r.end) {
			t.Errorf("ours did not close the connection after %d unfinished calls: %s", limit, o.class)
		}
	}
}

// table renders the results as markdown.
func (h *hostileResults) table(cases []hostileCase) string {
	h.mu.Lock()
	defer h.mu.Unlock()
	var b strings.Builder
	b.WriteString("| input | " + targetCpp + " | " + targetOurs + " | " + targetTimeout + " |\n|---|---|---|---|\n")
	names := make([]string, 0, len(cases)+1)
	for _, c := range cases {
		names = append(names, c.name)
	}
	names = append(names, fmt.Sprintf("flood: %d calls, replies never read", floodCalls))
	for _, n := range names {
		row := h.rows[n]
		cell := func(target string) string {
			o, ok := row[target]
			if !ok {
				return "—"
			}
			if o.detail == "" {
				return o.class
			}
			return o.class + "; " + o.detail
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", n, cell(targetCpp), cell(targetOurs), cell(targetTimeout))
	}
	return b.String()
}
