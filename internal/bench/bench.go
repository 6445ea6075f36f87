// Package bench measures captp against go-capnp's rpc package, the Cap'n
// Proto C++ reference and the raw socket floor on the same Echo workload.
// It is the library behind `captp bench` and `make bench`.
//
// Implementations (Impl):
//
//   - raw: a plain length-prefixed ping-pong over the same transport, no
//     RPC. This is the floor: what the transport costs on its own.
//   - captp: this project's core (adapters/unix.NewConn on kernel sockets,
//     core.NewConn on pipes and netstack).
//   - captp-native: captp with the native stubs capnpc-captp generates
//     (internal/testnative) on core.Call and core.Handler, bypassing
//     go-capnp's Client, Promise and server.Server.
//   - go-capnp: capnproto.org/go/capnp/v3/rpc with rpc.NewStreamTransport.
//   - c++: the Cap'n Proto C++ reference (libcapnp), both client and
//     server, in interop/cpp/bench.c++, built on first use and cached by
//     source hash.
//
// The Go implementations serve internal/testimpl's Test object and call it
// through the generated testcapnp client; the raw floor and the C++ peer
// do the same work by hand.
//
// Transports (Transport):
//
//   - pipe: in memory (net.Pipe in Go, kj::newTwoWayPipe in C++), client
//     and server in one process.
//   - unix: a Unix socket, client and server in one process (in C++, a
//     socketpair on one event loop).
//   - unix-2proc: a Unix socket between two processes; the server is a
//     child process (`captp bench-server`, or the C++ program), so its
//     allocations and CPU time are measured on their own.
//   - tcp and netstack: the netstack section (issue 7). Kernel loopback
//     TCP and gVisor's userspace TCP/IP stack (adapters/netstack: two
//     stacks on one in-process Network), client and server in one
//     process, measured side by side in the same run: round trip and
//     bulk ByteStream throughput, raw and captp only (see netstack.go).
//
// Every measurement is repeated (Counts.Reps) and reported as min, median
// and max over the repetitions, with the median compared to the raw floor
// and to go-capnp on the same transport, and on netstack to kernel TCP.
package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"time"

	"github.com/captp-go/captp/core/bytestream"
)

// Impl names an RPC implementation under test.
type Impl string

// The implementations, in report order.
const (
	Raw     Impl = "raw"
	Captp   Impl = "captp"
	GoCapnp Impl = "go-capnp"
	Cpp     Impl = "c++"
	// CaptpNative is captp through its native call path (core.Call and
	// core.Handler, through the stubs capnpc-captp generates in
	// internal/testnative) instead of capnpc-go's generated client and
	// server.
	CaptpNative Impl = "captp-native"
)

// AllImpls is every implementation, in report order.
var AllImpls = []Impl{Raw, Captp, CaptpNative, GoCapnp, Cpp}

// DefaultImpls are the implementations measured when Config.Impls is nil.
var DefaultImpls = []Impl{Raw, Captp, CaptpNative, GoCapnp, Cpp}

// Transport names how client and server are connected.
type Transport string

// The transports, in report order.
const (
	Pipe   Transport = "pipe"
	Unix   Transport = "unix"
	Unix2P Transport = "unix-2proc"
	// TCP and Netstack make up the netstack section: round trip and bulk
	// throughput only, for raw and captp.
	TCP      Transport = "tcp"
	Netstack Transport = "netstack"
)

// AllTransports is every transport, in report order.
var AllTransports = []Transport{Pipe, Unix, Unix2P, TCP, Netstack}

// Describe says what a transport is.
func (t Transport) Describe() string {
	switch t {
	case Pipe:
		return "in-memory pipe, client and server in one process (Go: net.Pipe; C++: kj::newTwoWayPipe, one event loop)"
	case Unix:
		return "Unix socket, client and server in one process (C++: a socketpair on one event loop)"
	case Unix2P:
		return "Unix socket between two processes (the server is a child process)"
	case TCP:
		return "kernel loopback TCP (127.0.0.1), client and server in one process"
	case Netstack:
		return "gVisor userspace TCP/IP: two stacks on one in-process netstack.Network, MTU 65,535"
	}
	return string(t)
}

