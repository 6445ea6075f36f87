//go:build tamago && amd64

package microvm

import (
	"errors"
	"fmt"
	"math"
	"runtime/goos"
	"strconv"
	_ "unsafe" // go:linkname

	"github.com/usbarmory/tamago/amd64"
	"github.com/usbarmory/tamago/amd64/lapic"
	"github.com/usbarmory/tamago/dma"
	"github.com/usbarmory/tamago/soc/intel/uart"
)

// defined in port_amd64.s
func outb(port uint16, val uint8)
func outl(port uint16, val uint32)
func inb(port uint16) uint8
func mmioRead32(addr uintptr) uint32
func mmioWrite32(addr uintptr, val uint32)

// TSCFrequency, when set at link time (-ldflags "-X
// github.com/captp-go/captp/boards/microvm.TSCFrequency=3000000000"), is
// the TSC frequency in Hz and skips the calibration at boot.
var TSCFrequency string

// Peripherals.
var (
	// AMD64 is the boot processor.
	AMD64 = &amd64.CPU{TimerMultiplier: 1}
	// COM1 is the console (printk, os.Stdout).
	COM1 = &uart.UART{Index: 1, Base: COM1Base}
	// COM2 is the data serial port; adapters/tamago.NewSerial wraps it.
	COM2 = &uart.UART{Index: 2, Base: COM2Base}
)

// TSCHz is the TSC frequency the system timer runs on (0 if calibration
// failed).
var TSCHz uint64

// CalibrationError is why the boot calibration failed, empty when it did
// not; the board then runs on tamago's CPUID-based estimate.
var CalibrationError string

//go:linkname ramSize runtime/goos.RamSize
var ramSize uint64 = 0x40000000 // 1 GiB from RamStart (0x10000000)

//go:linkname printk runtime/goos.Printk
func printk(c byte) { COM1.Tx(c) }

//go:linkname nanotime runtime/goos.Nanotime
func nanotime() int64 { return AMD64.GetTime() }

// hwinit1 runs early in the runtime's start-up.
//
//go:linkname hwinit1 runtime/goos.Hwinit1
func hwinit1() {
	AMD64.Init()
	COM1.Init()
	COM2.Init()

	hz, err := tscFrequency()
	if err != nil {
		CalibrationError = err.Error()
	} else {
		TSCHz = hz
		AMD64.TimerMultiplier = 1e9 / float64(hz)
		AMD64.SetTime(0)
	}

	goos.Exit = exit
	goos.Idle = idle
}

func init() {
	AMD64.EnableExceptions()
	if err := dma.Init(DMAStart, DMASize); err != nil {
		print("microvm: DMA region: ", err.Error(), "\n")
	}
	if lapicHz != 0 {
		// ServiceInterrupts installs the interrupt gates, vector 255
		// (the APIC timer's wake-up) included, then parks its goroutine
		// for good: no other interrupt is unmasked.
		go AMD64.ServiceInterrupts(nil)
	}
}

// exit reports code through isa-debug-exit; without that device the
// write is ignored and a triple fault ends the machine (QEMU -no-reboot).
func exit(code int32) {
	outl(DebugExit, uint32(code))
	amd64.Fault()
}

// idle is the runtime's idle hook, called when no goroutine can run
// until pollUntil (a timer; MaxInt64 for none). The processor halts until
// then, woken by the local APIC timer, so an idle vat costs the host
// little CPU even though serial and network reads poll with sleeps. (TCG
// has no TSC-deadline timer, which tamago's CPU.SetAlarm needs.)
//
// The timer runs in periodic mode, with the time left as its period: if
// it fires between being armed and the HLT, the next period still wakes
// the processor (a late wake-up, never a lost one). It is stopped once
// the processor is awake. Without a calibrated APIC timer the scheduler
// spins until the timer instead, as tamago's default does.
func idle(pollUntil int64) {
	if pollUntil == math.MaxInt64 {
		AMD64.WaitInterrupt()
		return
	}
	if lapicHz == 0 {
		return
	}
	d := pollUntil - nanotime()
	if d < minHalt {
		return // not worth a halt, and a tiny period would flood QEMU
	}
	d = min(d, 4e9) // the counter is 32 bits; waking early is harmless
	count := min(uint64(d)*lapicHz/1e9, math.MaxUint32)
	lapicWrite(lapicInitialCount, uint32(max(count, 1)))
	AMD64.WaitInterrupt()
	lapicWrite(lapicInitialCount, 0)
}

