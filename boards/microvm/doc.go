// Package microvm is the board support of captp's TamaGo images for QEMU's
// microvm machine (amd64), made to boot under TCG, without KVM.
//
// Importing it (with GOOS=tamago GOOSPKG=github.com/usbarmory/tamago) sets
// up the processor, the console on COM1, the data serial port COM2 and the
// DMA region; it differs from tamago's board/qemu/microvm in these ways:
//
//   - The system timer is the TSC, its frequency calibrated at boot against
//     the i8254 PIT (QEMU -machine microvm,pit=on: the median of 9 windows
//     of 5 ms), or against the CMOS RTC's periodic flag when there is no
//     PIT (less reliable: QEMU sets the flag from its main loop, late on a
//     loaded host), or taken from a link-time value (-X
//     ...microvm.TSCFrequency=HZ). tamago's board relies on KVM's pvclock
//     and panics under TCG; the CPUID frequency is bogus there.
//   - The idle processor halts until its next timer, woken by the local
//     APIC timer (measured against the TSC during calibration).
//   - Exit codes reach the host through QEMU's isa-debug-exit device at
//     port 0xf4: QEMU exits with status 2*code+1 (see ExitStatus).
//   - CheckEntropy checks that crypto/rand has a source (RDRAND, which
//     tamago's amd64 package uses) before a vat makes its TLS key.
//   - COM2 (0x2f8) is the data port. Its FIFO stays off: QEMU 7.2's 16550
//     in FIFO mode drops received bytes under polling (checked).
//
// Memory layout (link with -T 0x10010000 -R 0x1000): the Go runtime owns
// 0x10000000-0x50000000 and the DMA region is 0x50000000-0x60000000, so
// QEMU needs at least -m 2G.
//
// On other GOOS values the package holds only the pure logic (the
// calibration arithmetic and QEMU's exit-status mapping), which is tested
// on the build host.
package microvm

import (
	"bytes"
	"fmt"
	"slices"
)

// Ports and addresses of QEMU's microvm.
const (
	COM1Base     = 0x3f8      // console
	COM2Base     = 0x2f8      // data serial port (isa-serial,iobase=0x2f8)
	DebugExit    = 0xf4       // isa-debug-exit,iobase=0xf4,iosize=0x04
	VirtioMMIO   = 0xfeb00000 // first virtio-mmio slot; slots are 0x200 apart
	VirtioSlots  = 24
	DMAStart     = 0x50000000
	DMASize      = 0x10000000
	PITHz        = 1193182 // the i8254's input clock
	PITWindow    = 5966    // PIT ticks per calibration window: 5 ms
	PITWindows   = 9
	RTCRateHz    = 1024 // RTC periodic rate used for calibration (rate code 6)
	RTCPeriods   = 64   // periods measured: 62.5 ms
	rtcRateCode6 = 6
)

// ExitStatus converts the exit status of a QEMU process whose guest left
// through isa-debug-exit into the guest's exit code: QEMU exits with
// 2*code+1, so only odd statuses qualify (ok is false otherwise). QEMU's
// own failures exit with 1 too, the same as code 0, so a caller also needs
// to know that the guest ran (captp host: it answered on its serial port).
func ExitStatus(qemuStatus int) (code int, ok bool) {
	if qemuStatus <= 0 || qemuStatus%2 == 0 {
		return 0, false
	}
	return (qemuStatus - 1) / 2, true
}

// tscHz is the calibration arithmetic: ticks TSC counts over periods of
// an rateHz clock.
func tscHz(ticks uint64, periods, rateHz uint64) (uint64, error) {
	if periods == 0 || rateHz == 0 {
		return 0, fmt.Errorf("microvm: no calibration periods")
	}
	hz := ticks * rateHz / periods
	// Below 100 MHz or above 100 GHz the measurement is wrong (a stuck
	// RTC, a missed period); refuse it rather than run a clock 10× off.
	if hz < 100e6 || hz > 100e9 {
		return 0, fmt.Errorf("microvm: implausible TSC frequency %d Hz (%d ticks in %d/%d s)", hz, ticks, periods, rateHz)
	}
	return hz, nil
}

// medianHz returns the TSC frequency from the TSC values at consecutive
// edges of an rateHz periodic flag: the median period, because a poll the
// host delays makes one period long and the next short, and two periods
// that end between two polls look like one.
func medianHz(stamps []uint64, rateHz uint64) (uint64, error) {
	if len(stamps) < 2 {
		return 0, fmt.Errorf("microvm: %d calibration edges", len(stamps))
	}
	d := make([]uint64, 0, len(stamps)-1)
	for i := 1; i < len(stamps); i++ {
		if stamps[i] <= stamps[i-1] {
			return 0, fmt.Errorf("microvm: the TSC went backwards during calibration")
		}
		d = append(d, stamps[i]-stamps[i-1])
	}
	slices.Sort(d)
	return tscHz(d[len(d)/2], 1, rateHz)
}

// pitElapsed is the number of PIT ticks between two reads of a counter
// that counts down and wraps at 65,536.
func pitElapsed(c0, c1 uint16) uint64 { return uint64(c0 - c1) }

// medianRate returns the median of rates (TSC frequencies, one per
// window), checked for plausibility.
func medianRate(rates []uint64) (uint64, error) {
	if len(rates) == 0 {
		return 0, fmt.Errorf("microvm: no calibration windows")
	}
	r := slices.Clone(rates)
	slices.Sort(r)
	return tscHz(r[len(r)/2], 1, 1)
}

// checkSamples rejects two samples of a random source that cannot be
// random: equal, or one byte repeated throughout (a stuck source, such as
// an RDRAND that fails and leaves its register at 0 or ~0).
func checkSamples(a, b []byte) error {
	if len(a) == 0 || slices.Equal(a, b) {
		return fmt.Errorf("microvm: crypto/rand returned the same %d bytes twice", len(a))
	}
	for _, s := range [][]byte{a, b} {
		if len(s) > 1 && bytes.Count(s, s[:1]) == len(s) {
			return fmt.Errorf("microvm: crypto/rand returned %d bytes of %#02x", len(s), s[0])
		}
	}
	return nil
}
