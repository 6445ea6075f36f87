package bench

import (
	"context"
	"fmt"
	"net"
	"slices"

	"github.com/captp-go/captp/adapters/netstack"
)

// The netstack section (issue 7): captp over gVisor's userspace TCP/IP
// stack (adapters/netstack), next to kernel loopback TCP in the same run,
// client and server in one process on both.
//
//   - tcp: 127.0.0.1, net.Listen and net.Dial.
//   - netstack: two stacks on one in-process netstack.Network whose links
//     have MTU 65,535 (netstack.DefaultNetworkMTU).
//
// Both carry the raw floor and captp (core.NewConn on both ends, the Test
// object of internal/testimpl); the other implementations are not run on
// them. Each run measures the round trip (Counts.Lat sequential 16-byte
// echoes: median and p99) and bulk throughput (Counts.StreamBytes one
// way, as the Unix-socket stream does: through a ByteStream for captp,
// plain writes for raw). For reference, captp's bulk throughput is also
// measured over a netstack.Network with MTU 1,500 (Counts.StreamBytes1500).
// Repetitions rotate over transports and implementations, so that the
// machine's drifts hit kernel TCP and netstack alike.

// slowMTU is the reference link MTU of the netstack section: Ethernet's.
const slowMTU = 1500

// netTransport reports whether tr belongs to the netstack section rather
// than the full workload matrix.
func netTransport(tr Transport) bool { return tr == TCP || tr == Netstack }

// pairFunc returns both ends of a fresh in-process connection and a
// cleanup to call after both are closed.
type pairFunc func(ctx context.Context) (client, server net.Conn, cleanup func(), err error)

// tcpPair connects two kernel TCP sockets over the loopback interface.
func tcpPair(context.Context) (client, server net.Conn, cleanup func(), err error) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, nil, nil, fmt.Errorf("listening on loopback TCP: %w", err)
	}
	client, server, err = acceptDial(lis, func() (net.Conn, error) { return net.Dial("tcp", lis.Addr().String()) })
	if err != nil {
		return nil, nil, nil, fmt.Errorf("loopback TCP: %w", err)
	}
	return client, server, func() {}, nil
}

// netstackPair connects two stacks of a new netstack.Network with links
// of the given MTU; cleanup closes the network.
func netstackPair(mtu uint32) pairFunc {
	return func(ctx context.Context) (client, server net.Conn, cleanup func(), err error) {
		network := netstack.NewNetwork(&netstack.NetworkOptions{MTU: mtu})
		fail := func(what string, err error) (net.Conn, net.Conn, func(), error) {
			network.Close()
			return nil, nil, nil, fmt.Errorf("netstack (MTU %d): %s: %w", mtu, what, err)
		}
		srvStack, err := network.NewStack(netstack.Config{Name: "bench-server"})
		if err != nil {
			return fail("server stack", err)
		}
		cliStack, err := network.NewStack(netstack.Config{Name: "bench-client"})
		if err != nil {
			return fail("client stack", err)
		}
		lis, err := srvStack.Listen("*:4000")
		if err != nil {
			return fail("listening", err)
		}
		addr := srvStack.Addr().String() + ":4000"
		client, server, err = acceptDial(lis, func() (net.Conn, error) { return cliStack.DialTCP(ctx, addr) })
		if err != nil {
			return fail("connecting", err)
		}
		return client, server, func() { network.Close() }, nil
	}
}

// acceptDial accepts one connection on lis while dial connects to it,
// then closes lis.
func acceptDial(lis net.Listener, dial func() (net.Conn, error)) (client, server net.Conn, err error) {
	defer lis.Close()
	type accepted struct {
		c   net.Conn
		err error
	}
	ch := make(chan accepted, 1)
	go func() {
		c, err := lis.Accept()
		ch <- accepted{c, err}
	}()
	client, err = dial()
	if err != nil {
		lis.Close()
		if a := <-ch; a.c != nil {
			a.c.Close()
		}
		return nil, nil, fmt.Errorf("dialing %s: %w", lis.Addr(), err)
	}
	a := <-ch
	if a.err != nil {
		client.Close()
		return nil, nil, fmt.Errorf("accepting on %s: %w", lis.Addr(), a.err)
	}
	return client, a.c, nil
}

// netPair returns the pairFunc of a netstack-section transport.
func netPair(tr Transport) pairFunc {
	if tr == Netstack {
		return netstackPair(netstack.DefaultNetworkMTU)
	}
	return tcpPair
}

