package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
	"unicode/utf8"
)

// Metric keys.
const (
	mSeqMedian      = "seq_median_us"
	mSeqP99         = "seq_p99_us"
	mRate1          = "rate_1_calls_per_s"
	mRate64         = "rate_64_calls_per_s"
	mRate1024       = "rate_1024_calls_per_s"
	mPipe2Median    = "pipe2_median_us"
	mPipe2Ratio     = "pipe2_vs_one_round_trip"
	mEcho1MiB       = "echo_1mib_mb_per_s"
	mAllocsSeq      = "allocs_per_call_seq"
	mAllocs64       = "allocs_per_call_64"
	mAllocs64Client = "allocs_per_call_64_client"
	mAllocs64Server = "allocs_per_call_64_server"
	mBytes64        = "bytes_per_call_64"
	mCPUSeq         = "cpu_us_per_call_seq"
	mCPU64          = "cpu_us_per_call_64"
	mCPU64Client    = "cpu_us_per_call_64_client"
	mCPU64Server    = "cpu_us_per_call_64_server"
	mStreamRate     = "stream_mb_per_s"
	mStreamHeap     = "stream_heap_peak_mb"
	mStreamAlloc    = "stream_alloc_bytes_per_byte"
	mStreamInFlight = "stream_in_flight_peak_mb"
	mStreamRate1500 = "stream_mtu1500_mb_per_s"
)

// metricDef describes a metric for the table.
type metricDef struct {
	key, title, unit string
	higher           bool // higher is better
	noRaw            bool // no ratio to the raw floor (it has none, or ~0)
}

var metricDefs = []metricDef{
	{key: mSeqMedian, title: "sequential 16 B call, median", unit: "µs"},
	{key: mSeqP99, title: "sequential 16 B call, p99", unit: "µs"},
	{key: mRate1, title: "throughput, 1 call in flight", unit: "calls/s", higher: true},
	{key: mRate64, title: "throughput, 64 calls in flight", unit: "calls/s", higher: true},
	{key: mRate1024, title: "throughput, 1024 calls in flight", unit: "calls/s", higher: true},
	{key: mPipe2Median, title: "2-hop pipelined call, median", unit: "µs", noRaw: true},
	{key: mPipe2Ratio, title: "2-hop pipelined / one round trip", unit: "×", noRaw: true},
	{key: mEcho1MiB, title: "1 MiB echo", unit: "MB/s", higher: true},
	{key: mAllocsSeq, title: "allocations/call, sequential, both sides", unit: "allocs", noRaw: true},
	{key: mAllocs64, title: "allocations/call, 64 in flight, both sides", unit: "allocs", noRaw: true},
	{key: mAllocs64Client, title: "allocations/call, 64 in flight, client", unit: "allocs", noRaw: true},
	{key: mAllocs64Server, title: "allocations/call, 64 in flight, server", unit: "allocs", noRaw: true},
	{key: mBytes64, title: "bytes allocated/call, 64 in flight, both sides", unit: "B", noRaw: true},
	{key: mCPUSeq, title: "CPU/call, sequential, both sides", unit: "µs"},
	{key: mCPU64, title: "CPU/call, 64 in flight, both sides", unit: "µs"},
	{key: mCPU64Client, title: "CPU/call, 64 in flight, client", unit: "µs"},
	{key: mCPU64Server, title: "CPU/call, 64 in flight, server", unit: "µs"},
	{key: mStreamRate, title: "stream one way (ByteStream)", unit: "MB/s", higher: true},
	{key: mStreamHeap, title: "stream: peak heap growth, both sides", unit: "MB", noRaw: true},
	{key: mStreamAlloc, title: "stream: bytes allocated per byte streamed", unit: "B", noRaw: true},
	{key: mStreamInFlight, title: "stream: peak bytes in flight (flow window)", unit: "MB", noRaw: true},
	{key: mStreamRate1500, title: "stream one way (ByteStream), MTU 1,500", unit: "MB/s", higher: true, noRaw: true},
}

func defOf(key string) metricDef {
	for _, d := range metricDefs {
		if d.key == key {
			return d
		}
	}
	return metricDef{key: key, title: key}
}

// Seconds is a duration in seconds.
type Seconds float64

