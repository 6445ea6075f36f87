package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/adapters/netcap"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/serve"
	"github.com/captp-go/captp/internal/testcapnp"
)

// hostListenAddr is where the vat asks the host's Network to listen: an
// ephemeral port on the host's loopback, which `captp host -allow-listen
// tcp:127.0.0.1:0` allows.
const hostListenAddr = "127.0.0.1:0"

// hostNetTimeout bounds each request to the host's Network.
const hostNetTimeout = 30 * time.Second

// Console messages of useHostNetwork, which tests look for.
const (
	msgListenFailed  = "vat: host network: listen failed"
	msgServing       = "vat: serving through the host's network"
	msgLoopbackOK    = "vat: host network: loopback check ok"
	msgLoopbackError = "vat: host network: loopback check failed"
)

// useHostNetwork uses the Network (adapters/netcap) that the host offers
// as its bootstrap capability: it asks it to listen on hostListenAddr and
// serves boot there until ctx ends, so that the host's processes reach the
// vat through the host's loopback only if the host's policy allows the
// listen. It then connects to that address through the Network, a check
// that the policy allows only with a matching connect rule, and calls
// echo there. Every outcome, the failures' netcap kinds included, goes
// to the log; none stops the vat (a host may deny everything or offer no
// Network). It returns once the check is done; the serving goes on. It
// takes over n and boot.
func useHostNetwork(ctx context.Context, log *slog.Logger, n netcap.Network, boot capnp.Client) {
	lctx, cancel := context.WithTimeout(ctx, hostNetTimeout)
	lis, err := netcap.Listen(lctx, n, "tcp", hostListenAddr)
	cancel()
	if err != nil {
		log.Info(msgListenFailed, "addr", hostListenAddr, "kind", kindOf(err), "err", err)
		n.Release()
		boot.Release()
		return
	}
	addr := lis.Addr().String()
	log.Info(msgServing, "addr", addr)
	go func() {
		// The listener is the Network's: keep n until serving ends.
		defer n.Release()
		sctx, stop := context.WithCancelCause(ctx)
		defer stop(nil)
		err := serve.Serve(sctx, closedListener{lis, stop}, &core.Options{BootstrapClient: boot, Logger: log},
			serve.Config{Name: "netcap", FormatAddr: net.Addr.String})
		if c := context.Cause(sctx); c != nil {
			err = c
		}
		log.Info("vat: stopped serving through the host's network", "err", err)
	}()
	if got, err := loopbackCheck(ctx, n, addr); err != nil {
		log.Info(msgLoopbackError, "addr", addr, "kind", kindOf(err), "err", err)
	} else {
		log.Info(msgLoopbackOK, "addr", addr, "echo", got)
	}
}

// closedListener ends serving, through stop, when the host closes the
// listener or the connection to the host ends (as when the vat exits):
// the end of the service, not an accept failure.
type closedListener struct {
	net.Listener
	stop context.CancelCauseFunc
}

func (l closedListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if errors.Is(err, netcap.ErrClosed) {
		l.stop(err)
	}
	return c, err
}

// loopbackCheck connects to addr through n, bootstraps the vat served
// there and calls echo.
func loopbackCheck(ctx context.Context, n netcap.Network, addr string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, hostNetTimeout)
	defer cancel()
	c, err := netcap.Dial(ctx, n, "tcp", addr)
	if err != nil {
		return "", err
	}
	conn := core.NewConn(c, nil)
	defer conn.Close()
	t := testcapnp.Test(conn.Bootstrap(ctx))
	defer t.Release()
	f, release := t.Echo(ctx, func(p testcapnp.Test_echo_Params) error { return p.SetData([]byte("loopback")) })
	defer release()
	r, err := f.Struct()
	if err != nil {
		return "", fmt.Errorf("echo: %w", err)
	}
	d, err := r.Data()
	if err != nil {
		return "", fmt.Errorf("echo result: %w", err)
	}
	return string(d), nil
}

// kindOf names a netcap failure's kind ("denied", "refused", ...).
func kindOf(err error) string {
	var e *netcap.Error
	if errors.As(err, &e) {
		return e.Kind.String()
	}
	return netcap.KindOther.String()
}