// runNetstack runs the netstack section on the selected transports (tcp,
// netstack) and implementations (raw, captp).
func runNetstack(ctx context.Context, cfg *Config, rep *Report, transports []Transport, impls []Impl) {
	var trs []Transport
	for _, tr := range []Transport{TCP, Netstack} {
		if slices.Contains(transports, tr) {
			trs = append(trs, tr)
		}
	}
	var ims []Impl
	for _, im := range []Impl{Raw, Captp} {
		if slices.Contains(impls, im) {
			ims = append(ims, im)
		}
	}
	if len(trs) == 0 || len(ims) == 0 {
		return
	}
	c := cfg.Counts
	type key struct {
		tr Transport
		im Impl
	}
	var keys []key
	for _, tr := range trs {
		for _, im := range ims {
			keys = append(keys, key{tr, im})
		}
	}

	// Round trip: one session per transport and implementation, open
	// side by side.
	sessions := map[key]session{}
	for _, k := range keys {
		cfg.progress("%s/%s: connecting", k.tr, k.im)
		s, err := openSession(ctx, cfg, nil, k.im, k.tr)
		if err != nil {
			rep.skip(k.im, k.tr, "failed to start: "+err.Error())
			continue
		}
		if _, err := s.lat(ctx, c.Warmup, 16); err != nil {
			s.close()
			rep.skip(k.im, k.tr, "warm-up failed: "+err.Error())
			continue
		}
		sessions[k] = s
	}
	failed := map[key]bool{}
	for r := 0; r < c.Reps && ctx.Err() == nil; r++ {
		for _, k := range keys {
			s := sessions[k]
			if s == nil || failed[k] {
				continue
			}
			cfg.progress("%s/%s: round trip, run %d of %d", k.tr, k.im, r+1, c.Reps)
			lat, err := s.lat(ctx, c.Lat, 16)
			if err != nil {
				failed[k] = true
				rep.skip(k.im, k.tr, fmt.Sprintf("round trip, run %d failed: %v", r+1, err))
				continue
			}
			rep.add(k.tr, k.im, mSeqMedian, us(lat.median))
			rep.add(k.tr, k.im, mSeqP99, us(lat.p99))
			rep.add(k.tr, k.im, mCPUSeq, lat.total().perCall(lat.calls).cpuMicros)
		}
	}
	for _, k := range keys {
		if s := sessions[k]; s != nil {
			if err := s.close(); err != nil {
				cfg.progress("%s/%s: closing: %v", k.tr, k.im, err)
			}
		}
	}
	if c.StreamBytes <= 0 || ctx.Err() != nil {
		return
	}

	// Bulk: a fresh connection for every run.
	type bulk struct {
		key
		metric string
		total  int64
		run    func(context.Context, int64, int) (streamRun, error)
	}
	var runs []bulk
	for _, k := range keys {
		pair := netPair(k.tr)
		b := bulk{key: k, metric: mStreamRate, total: c.StreamBytes}
		if k.im == Raw {
			b.run = func(ctx context.Context, total int64, chunk int) (streamRun, error) {
				return rawStreamOver(ctx, pair, total, chunk)
			}
		} else {
			b.run = func(ctx context.Context, total int64, chunk int) (streamRun, error) {
				return captpStreamOver(ctx, pair, total, chunk)
			}
		}
		runs = append(runs, b)
	}
	if slices.Contains(trs, Netstack) && slices.Contains(ims, Captp) && c.StreamBytes1500 > 0 {
		runs = append(runs, bulk{key: key{Netstack, Captp}, metric: mStreamRate1500, total: c.StreamBytes1500,
			run: func(ctx context.Context, total int64, chunk int) (streamRun, error) {
				return captpStreamOver(ctx, netstackPair(slowMTU), total, chunk)
			}})
	}
	bulkFailed := map[string]bool{}
	for r := 0; r < c.Reps; r++ {
		for _, b := range runs {
			name := fmt.Sprintf("%s/%s/%s", b.tr, b.im, b.metric)
			if bulkFailed[name] {
				continue
			}
			what := "bulk"
			if b.metric == mStreamRate1500 {
				what = fmt.Sprintf("bulk at MTU %d", slowMTU)
			}
			cfg.progress("%s/%s: %s, %s, run %d of %d", b.tr, b.im, what, size(b.total), r+1, c.Reps)
			res, err := b.run(ctx, b.total, c.StreamChunk)
			if err != nil {
				bulkFailed[name] = true
				rep.skip(b.im, b.tr, fmt.Sprintf("%s, run %d failed: %v", what, r+1, err))
				continue
			}
			rep.add(b.tr, b.im, b.metric, float64(b.total)/res.elapsed.Seconds()/1e6)
			if ctx.Err() != nil {
				return
			}
		}
	}
}
