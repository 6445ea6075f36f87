//go:build !linux

package main

import "os/exec"

// detachQEMU leaves QEMU in captp host's process group: a terminal's
// Ctrl-C reaches it too (it then exits with status 0, which captp host
// reports as not having gone through isa-debug-exit). See the Linux
// version.
func detachQEMU(*exec.Cmd) {}
