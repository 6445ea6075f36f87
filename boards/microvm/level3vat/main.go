// Command level3vat is captp's TamaGo image for three-party handoff
// (rpc.capnp Level 3) between QEMU guests: a vat with its own TLS
// identity (a key made at boot from RDRAND through crypto/rand) and a
// secure.Network, on a gVisor stack over its virtio-net card, so that a
// capability another vat hands it can be picked up from the vat hosting
// it, guest to guest, without going through the introducer.
//
// It serves, on TCP port 4433 with TLS (ALPN captp-level3) and on the
// serial port COM2 (the machine's lifeline: when that connection ends the
// vat exits with status 0):
//
//   - as its bootstrap capability, the Test service (internal/testimpl),
//     named with the vat's sturdy ref (capnp+netstack://sha-256:…@ip:4433),
//     which is how the host learns it over the serial port;
//   - as service "relay" (a sturdy ref's service ID), a Test whose hold
//     keeps a capability and whose seq calls seq on it, in the order the
//     seq calls arrive: the host drives the calls this vat makes.
//
// The guest's IPv4 address is 10.A.B.C/24 for the MAC address
// xx:xx:xx:A:B:C of its card (QEMU: -device
// virtio-net-device,mac=52:54:00:00:03:02 for 10.0.3.2), so that one
// image serves every guest of a segment. cmd/captp's
// TestLevel3Guest* tests boot it.
package main

// relayService is the service ID of the relay.
const relayService = "relay"

// vatPort is the TCP port of the TLS service.
const vatPort = 4433
