package main

import (
	"os/exec"
	"syscall"
)

// detachQEMU puts QEMU in a process group of its own, so that a
// terminal's Ctrl-C reaches only captp host, which then closes the
// guest's serial connection and lets the vat exit with its own status
// (instead of QEMU dying of the signal); and has the kernel kill QEMU if
// captp host dies without closing it, which would leave the guest
// running with nobody to stop it.
func detachQEMU(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}
