//go:build tamago

package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/adapters/netstack"
	"github.com/captp-go/captp/adapters/secure"
	"github.com/captp-go/captp/adapters/tamago"
	"github.com/captp-go/captp/boards/microvm"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/sturdyref"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

func main() {
	log := slog.New(slog.NewTextHandler(os.Stdout, &slog.HandlerOptions{Level: slog.LevelInfo}))
	if microvm.CalibrationError != "" {
		log.Warn("level3vat: timer calibration failed", "err", microvm.CalibrationError)
	}
	log.Info("level3vat: booted", "tsc_hz", microvm.TSCHz, "uptime", time.Duration(time.Now().UnixNano()))
	if err := run(log); err != nil {
		log.Error("level3vat: " + err.Error())
		os.Exit(1)
	}
	os.Exit(0)
}

func run(log *slog.Logger) error {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := microvm.CheckEntropy(); err != nil {
		return err
	}
	id, err := secure.Generate()
	if err != nil {
		return fmt.Errorf("identity: %w", err)
	}
	stack, err := microvm.StartNetwork(log, addrFromMAC)
	if err != nil {
		return fmt.Errorf("network (the Level 3 vat needs one): %w", err)
	}
	defer stack.Close()

	network := secure.NewNetwork(id)
	network.SetDialer(stack.SturdyDialer(id, &core.Options{Vat: network.Vat(), Logger: log}))
	lis, err := stack.Listen(fmt.Sprintf("*:%d", vatPort))
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	addr, err := stack.SturdyAddress(lis)
	if err != nil {
		lis.Close()
		return err
	}
	ref := sturdyref.Ref{Fingerprint: id.Fingerprint(), Address: addr}
	log.Info("level3vat: serving TLS", "ref", ref.String())

	obj := testimpl.New(ref.String(), nil)
	boot := capnp.Client(obj.Client())
	defer boot.Release()
	rel := capnp.Client(testcapnp.Test_ServerToClient(&relay{}))
	defer rel.Release()
	restorer := core.RestorerFunc(func(_ context.Context, service []byte) (capnp.Client, error) {
		if string(service) != relayService {
			return capnp.Client{}, errors.New("level3vat: unknown service")
		}
		return rel.AddRef(), nil
	})
	served := make(chan error, 1)
	go func() {
		served <- netstack.ServeSturdy(ctx, lis, id, &core.Options{Vat: network.Vat(), BootstrapClient: boot.AddRef(), Restorer: restorer, Logger: log})
	}()

	// The serial connection is plain (it is this machine's own port) and
	// never hands off: no Vat.
	serial := tamago.NewSerial(microvm.COM2, nil)
	conn := core.NewConn(serial, &core.Options{BootstrapClient: boot.AddRef(), Restorer: restorer, Logger: log})
	log.Info("level3vat: serving on COM2")
	<-conn.Done()
	log.Info("level3vat: serial connection ended; exiting", "err", conn.Err())
	cancel()
	<-served
	return nil
}