// minHalt is the shortest wait for which idle halts the processor.
const minHalt = 20_000 // ns

// Local APIC timer registers (Intel SDM 3A, 11.5.4).
const (
	lapicInitialCount = 0x380
	lapicCurrentCount = 0x390
	lapicDivide       = 0x3e0
	lapicDivideBy1    = 0b1011
)

func lapicWrite(off uintptr, v uint32) { mmioWrite32(amd64.LAPIC_BASE+off, v) }
func lapicRead(off uintptr) uint32     { return mmioRead32(amd64.LAPIC_BASE + off) }

// lapicHz is the APIC timer's rate, measured with the TSC calibration; 0
// if unknown.
var lapicHz uint64

func tscFrequency() (uint64, error) {
	if TSCFrequency != "" {
		hz, err := strconv.ParseUint(TSCFrequency, 10, 64)
		if err != nil {
			return 0, err
		}
		return tscHz(hz, 1, 1)
	}
	return calibrate()
}

// CMOS RTC registers.
const (
	cmosAddr   = 0x70
	cmosData   = 0x71
	nmiDisable = 0x80
	rtcA       = 0x0a
	rtcB       = 0x0b
	rtcC       = 0x0c
	rtcBPIE    = 0x40 // periodic interrupt enable (QEMU runs the periodic timer only with it)
	rtcCPF     = 0x40 // periodic flag, cleared by reading C
)

func cmosRead(r uint8) uint8 {
	outb(cmosAddr, nmiDisable|r)
	return inb(cmosData)
}

func cmosWrite(r, v uint8) {
	outb(cmosAddr, nmiDisable|r)
	outb(cmosData, v)
}

// calibrate measures the TSC against the i8254 PIT (QEMU -machine
// ...,pit=on) or, without one, the CMOS RTC's periodic flag, and the APIC
// timer against the TSC over the same time. It runs once, before any
// goroutine, so polling here is the measurement itself.
func calibrate() (uint64, error) {
	// The APIC timer counts down from its maximum meanwhile, masked
	// (nothing to deliver).
	AMD64.LAPIC.Enable()
	lapicWrite(lapicDivide, lapicDivideBy1)
	AMD64.LAPIC.SetTimer(amd64.IRQ_WAKEUP, lapic.TIMER_MODE_ONE_SHOT)
	lapicWrite(lapic.LAPIC_LVT_TIMER, lapicRead(lapic.LAPIC_LVT_TIMER)|lvtMasked)
	lapicWrite(lapicInitialCount, math.MaxUint32)
	defer lapicWrite(lapicInitialCount, 0)
	apic0, tsc0 := lapicRead(lapicCurrentCount), AMD64.Counter()

	hz, err := calibratePIT()
	if err != nil {
		var rtcErr error
		if hz, rtcErr = calibrateRTC(); rtcErr != nil {
			return 0, fmt.Errorf("%w; %w", err, rtcErr)
		}
	}
	apic1, tsc1 := lapicRead(lapicCurrentCount), AMD64.Counter()
	if apic1 != 0 && apic1 < apic0 && tsc1 > tsc0 {
		lapicHz = uint64(float64(apic0-apic1) * float64(hz) / float64(tsc1-tsc0))
		AMD64.LAPIC.SetTimer(amd64.IRQ_WAKEUP, lapic.TIMER_MODE_PERIODIC)
	}
	return hz, nil
}

