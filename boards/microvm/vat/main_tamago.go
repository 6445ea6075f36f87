//go:build tamago

package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"time"

	"capnproto.org/go/capnp/v3"

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
	if stack, err := startNetwork(log); err != nil {
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
	<-conn.Done()
	log.Info("vat: serial connection ended; exiting", "err", conn.Err())
	os.Exit(0)
}

// startNetwork finds a virtio-net card in microvm's virtio-mmio slots and
// puts a TCP/IP stack on it.
func startNetwork(log *slog.Logger) (*netstack.Stack, error) {
	for i := range microvm.VirtioSlots {
		base := uintptr(microvm.VirtioMMIO + 0x200*i)
		t, err := tamago.NewMMIO(base)
		if err != nil || t.DeviceID() != 1 {
			continue
		}
		nic, err := tamago.NewNIC(t, tamago.DMA{}, nil)
		if err != nil {
			return nil, fmt.Errorf("virtio-net at %#x: %w", base, err)
		}
		log.Info("vat: virtio-net", "base", fmt.Sprintf("%#x", base), "mac", nic.MAC().String())
		link := tamago.NewLink(nic, nic.MAC(), &tamago.LinkOptions{Logger: log})
		return netstack.New(link, netstack.Config{Name: "virtio-net", Addrs: []netip.Prefix{guestAddr}, Logger: log})
	}
	return nil, fmt.Errorf("no virtio-net device")
}