// Report is the outcome of a Run.
type Report struct {
	Machine  Machine   `json:"machine"`
	Counts   Counts    `json:"counts"`
	Started  time.Time `json:"started"`
	Duration Seconds   `json:"duration_s"`
	Results  []*Result `json:"results"`
	Floods   []Flood   `json:"floods,omitempty"`
	Skipped  []Skip    `json:"skipped,omitempty"`
	Targets  []Target  `json:"targets,omitempty"`
	Profiles []string  `json:"profiles,omitempty"`
}

// Result is one metric of one implementation on one transport, over the
// repetitions.
type Result struct {
	Transport Transport `json:"transport"`
	Impl      Impl      `json:"impl"`
	Metric    string    `json:"metric"`
	Title     string    `json:"title"`
	Unit      string    `json:"unit"`
	Better    string    `json:"better"` // "lower" or "higher"
	Runs      []float64 `json:"runs"`
	Min       float64   `json:"min"`
	Median    float64   `json:"median"`
	Max       float64   `json:"max"`
	// VsRaw and VsGoCapnp are Median divided by the raw floor's and
	// go-capnp's median on the same transport, where both exist.
	VsRaw     *float64 `json:"vs_raw,omitempty"`
	VsGoCapnp *float64 `json:"vs_go_capnp,omitempty"`
	// VsTCP, on the netstack transport, is Median divided by the same
	// implementation's median over kernel loopback TCP (for the MTU 1,500
	// stream: by the TCP stream's).
	VsTCP *float64 `json:"vs_tcp,omitempty"`
}

// Skip records an implementation that did not run, and why.
type Skip struct {
	Impl      Impl   `json:"impl"`
	Transport string `json:"transport,omitempty"`
	Reason    string `json:"reason"`
}

// Target is one of the goals of issues 5 and 7, checked against this run.
type Target struct {
	Goal      string    `json:"goal"`
	Transport Transport `json:"transport,omitempty"`
	// Impl is the implementation checked: captp (capnpc-go's generated
	// client and server) or captp-native (capnpc-captp's native stubs).
	Impl     Impl   `json:"impl,omitempty"`
	Measured string `json:"measured"`
	Met      bool   `json:"met"`
	// Noisy says that the verdict depends on which runs are compared:
	// one side's median against the other side's fastest or slowest
	// run (or the other way round) would give the opposite answer. Then
	// Measured also gives the range of those ratios, and whether the
	// target is met says as much about the machine during the run as
	// about the code.
	Noisy bool `json:"noisy,omitempty"`
}

// ratioRange returns the ratios of each side's median to the other
// side's slowest and fastest runs, lowest and highest.
func ratioRange(ours, other *Result) (lo, hi float64) {
	lo, hi = math.Inf(1), math.Inf(-1)
	for _, v := range []float64{ours.Median / other.Max, ours.Median / other.Min, ours.Min / other.Median, ours.Max / other.Median} {
		if math.IsNaN(v) || math.IsInf(v, 0) {
			continue
		}
		lo, hi = min(lo, v), max(hi, v)
	}
	return lo, hi
}

func (r *Report) skip(im Impl, tr Transport, reason string) {
	r.Skipped = append(r.Skipped, Skip{Impl: im, Transport: string(tr), Reason: reason})
}

func (r *Report) add(tr Transport, im Impl, metric string, v float64) {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return
	}
	if res := r.find(tr, im, metric); res != nil {
		res.Runs = append(res.Runs, v)
		return
	}
	d := defOf(metric)
	better := "lower"
	if d.higher {
		better = "higher"
	}
	r.Results = append(r.Results, &Result{Transport: tr, Impl: im, Metric: metric, Title: d.title,
		Unit: d.unit, Better: better, Runs: []float64{v}})
}

// Find returns the result for a metric key, or nil.
func (r *Report) Find(tr Transport, im Impl, metric string) *Result { return r.find(tr, im, metric) }

