package bench

import (
	"context"
	"os"
	"slices"
	"strconv"
	"testing"
	"time"
)

// TestStreamRatio measures the streaming workload as `captp bench` does
// (raw and captp alternating over fresh Unix socket pairs) and logs the
// ByteStream's MB/s as a ratio to the raw socket's: a quick A/B check for
// stream optimizations, since the whole bench takes minutes. It runs only
// when CAPTP_STREAM_REPS is set, e.g.
//
//	CAPTP_STREAM_REPS=5 CAPTP_STREAM_MIB=256 go test -run StreamRatio -v ./internal/bench
func TestStreamRatio(t *testing.T) {
	reps, _ := strconv.Atoi(os.Getenv("CAPTP_STREAM_REPS"))
	if reps <= 0 {
		t.Skip("set CAPTP_STREAM_REPS to run the stream A/B measurement")
	}
	mib, _ := strconv.Atoi(os.Getenv("CAPTP_STREAM_MIB"))
	if mib <= 0 {
		mib = 256
	}
	total := int64(mib) << 20
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
	defer cancel()
	var raw, cp []float64
	for r := 0; r < reps; r++ {
		a, err := rawStream(ctx, total, streamChunk)
		if err != nil {
			t.Fatal(err)
		}
		b, err := captpStream(ctx, total, streamChunk)
		if err != nil {
			t.Fatal(err)
		}
		ra, rb := float64(total)/a.elapsed.Seconds()/1e6, float64(total)/b.elapsed.Seconds()/1e6
		raw, cp = append(raw, ra), append(cp, rb)
		t.Logf("run %d: raw %.0f MB/s, captp %.0f MB/s, ratio %.3f", r+1, ra, rb, rb/ra)
	}
	med := func(v []float64) float64 { v = slices.Clone(v); slices.Sort(v); return v[len(v)/2] }
	t.Logf("median: raw %.0f MB/s, captp %.0f MB/s, ratio of medians %.3f", med(raw), med(cp), med(cp)/med(raw))
}

// TestLatencyRatio measures, as `captp bench` does on the unix transport,
// the sequential 16-byte call latency (captp and the raw floor) and the
// two-hop pipelined call, and logs the ratios: a quick A/B check for
// latency work. It runs only when CAPTP_LAT_REPS is set; CAPTP_LAT_IMPL
// picks the implementation (default captp; captp-native for the native
// stubs) and CAPTP_LAT_TRANSPORT the transport (default unix).
func TestLatencyRatio(t *testing.T) {
	reps, _ := strconv.Atoi(os.Getenv("CAPTP_LAT_REPS"))
	if reps <= 0 {
		t.Skip("set CAPTP_LAT_REPS to run the latency A/B measurement")
	}
	impl, tr := Captp, Unix
	if v := os.Getenv("CAPTP_LAT_IMPL"); v != "" {
		impl = Impl(v)
	}
	if v := os.Getenv("CAPTP_LAT_TRANSPORT"); v != "" {
		tr = Transport(v)
	}
	ctx := t.Context()
	cfg := &Config{Counts: ShortCounts()}
	open := func(im Impl) session {
		s, err := openSession(ctx, cfg, nil, im, tr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.close() })
		return s
	}
	raw, cp := open(Raw), open(impl)
	for r := 0; r < reps; r++ {
		rl, err := raw.lat(ctx, 5000, 16)
		if err != nil {
			t.Fatal(err)
		}
		cl, err := cp.lat(ctx, 5000, 16)
		if err != nil {
			t.Fatal(err)
		}
		p2, err := cp.pipe2(ctx, 2000)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("run %d: raw %v, captp %v (%.2f× raw), 2-hop %v (%.2f× one round trip)", r+1,
			rl.median, cl.median, float64(cl.median)/float64(rl.median), p2.median, float64(p2.median)/float64(cl.median))
	}
}