// Counts sets how much work each measurement does.
type Counts struct {
	Reps       int // repetitions of every measurement
	Warmup     int // sequential calls on each new connection before measuring
	Lat        int // sequential 16-byte calls per latency run
	Flight1    int // calls per throughput run with 1 in flight
	Flight64   int // ... with 64 in flight
	Flight1024 int // ... with 1024 in flight
	Pipe2      int // pipelined two-hop calls per run
	Big        int // 1 MiB echoes per run
	BigSize    int // bytes per big echo (1 MiB)
	Flood      int // calls in the flood
	// StreamBytes are streamed one way per run (raw and captp, Unix
	// socket); zero skips the stream. StreamChunk is the write size.
	StreamBytes int64
	StreamChunk int
	// StreamBytes1500 are streamed by captp per run over a netstack
	// Network with MTU 1,500, for reference next to the default MTU
	// (the netstack section's other bulk runs send StreamBytes); zero
	// skips it.
	StreamBytes1500 int64
	// FloodQuiet is how long the flooder's writes may make no progress
	// before the server counts as having stopped reading.
	FloodQuiet time.Duration
	// FloodLimit bounds each flood phase (writing, then reading the
	// replies).
	FloodLimit time.Duration
}

// streamChunk is the write size of the streaming workload.
const streamChunk = bytestream.DefaultChunkSize

// FullCounts are the counts of `make bench`.
func FullCounts() Counts {
	return Counts{
		Reps: 5, Warmup: 2000,
		Lat: 10000, Flight1: 10000, Flight64: 64000, Flight1024: 102400,
		Pipe2: 3000, Big: 100, BigSize: 1 << 20,
		StreamBytes: 1 << 30, StreamChunk: streamChunk, StreamBytes1500: 128 << 20,
		Flood: 200000, FloodQuiet: time.Second, FloodLimit: 60 * time.Second,
	}
}

// ShortCounts are the counts of -short: under a minute for everything on
// an idle two-core machine, with a smaller flood.
func ShortCounts() Counts {
	return Counts{
		Reps: 3, Warmup: 300,
		Lat: 1000, Flight1: 1000, Flight64: 6400, Flight1024: 8192,
		Pipe2: 300, Big: 10, BigSize: 1 << 20,
		StreamBytes: 256 << 20, StreamChunk: streamChunk, StreamBytes1500: 32 << 20,
		Flood: 30000, FloodQuiet: 300 * time.Millisecond, FloodLimit: 10 * time.Second,
	}
}

// TinyCounts prove the harness works, in a few seconds.
func TinyCounts() Counts {
	return Counts{
		Reps: 1, Warmup: 5,
		Lat: 20, Flight1: 20, Flight64: 128, Flight1024: 1024,
		Pipe2: 10, Big: 1, BigSize: 1 << 20,
		StreamBytes: 8 << 20, StreamChunk: streamChunk, StreamBytes1500: 1 << 20,
		Flood: 500, FloodQuiet: 300 * time.Millisecond, FloodLimit: 5 * time.Second,
	}
}

// Config configures a Run. The zero value runs nothing useful: start
// from FullCounts or ShortCounts.
type Config struct {
	Counts Counts
	// Impls and Transports select what runs; nil means all.
	Impls      []Impl
	Transports []Transport
	// NoFlood skips the flood.
	NoFlood bool

	// ChildCommand returns the command that runs ServerMain(args) in a
	// child process. Nil: this executable with "bench-server" and args,
	// which works for the captp command and for test binaries whose
	// TestMain calls ServerMain for that argument.
	ChildCommand func(args ...string) *exec.Cmd

	// CppCachedOnly uses the C++ bench program only when it is already
	// built (no compiler run).
	CppCachedOnly bool

	// ProfileDir, when set, receives pprof CPU and allocation profiles of
	// captp's client and server in one process over a Unix socket, under
	// the sequential and 64-in-flight workloads.
	ProfileDir string

	// FloodRSSCap is the server RSS at which a flood is stopped and the
	// server killed, to keep the machine safe. Zero means 1 GiB.
	FloodRSSCap int64

	// Progress receives one line per step; nil discards them.
	Progress io.Writer

	start time.Time
}