func (r *Report) find(tr Transport, im Impl, metric string) *Result {
	for _, res := range r.Results {
		if res.Transport == tr && res.Impl == im && res.Metric == metric {
			return res
		}
	}
	return nil
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// finish computes the summaries, ratios and targets.
func (r *Report) finish() {
	for _, res := range r.Results {
		res.Min, res.Max = slices.Min(res.Runs), slices.Max(res.Runs)
		res.Median = median(res.Runs)
	}
	ratio := func(res *Result, ref Impl) *float64 {
		o := r.find(res.Transport, ref, res.Metric)
		if o == nil || o.Median == 0 {
			return nil
		}
		v := res.Median / o.Median
		return &v
	}
	for _, res := range r.Results {
		if !defOf(res.Metric).noRaw {
			res.VsRaw = ratio(res, Raw)
		}
		res.VsGoCapnp = ratio(res, GoCapnp)
		if res.Transport == Netstack {
			ref := res.Metric
			if ref == mStreamRate1500 {
				ref = mStreamRate
			}
			if o := r.find(TCP, res.Impl, ref); o != nil && o.Median != 0 {
				v := res.Median / o.Median
				res.VsTCP = &v
			}
		}
	}
	r.targets()
}

func (r *Report) targets() {
	transports := []Transport{}
	for _, res := range r.Results {
		if !slices.Contains(transports, res.Transport) {
			transports = append(transports, res.Transport)
		}
	}
	for _, tr := range transports {
		if netTransport(tr) {
			continue // netTargets
		}
		// Both ways of using captp are checked: capnpc-go's generated
		// code and capnpc-captp's native stubs.
		for _, im := range []Impl{Captp, CaptpNative} {
			r.implTargets(tr, im)
		}
	}
	r.netTargets()
	for _, f := range r.Floods {
		if f.Impl != Captp && f.Impl != CaptpNative {
			continue
		}
		grew := f.PeakRSS - f.BaseRSS
		bounded := grew < 64<<20 && !f.Killed
		var met bool
		var what string
		if f.Finish {
			met = bounded && f.AllAnswered()
			what = fmt.Sprintf("RSS +%s; %d of %d calls answered; %s", mb(grew), f.Answered, f.Calls, f.End)
		} else {
			// Unfinished calls pile up as answers the server must keep;
			// past its bound it aborts, having answered what it read.
			met = bounded && (f.AllAnswered() || f.Abort != "")
			what = fmt.Sprintf("RSS +%s; %d of %d answered, then Abort %q", mb(grew), f.Answered, f.Calls, f.Abort)
			if f.Abort == "" {
				what = fmt.Sprintf("RSS +%s; %d of %d answered; %s", mb(grew), f.Answered, f.Calls, f.End)
			}
		}
		goal := "flood (calls finished, replies unread): server memory bounded (< 64 MB), every call answered"
		if !f.Finish {
			goal = "flood (calls never finished): server memory bounded (< 64 MB), accepted calls answered or an Abort says why"
		}
		r.Targets = append(r.Targets, Target{Goal: goal, Transport: Unix2P, Impl: f.Impl, Measured: what, Met: met})
	}
}

// implTargets checks issue 5's and 6's goals for implementation im on
// transport tr, against the other implementations of the same run.
func (r *Report) implTargets(tr Transport, im Impl) {
	ours := func(m string) *Result { return r.find(tr, im, m) }
	check := func(goal string, res *Result, vs Impl, ok func(float64) bool) {
		if res == nil {
			return
		}
		other := r.find(tr, vs, res.Metric)
		if other == nil || other.Median == 0 {
			return
		}
		v := res.Median / other.Median
		t := Target{Goal: goal, Transport: tr, Impl: im, Measured: fmt.Sprintf("%.2f×", v), Met: ok(v)}
		if lo, hi := ratioRange(res, other); lo <= hi && (ok(lo) != t.Met || ok(hi) != t.Met) {
			t.Noisy = true
			t.Measured += fmt.Sprintf(" (not robust: %.2f–%.2f× against single runs)", lo, hi)
		}
		r.Targets = append(r.Targets, t)
	}
	check("sequential latency median ≤ 2.0× the raw floor", ours(mSeqMedian), Raw, func(v float64) bool { return v <= 2.0 })
	check("64 in flight: ≥ 4× go-capnp's calls/s", ours(mRate64), GoCapnp, func(v float64) bool { return v >= 4 })
	check("64 in flight: ≥ 4× the C++ reference's calls/s", ours(mRate64), Cpp, func(v float64) bool { return v >= 4 })
	if cl, sv := ours(mAllocs64Client), ours(mAllocs64Server); cl != nil && sv != nil {
		r.Targets = append(r.Targets, Target{Goal: "allocations ≤ 6/call on the client and ≤ 6 on the server (64 in flight)",
			Transport: tr, Impl: im, Measured: fmt.Sprintf("client %.1f, server %.1f", cl.Median, sv.Median),
			Met: cl.Median <= 6 && sv.Median <= 6})
	} else if both := ours(mAllocs64); both != nil {
		r.Targets = append(r.Targets, Target{Goal: "allocations ≤ 6+6/call (client and server in one process: ≤ 12 together)",
			Transport: tr, Impl: im, Measured: fmt.Sprintf("%.1f together", both.Median), Met: both.Median <= 12})
	}
	check("1 MiB echo ≥ 0.5× the raw floor's MB/s", ours(mEcho1MiB), Raw, func(v float64) bool { return v >= 0.5 })
	check(fmt.Sprintf("stream: %s ByteStream ≥ 0.5× raw", size(r.Counts.StreamBytes)), ours(mStreamRate), Raw, func(v float64) bool { return v >= 0.5 })
	if h := ours(mStreamHeap); h != nil {
		// Bounded: the flow window and a few chunk buffers, not the
		// bytes streamed.
		r.Targets = append(r.Targets, Target{Goal: "stream: peak heap growth (both sides) ≤ 64 MB", Transport: tr, Impl: im,
			Measured: fmt.Sprintf("%.1f MB (max %.1f MB) for %s streamed", h.Median, h.Max, size(r.Counts.StreamBytes)), Met: h.Max <= 64})
	}
	if p := ours(mPipe2Ratio); p != nil {
		// A ratio within each run: not robust when its runs straddle the goal.
		t := Target{Goal: "2-hop pipelined call ≤ 1.2× one round trip", Transport: tr, Impl: im,
			Measured: fmt.Sprintf("%.2f×", p.Median), Met: p.Median <= 1.2}
		if (p.Min <= 1.2) != (p.Max <= 1.2) {
			t.Noisy = true
			t.Measured += fmt.Sprintf(" (not robust: %.2f–%.2f× in single runs)", p.Min, p.Max)
		}
		r.Targets = append(r.Targets, t)
	}
}

// netTargets checks the netstack section's goals (issue 7): captp's round
// trip over netstack within 3× kernel loopback TCP's, and its bulk
// ByteStream throughput at MTU 65,535 at least 1 GB/s.
func (r *Report) netTargets() {
	ns, tcp := r.find(Netstack, Captp, mSeqMedian), r.find(TCP, Captp, mSeqMedian)
	if ns != nil && tcp != nil && tcp.Median > 0 {
		v := ns.Median / tcp.Median
		r.Targets = append(r.Targets, Target{Goal: "netstack round trip ≤ 3× kernel TCP", Transport: Netstack, Impl: Captp,
			Measured: fmt.Sprintf("%.2f× (median %s µs vs %s µs)", v, num(ns.Median), num(tcp.Median)), Met: v <= 3})
	}
	if bulk := r.find(Netstack, Captp, mStreamRate); bulk != nil {
		what := fmt.Sprintf("%s MB/s", num(bulk.Median))
		if tcp := r.find(TCP, Captp, mStreamRate); tcp != nil {
			what += fmt.Sprintf(" (kernel TCP %s MB/s)", num(tcp.Median))
		}
		r.Targets = append(r.Targets, Target{Goal: "netstack bulk ≥ 1 GB/s at MTU 65,535", Transport: Netstack, Impl: Captp,
			Measured: what, Met: bulk.Median >= 1000})
	}
}

// size formats a byte count in binary units.
func size(n int64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	}
	return fmt.Sprintf("%d B", n)
}

