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
//     with -netdev stream);
//   - through the host's network, when the host allows it: the bootstrap
//     capability of the serial connection is the host's Network
//     (adapters/netcap; captp host offers one), which the vat asks to
//     listen on 127.0.0.1:0, an ephemeral port on the host's loopback
//     (captp host -allow-listen tcp:127.0.0.1:0). It logs the address
//     on its console ("vat: serving through the host's network"
//     addr=127.0.0.1:PORT), then connects to it through the Network and
//     calls echo, which the host allows only with a matching
//     -allow-connect rule; failures are logged with their netcap kind
//     (kind=denied) and the vat carries on.
//
// Build it with the tamago-go toolchain (see the README's TamaGo section
// and `make tamago`); captp host boots it.
package main