func (c *Config) progress(format string, args ...any) {
	if c.Progress != nil {
		fmt.Fprintf(c.Progress, "bench %5.1fs: %s\n", time.Since(c.start).Seconds(), fmt.Sprintf(format, args...))
	}
}

func (c *Config) childCommand(args ...string) (*exec.Cmd, error) {
	if c.ChildCommand != nil {
		return c.ChildCommand(args...), nil
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("locating this executable to start the bench server: %w", err)
	}
	cmd := exec.Command(exe, append([]string{ServerCommand}, args...)...)
	if os.Getenv("GORACE") == "" {
		// A race-enabled child would sleep a second when it exits.
		cmd.Env = append(os.Environ(), "GORACE=atexit_sleep_ms=0")
	}
	return cmd, nil
}

// errNotApplicable marks a workload an implementation does not have (the
// raw floor has no pipelining).
var errNotApplicable = errors.New("not applicable")

// Run runs the benchmark and returns its report.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	start := time.Now()
	cfg.start = start
	if cfg.Counts.Reps <= 0 {
		return nil, errors.New("bench: Counts.Reps must be positive")
	}
	impls := cfg.Impls
	if impls == nil {
		impls = DefaultImpls
	}
	transports := cfg.Transports
	if transports == nil {
		transports = AllTransports
	}
	rep := &Report{Machine: machineInfo(), Counts: cfg.Counts, Started: start.UTC()}

	var cpp *cppProgram
	if slices.Contains(impls, Cpp) {
		cfg.progress("c++: locating or building the bench program")
		bin, skip, err := buildCpp(cfg.CppCachedOnly)
		switch {
		case err != nil:
			rep.skip(Cpp, "", "build failed: "+err.Error())
		case skip != "":
			rep.skip(Cpp, "", skip)
		default:
			cpp = &cppProgram{bin: bin}
		}
	}

	for _, tr := range transports {
		if netTransport(tr) {
			continue // the netstack section, below
		}
		sessions := map[Impl]session{}
		var order []Impl
		for _, im := range impls {
			if im == Cpp && cpp == nil {
				continue
			}
			cfg.progress("%s/%s: connecting", tr, im)
			s, err := openSession(ctx, &cfg, cpp, im, tr)
			if err != nil {
				rep.skip(im, tr, "failed to start: "+err.Error())
				continue
			}
			if _, err := s.lat(ctx, cfg.Counts.Warmup, 16); err != nil {
				s.close()
				rep.skip(im, tr, "warm-up failed: "+err.Error())
				continue
			}
			sessions[im] = s
			order = append(order, im)
		}
		// Repetitions rotate over the implementations, so that the
		// machine's drifts hit all of them alike.
		failed := map[Impl]bool{}
		for r := 0; r < cfg.Counts.Reps; r++ {
			for _, im := range order {
				if failed[im] {
					continue
				}
				cfg.progress("%s/%s: run %d of %d", tr, im, r+1, cfg.Counts.Reps)
				if err := measure(ctx, &cfg, rep, sessions[im], im, tr); err != nil {
					failed[im] = true
					rep.skip(im, tr, fmt.Sprintf("run %d failed: %v", r+1, err))
				}
				if ctx.Err() != nil {
					break
				}
			}
		}
		for _, im := range order {
			if err := sessions[im].close(); err != nil {
				cfg.progress("%s/%s: closing: %v", tr, im, err)
			}
			cfg.progress("%s/%s: closed", tr, im)
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
	}

	if cfg.Counts.StreamBytes > 0 && slices.Contains(transports, Unix) {
		runStreams(ctx, &cfg, rep, impls)
		if err := ctx.Err(); err != nil {
			return nil, err
		}
	}

	if slices.ContainsFunc(transports, netTransport) {
		runNetstack(ctx, &cfg, rep, transports, impls)
		if err := ctx.Err(); err != nil {
			return nil, err
		}
	}

	if !cfg.NoFlood {
		for _, im := range impls {
			if im == Raw || (im == Cpp && cpp == nil) {
				continue
			}
			for _, finish := range []bool{true, false} {
				cfg.progress("flood/%s: %d calls (finished=%v)", im, cfg.Counts.Flood, finish)
				f, err := runFlood(ctx, &cfg, cpp, im, finish)
				if err != nil {
					rep.skip(im, "flood", err.Error())
					continue
				}
				rep.Floods = append(rep.Floods, *f)
			}
			if err := ctx.Err(); err != nil {
				return nil, err
			}
		}
	}

	if cfg.ProfileDir != "" {
		cfg.progress("profiling captp in %s", cfg.ProfileDir)
		files, err := profileCaptp(ctx, &cfg)
		if err != nil {
			return nil, fmt.Errorf("profiling: %w", err)
		}
		rep.Profiles = files
	}

	rep.finish()
	rep.Machine.LoadEnd = loadAvg()
	rep.Duration = Seconds(time.Since(start).Seconds())
	return rep, nil
}