func mb(n int64) string { return fmt.Sprintf("%.1f MB", float64(n)/1e6) }

// WriteJSON writes the report as indented JSON.
func (r *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// num formats a value with about three significant digits.
func num(v float64) string {
	a := math.Abs(v)
	switch {
	case a >= 100:
		return fmt.Sprintf("%.0f", v)
	case a >= 10:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.2f", v)
	}
}

func ratioText(v *float64) string {
	if v == nil {
		return "-"
	}
	return fmt.Sprintf("%.2f×", *v)
}

// writeColumns writes rows under header: the first left columns
// left-aligned, the others right-aligned.
func writeColumns(w io.Writer, header []string, rows [][]string, left int) {
	width := make([]int, len(header))
	for _, row := range append([][]string{header}, rows...) {
		for i, cell := range row {
			width[i] = max(width[i], utf8.RuneCountInString(cell))
		}
	}
	for _, row := range append([][]string{header}, rows...) {
		var b strings.Builder
		for i, cell := range row {
			pad := strings.Repeat(" ", width[i]-utf8.RuneCountInString(cell))
			if i > 0 {
				b.WriteString("  ")
			}
			if i < left {
				b.WriteString(cell + pad)
			} else {
				b.WriteString(pad + cell)
			}
		}
		fmt.Fprintln(w, strings.TrimRight(b.String(), " "))
	}
}

// WriteTable writes the report as readable tables.
func (r *Report) WriteTable(w io.Writer) error {
	m := r.Machine
	fmt.Fprintf(w, "captp bench: %s/%s, %d CPUs (%s), kernel %s, %s", m.GOOS, m.GOARCH, m.CPUs, m.CPUModel, m.Kernel, m.GoVersion)
	if m.CppLib != "" {
		fmt.Fprintf(w, ", libcapnp %s", m.CppLib)
	}
	if m.LoadStart != "" {
		fmt.Fprintf(w, "\nload average (1, 5, 15 min): %s at the start, %s at the end", m.LoadStart, m.LoadEnd)
	}
	fmt.Fprintf(w, "\n%d runs of every measurement: min, median, max; ×raw and ×go-capnp are medians divided by theirs on the same transport.\n", r.Counts.Reps)
	matrix := slices.ContainsFunc(r.Results, func(res *Result) bool { return !netTransport(res.Transport) })
	if matrix {
		fmt.Fprintf(w, "Per run: %d sequential calls; %d, %d and %d calls at 1, 64 and 1024 in flight; %d pipelined 2-hop calls; %d echoes of %d bytes.\n",
			r.Counts.Lat, r.Counts.Flight1, r.Counts.Flight64, r.Counts.Flight1024, r.Counts.Pipe2, r.Counts.Big, r.Counts.BigSize)
	}
	if r.Counts.StreamBytes > 0 && matrix {
		fmt.Fprintf(w, "Stream: %s one way over a Unix socket in one process, in %d-byte writes (raw: plain socket writes, read and dropped).\n",
			size(r.Counts.StreamBytes), r.Counts.StreamChunk)
	}

	var transports []Transport
	for _, res := range r.Results {
		if !slices.Contains(transports, res.Transport) {
			transports = append(transports, res.Transport)
		}
	}
	var netTrs []Transport
	for _, tr := range transports {
		if netTransport(tr) {
			netTrs = append(netTrs, tr)
			continue
		}
		fmt.Fprintf(w, "\n== %s: %s ==\n", tr, tr.Describe())
		var rows [][]string
		for _, d := range metricDefs {
			first := true
			for _, im := range AllImpls {
				res := r.find(tr, im, d.key)
				if res == nil {
					continue
				}
				label := ""
				if first {
					dir := "lower is better"
					if d.higher {
						dir = "higher is better"
					}
					label = fmt.Sprintf("%s (%s, %s)", d.title, d.unit, dir)
					first = false
				}
				rows = append(rows, []string{label, string(im), num(res.Min), num(res.Median), num(res.Max),
					ratioText(res.VsRaw), ratioText(res.VsGoCapnp)})
			}
		}
		writeColumns(w, []string{"metric", "impl", "min", "median", "max", "×raw", "×go-capnp"}, rows, 2)
		switch tr {
		case Pipe, Unix:
			fmt.Fprintln(w, "(one process: allocations and CPU are client and server together, and include the harness.)")
		case Unix2P:
			fmt.Fprintln(w, "(two processes: client figures are the benchmark process, server figures the child's own counters.)")
		}
	}

	if len(netTrs) > 0 {
		r.writeNetstack(w, netTrs)
	}

	if len(r.Floods) > 0 {
		fmt.Fprintf(w, "\n== flood: %d echo calls written as fast as possible by a peer that reads no reply; server in its own process ==\n", r.Counts.Flood)
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintf(tw, "impl\tcalls\twritten before stall\tserver RSS before → peak\tGo heap in use\tanswered\treturn kinds\tend\n")
		for _, f := range r.Floods {
			mode := "finished"
			if !f.Finish {
				mode = "never finished"
			}
			written := fmt.Sprintf("%d", f.Written)
			switch {
			case f.Stalled:
				written += " (server stopped reading)"
			case f.Written == f.Calls:
				written += " (all)"
			}
			heap := "-"
			if f.HeapInuse > 0 {
				heap = mb(f.HeapInuse)
			}
			end := f.End
			if f.Abort != "" {
				end = fmt.Sprintf("Abort %q; %s", f.Abort, f.End)
			}
			if f.Killed {
				end = fmt.Sprintf("KILLED at the RSS cap; %s", end)
			}
			var kinds []string
			for k, n := range f.Kinds {
				kinds = append(kinds, fmt.Sprintf("%s %d", k, n))
			}
			slices.Sort(kinds)
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s → %s\t%s\t%d\t%s\t%s\n", f.Impl, mode, written, mb(f.BaseRSS), mb(f.PeakRSS),
				heap, f.Answered, strings.Join(kinds, ", "), end)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}

	if len(r.Targets) > 0 {
		fmt.Fprintf(w, "\n== targets (issues 5 and 7) ==\n")
		for _, t := range r.Targets {
			box := "[ ]"
			if t.Met {
				box = "[x]"
			}
			fmt.Fprintf(w, "%s %-12s %-13s %s: %s\n", box, t.Transport, t.Impl, t.Goal, t.Measured)
		}
	}
	for _, s := range r.Skipped {
		where := s.Transport
		if where == "" {
			where = "all transports"
		}
		fmt.Fprintf(w, "\nSKIPPED %s (%s): %s", s.Impl, where, s.Reason)
	}
	if len(r.Skipped) > 0 {
		fmt.Fprintln(w)
	}
	for _, p := range r.Profiles {
		fmt.Fprintf(w, "\nprofile: %s", p)
	}
	if len(r.Profiles) > 0 {
		fmt.Fprintln(w)
	}
	fmt.Fprintf(w, "\ntotal time %.1fs\n", float64(r.Duration))
	return nil
}

// netstackMetrics are the netstack section's rows, in order.
var netstackMetrics = []string{mSeqMedian, mSeqP99, mCPUSeq, mStreamRate, mStreamRate1500}

// writeNetstack writes the netstack section: kernel loopback TCP and
// netstack side by side, with netstack's ratio to TCP.
func (r *Report) writeNetstack(w io.Writer, transports []Transport) {
	c := r.Counts
	fmt.Fprintf(w, "\n== netstack: captp over gVisor's userspace TCP/IP stack next to kernel loopback TCP, client and server in one process ==\n")
	for _, tr := range transports {
		fmt.Fprintf(w, "%-8s %s\n", tr, tr.Describe())
	}
	fmt.Fprintf(w, "Per run: %d sequential 16 B calls", c.Lat)
	if c.StreamBytes > 0 {
		fmt.Fprintf(w, "; %s one way in %d-byte writes (captp: a ByteStream; raw: plain writes)", size(c.StreamBytes), c.StreamChunk)
		if c.StreamBytes1500 > 0 {
			fmt.Fprintf(w, "; captp: %s over a netstack Network with MTU 1,500", size(c.StreamBytes1500))
		}
	}
	fmt.Fprintf(w, ". ×tcp: netstack's median divided by kernel TCP's.\n")
	var rows [][]string
	for _, key := range netstackMetrics {
		d := defOf(key)
		first := true
		for _, tr := range transports {
			for _, im := range AllImpls {
				res := r.find(tr, im, key)
				if res == nil {
					continue
				}
				label := ""
				if first {
					dir := "lower is better"
					if d.higher {
						dir = "higher is better"
					}
					label = fmt.Sprintf("%s (%s, %s)", d.title, d.unit, dir)
					first = false
				}
				rows = append(rows, []string{label, string(tr), string(im), num(res.Min), num(res.Median), num(res.Max),
					ratioText(res.VsRaw), ratioText(res.VsTCP)})
			}
		}
	}
	writeColumns(w, []string{"metric", "transport", "impl", "min", "median", "max", "×raw", "×tcp"}, rows, 3)
	fmt.Fprintln(w, "(one process: CPU is client and server together, gVisor's goroutines included, and includes the harness.)")
}
