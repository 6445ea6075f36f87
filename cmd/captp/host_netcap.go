package main

import (
	"flag"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/adapters/netcap"
	"github.com/captp-go/captp/core"
)

// netcapFlags registers the flags of the guest's network policy on fs
// and returns the policy they fill. Without -allow-* flags the policy is
// empty: the guest still gets a Network, and every request is denied.
func netcapFlags(fs *flag.FlagSet) *netcap.Policy {
	p := &netcap.Policy{}
	fs.Var(&p.Connect, "allow-connect", "let the guest connect to `NET:HOST:PORTS`, such as tcp:10.0.0.0/8:80-443 or tcp:example.com:443 (repeatable; see README, Network capabilities for guests)")
	fs.Var(&p.Listen, "allow-listen", "let the guest listen on `NET:ADDR:PORTS`, such as tcp:127.0.0.1:8000-8099 (repeatable)")
	fs.IntVar(&p.MaxStreams, "net-max-streams", netcap.DefaultMaxStreams, "most streams the guest may have open at once")
	fs.IntVar(&p.MaxListeners, "net-max-listeners", netcap.DefaultMaxListeners, "most listeners the guest may have open at once")
	return p
}

// startNetwork creates the Network the host offers the guest as its
// bootstrap capability on every connection to it. The host's kernel
// opens the sockets, within g.cfg.Policy (nil denies everything).
func (g *guest) startNetwork() {
	g.netSrv, g.network = netcap.NewServer(g.cfg.Policy, &netcap.KernelBackend{}, &netcap.Options{Logger: g.log})
	if p := g.cfg.Policy; p != nil && len(p.Connect)+len(p.Listen) > 0 {
		g.log.Info("captp host: guest network", "connect", p.Connect.String(), "listen", p.Listen.String())
	} else {
		g.log.Debug("captp host: guest network denies everything (no -allow-connect or -allow-listen)")
	}
}

// connOptions returns the options of a connection to the guest: the
// host offers it the Network.
func (g *guest) connOptions() *core.Options {
	opts := &core.Options{Logger: g.log}
	if g.network.IsValid() {
		opts.BootstrapClient = capnp.Client(g.network.AddRef())
	}
	return opts
}

// stopNetwork releases the host's reference and closes every socket the
// guest opened.
func (g *guest) stopNetwork() {
	if g.netSrv == nil {
		return
	}
	g.network.Release()
	g.netSrv.Close()
}