// measure runs one repetition of every workload on s and records it.
func measure(ctx context.Context, cfg *Config, rep *Report, s session, im Impl, tr Transport) error {
	c := cfg.Counts
	add := func(metric string, v float64) { rep.add(tr, im, metric, v) }

	lat, err := s.lat(ctx, c.Lat, 16)
	if err != nil {
		return fmt.Errorf("sequential calls: %w", err)
	}
	add(mSeqMedian, us(lat.median))
	add(mSeqP99, us(lat.p99))
	add(mAllocsSeq, lat.total().perCall(lat.calls).mallocs)
	add(mCPUSeq, lat.total().perCall(lat.calls).cpuMicros)

	for _, f := range []struct {
		k, n   int
		metric string
	}{{1, c.Flight1, mRate1}, {64, c.Flight64, mRate64}, {1024, c.Flight1024, mRate1024}} {
		r, err := s.flight(ctx, f.n, f.k, 16)
		if err != nil {
			return fmt.Errorf("%d calls in flight: %w", f.k, err)
		}
		add(f.metric, float64(f.n)/r.elapsed.Seconds())
		if f.k == 64 {
			tot := r.total().perCall(f.n)
			add(mAllocs64, tot.mallocs)
			add(mBytes64, tot.bytes)
			add(mCPU64, tot.cpuMicros)
			if r.split {
				cl, sv := r.client.perCall(f.n), r.server.perCall(f.n)
				add(mAllocs64Client, cl.mallocs)
				add(mAllocs64Server, sv.mallocs)
				add(mCPU64Client, cl.cpuMicros)
				add(mCPU64Server, sv.cpuMicros)
			}
		}
	}

	p2, err := s.pipe2(ctx, c.Pipe2)
	switch {
	case errors.Is(err, errNotApplicable):
	case err != nil:
		return fmt.Errorf("pipelined calls: %w", err)
	default:
		add(mPipe2Median, us(p2.median))
		if lat.median > 0 {
			add(mPipe2Ratio, float64(p2.median)/float64(lat.median))
		}
	}

	big, err := s.lat(ctx, c.Big, c.BigSize)
	if err != nil {
		return fmt.Errorf("%d-byte echoes: %w", c.BigSize, err)
	}
	add(mEcho1MiB, float64(c.Big)*float64(c.BigSize)/big.elapsed.Seconds()/1e6)
	return ctx.Err()
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