// i8254 PIT ports.
const (
	pitCh0 = 0x40
	pitCmd = 0x43
)

func pitRead() uint16 {
	outb(pitCmd, 0x00) // latch channel 0
	lo := inb(pitCh0)
	hi := inb(pitCh0)
	return uint16(hi)<<8 | uint16(lo)
}

// pitSample returns a PIT count and the TSC at the moment of its read:
// of a few reads, the one whose bracketing TSC reads are closest (the
// processor may be descheduled by the host in between).
func pitSample() (tsc uint64, count uint16) {
	best := uint64(math.MaxUint64)
	for range 4 {
		t0 := AMD64.Counter()
		c := pitRead()
		t1 := AMD64.Counter()
		if t1-t0 < best {
			best, tsc, count = t1-t0, t0+(t1-t0)/2, c
		}
	}
	return tsc, count
}

// calibratePIT measures the TSC over PITWindows windows of PITWindow PIT
// ticks and takes the median rate. QEMU computes the PIT's count from its
// clock when it is read, and the TCG guest's TSC is the host's, so a
// window in which the host deschedules the guest is still measured right;
// only one longer than the 55 ms wrap is not, which the median discards.
func calibratePIT() (uint64, error) {
	outb(pitCmd, 0x34) // channel 0, lo/hi byte, mode 2, binary
	outb(pitCh0, 0)    // reload 65536
	outb(pitCh0, 0)
	var rates [PITWindows]uint64
	for w := range rates {
		t0, c0 := pitSample()
		start := t0
		for {
			t1, c1 := pitSample()
			if n := pitElapsed(c0, c1); n >= PITWindow {
				rates[w] = (t1 - t0) * PITHz / n
				break
			}
			if t1-start > 1e9 { // 0.1-1 s: the count does not move
				return 0, errors.New("microvm: no i8254 PIT (QEMU -machine ...,pit=on)")
			}
		}
	}
	return medianRate(rates[:])
}

// calibrateRTC times RTCPeriods periods of the RTC's periodic flag with
// the TSC and takes the median. The RTC's IRQ 8 stays masked in the I/O
// APIC: only the flag in register C is read. QEMU sets the flag from its
// main loop, so a loaded host delays it: the PIT is preferred.
func calibrateRTC() (uint64, error) {
	a, b := cmosRead(rtcA), cmosRead(rtcB)
	cmosWrite(rtcA, a&0xf0|rtcRateCode6)
	cmosWrite(rtcB, b|rtcBPIE)
	cmosRead(rtcC)
	defer func() {
		cmosWrite(rtcB, b)
		cmosWrite(rtcA, a)
		cmosRead(rtcC)
	}()
	if !waitPeriod() { // align to an edge
		return 0, errRTC
	}
	var stamps [RTCPeriods + 1]uint64
	stamps[0] = AMD64.Counter()
	for i := 1; i < len(stamps); i++ {
		if !waitPeriod() {
			return 0, errRTC
		}
		stamps[i] = AMD64.Counter()
	}
	return medianHz(stamps[:], RTCRateHz)
}

// lvtMasked masks an APIC local vector table entry.
const lvtMasked = 1 << 16

var errRTC = rtcError("microvm: the CMOS RTC's periodic flag does not tick (QEMU -machine ...,rtc=on)")

type rtcError string

func (e rtcError) Error() string { return string(e) }

// waitPeriod waits for the periodic flag, giving up after about ten
// periods' worth of TSC ticks at 10 GHz.
func waitPeriod() bool {
	start := AMD64.Counter()
	for AMD64.Counter()-start < 100_000_000 {
		if cmosRead(rtcC)&rtcCPF != 0 {
			return true
		}
	}
	return false
}

// APICTimerHz is the rate of the local APIC timer that wakes the idle
// processor, or 0 if the board could not measure it (it then spins while
// idle).
func APICTimerHz() uint64 { return lapicHz }
