package bench

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
)

// profileCalls is the least number of sequential calls profiled: enough
// for a few seconds of CPU samples.
const profileCalls = 50000

// allocProfileCalls is the most calls profiled for allocations.
const allocProfileCalls = 10000

// profileCaptp writes pprof profiles of captp's client and server (one
// process, Unix socket) under the sequential and 64-in-flight workloads:
// for each, a CPU profile, and allocation profiles taken before and after
// the workload with every allocation sampled (MemProfileRate 1), so that
//
//	go tool pprof -sample_index=alloc_objects -base X.allocs-base.pprof X.allocs.pprof
//
// counts exactly the allocations of the workload, by site. It returns
// one line per profile.
func profileCaptp(ctx context.Context, cfg *Config) ([]string, error) {
	dir := cfg.ProfileDir
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	s, err := openSession(ctx, cfg, nil, Captp, Unix)
	if err != nil {
		return nil, err
	}
	defer s.close()
	if _, err := s.lat(ctx, cfg.Counts.Warmup, 16); err != nil {
		return nil, err
	}
	workloads := []struct {
		name string
		n    int
		run  func(n int) error
	}{
		{"seq", max(cfg.Counts.Lat, profileCalls), func(n int) error { _, err := s.lat(ctx, n, 16); return err }},
		{"flight64", max(cfg.Counts.Flight64, 4*profileCalls), func(n int) error { _, err := s.flight(ctx, n, 64, 16); return err }},
	}
	var lines []string
	write := func(path string, f func(*os.File) error) error {
		out, err := os.Create(path)
		if err != nil {
			return err
		}
		if err := f(out); err != nil {
			out.Close()
			return err
		}
		return out.Close()
	}
	for _, w := range workloads {
		cpu := filepath.Join(dir, "captp-"+w.name+".cpu.pprof")
		out, err := os.Create(cpu)
		if err != nil {
			return nil, err
		}
		if err := pprof.StartCPUProfile(out); err != nil {
			out.Close()
			return nil, err
		}
		err = w.run(w.n)
		pprof.StopCPUProfile()
		if cerr := out.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return nil, err
		}
		lines = append(lines, fmt.Sprintf("%s (CPU, %d calls)", cpu, w.n))

		base := filepath.Join(dir, "captp-"+w.name+".allocs-base.pprof")
		after := filepath.Join(dir, "captp-"+w.name+".allocs.pprof")
		old := runtime.MemProfileRate
		runtime.MemProfileRate = 1
		heap := func(f *os.File) error {
			runtime.GC() // the profile reflects the last completed GC
			return pprof.Lookup("allocs").WriteTo(f, 0)
		}
		// Allocations per call do not vary much, and recording every
		// one is slow: fewer calls suffice.
		na := min(w.n, allocProfileCalls)
		err = write(base, heap)
		if err == nil {
			err = w.run(na)
		}
		if err == nil {
			err = write(after, heap)
		}
		runtime.MemProfileRate = old
		if err != nil {
			return nil, err
		}
		lines = append(lines, fmt.Sprintf("%s (allocations, %d calls; -base %s)", after, na, filepath.Base(base)))
	}
	return lines, nil
}
