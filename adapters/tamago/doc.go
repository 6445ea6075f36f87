// Package tamago connects captp vats running on bare metal under TamaGo
// (GOOS=tamago) to their peers: byte streams over a serial port, and TCP
// over a virtio-net card through gVisor's netstack (adapters/netstack).
//
// Like every captp adapter it is thin: it turns devices into byte streams
// (io.ReadWriteCloser) and gVisor link endpoints, and owns no protocol
// logic.
//
//   - Serial is an io.ReadWriteCloser over a UART's byte-level API (Tx, Rx),
//     which tamago's soc/intel/uart.UART provides. Its Read polls, with a
//     documented back-off (see SerialOptions).
//   - NIC is a virtio-net driver (virtio 1.x split queues) over a Transport,
//     and NewLink turns it into a gVisor link endpoint for netstack.New.
//     NewMMIO (GOOS=tamago, amd64) is the virtio-mmio transport of QEMU's
//     microvm machine.
//
// The device logic (the UART wrapper, the virtqueues, the driver and the
// link endpoint) builds on every GOOS and is tested on Linux against fake
// devices; only the register and DMA access is TamaGo-specific.
package tamago
