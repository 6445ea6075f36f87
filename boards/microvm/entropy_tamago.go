//go:build tamago && amd64

package microvm

import (
	"crypto/rand"
	"errors"
	"fmt"
)

// defined in port_amd64.s
func cpuid(leaf, sub uint32) (eax, ebx, ecx, edx uint32)

// cpuidRDRAND is CPUID.01H:ECX.RDRAND.
const cpuidRDRAND = 1 << 30

// CheckEntropy reports whether crypto/rand works on this machine, before
// a vat generates its TLS key with it. tamago's amd64 package feeds
// crypto/rand from RDRAND, which QEMU's TCG emulates with the host's
// getrandom (-cpu max has it); a processor model without RDRAND would
// fault on the first read, and a broken one would return constants.
func CheckEntropy() error {
	if _, _, ecx, _ := cpuid(1, 0); ecx&cpuidRDRAND == 0 {
		return errors.New("microvm: the processor has no RDRAND, crypto/rand's only source (QEMU: -cpu max)")
	}
	var a, b [32]byte
	if _, err := rand.Read(a[:]); err != nil {
		return fmt.Errorf("microvm: crypto/rand: %w", err)
	}
	if _, err := rand.Read(b[:]); err != nil {
		return fmt.Errorf("microvm: crypto/rand: %w", err)
	}
	return checkSamples(a[:], b[:])
}
