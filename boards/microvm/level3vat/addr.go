package main

import (
	"fmt"
	"net"
	"net/netip"
)

// addrFromMAC returns the guest's address for its card's MAC address:
// 10.A.B.C/24 for xx:xx:xx:A:B:C. The host picks each guest's MAC (QEMU's
// virtio-net mac property), so it picks the address too, with no kernel
// command line to parse. C must be a host number of the /24.
func addrFromMAC(mac net.HardwareAddr) (netip.Prefix, error) {
	if len(mac) != 6 {
		return netip.Prefix{}, fmt.Errorf("MAC address %v is not 6 bytes long", mac)
	}
	if mac[5] == 0 || mac[5] == 255 {
		return netip.Prefix{}, fmt.Errorf("MAC address %v: its last byte gives host %d of 10.%d.%d.0/24, which is not a host address", mac, mac[5], mac[3], mac[4])
	}
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, mac[3], mac[4], mac[5]}), 24), nil
}
