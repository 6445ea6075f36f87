//go:build tamago

package microvm

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"

	"github.com/captp-go/captp/adapters/netstack"
	"github.com/captp-go/captp/adapters/tamago"
)

// StartNetwork finds the virtio-net card in microvm's virtio-mmio slots and
// puts a gVisor TCP/IP stack on it, at the address that addr picks for the
// card's MAC address (the host chooses the MAC, so it can choose the
// address too). It fails if there is no card.
func StartNetwork(log *slog.Logger, addr func(mac net.HardwareAddr) (netip.Prefix, error)) (*netstack.Stack, error) {
	for i := range VirtioSlots {
		base := uintptr(VirtioMMIO + 0x200*i)
		t, err := tamago.NewMMIO(base)
		if err != nil || t.DeviceID() != 1 {
			continue
		}
		nic, err := tamago.NewNIC(t, tamago.DMA{}, nil)
		if err != nil {
			return nil, fmt.Errorf("virtio-net at %#x: %w", base, err)
		}
		mac := net.HardwareAddr(nic.MAC())
		prefix, err := addr(mac)
		if err != nil {
			return nil, fmt.Errorf("virtio-net at %#x: %w", base, err)
		}
		log.Info("microvm: virtio-net", "base", fmt.Sprintf("%#x", base), "mac", mac.String(), "addr", prefix)
		link := tamago.NewLink(nic, mac, &tamago.LinkOptions{Logger: log})
		return netstack.New(link, netstack.Config{Name: "virtio-net", Addrs: []netip.Prefix{prefix}, Logger: log})
	}
	return nil, errors.New("no virtio-net device")
}
