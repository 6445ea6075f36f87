//go:build tamago

package main

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/adapters/netcap"
	"github.com/captp-go/captp/adapters/netstack"
	"github.com/captp-go/captp/adapters/tamago"
	"github.com/captp-go/captp/boards/microvm"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testimpl"
)

// Guest network settings (QEMU user-mode networking's defaults).
var (
	guestAddr = netip.MustParsePrefix("10.0.2.15/24")
	guestPort = "*:4000"
)

func main() {
	log := slog.New(slog.NewTextHandler(os.Stdout, &slog.HandlerOptions{Level: slog.LevelInfo}))
	if microvm.CalibrationError != "" {
		log.Warn("vat: timer calibration failed", "err", microvm.CalibrationError)
	}
	log.Info("vat: booted", "tsc_hz", microvm.TSCHz, "apic_timer_hz", microvm.APICTimerHz(), "uptime", time.Duration(time.Now().UnixNano()))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	obj := testimpl.New("guest", nil)
	if stack, err := microvm.StartNetwork(log, fixedAddr); err != nil {
		log.Info("vat: no network", "err", err)
	} else {
		lis, err := stack.Listen(guestPort)
		if err != nil {
			log.Error("vat: listen", "err", err)
			os.Exit(1)
		}
		log.Info("vat: serving TCP", "addr", guestAddr.Addr(), "port", 4000)
		go netstack.Serve(ctx, lis, &core.Options{BootstrapClient: capnp.Client(obj.Client()), Logger: log})
	}

	serial := tamago.NewSerial(microvm.COM2, nil)
	conn := core.NewConn(serial, &core.Options{BootstrapClient: capnp.Client(obj.Client()), Logger: log})
	log.Info("vat: serving on COM2")
	// captp host offers its Network as the serial connection's bootstrap
	// capability; what it allows is the host's policy.
	go useHostNetwork(ctx, log, netcap.Network(conn.Bootstrap(ctx)), capnp.Client(obj.Client()))
	<-conn.Done()
	log.Info("vat: serial connection ended; exiting", "err", conn.Err())
	os.Exit(0)
}

// fixedAddr gives every card QEMU user-mode networking's guest address.
func fixedAddr(net.HardwareAddr) (netip.Prefix, error) { return guestAddr, nil }
