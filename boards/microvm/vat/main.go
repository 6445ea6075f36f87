// Command vat is captp's sample TamaGo image for QEMU's microvm: a vat
// offering the Test service (internal/testcapnp: echo, child objects for
// pipelining, callBack to call a capability the caller passes, hold and
// getHeld to keep and return capabilities) as its bootstrap capability
//
//   - over the serial port COM2 (always): its CapTP connection is the
//     machine's lifeline, and when it ends the vat exits with status 0
//     through isa-debug-exit;
//   - over TCP port 4000 on a virtio-net card, when QEMU has one, at
//     10.0.2.15/24 (QEMU's user-mode network address for guests, also used
//     with -netdev stream).
//
// Build it with the tamago-go toolchain (see the README's TamaGo section
// and `make tamago`); captp host boots it.
package main
