//go:build unix

// Package testsock gives tests and benchmarks a connected pair of Unix
// stream sockets as net.Conns (a kernel socket without a listener or a
// path).
package testsock

import (
	"net"
	"os"
	"syscall"
	"testing"
)

// Pair returns the two ends of a new socketpair. The caller closes them.
func Pair(tb testing.TB) (net.Conn, net.Conn) {
	tb.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		tb.Fatalf("socketpair: %v", err)
	}
	var conns [2]net.Conn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		conns[i], err = net.FileConn(f)
		f.Close()
		if err != nil {
			tb.Fatalf("socketpair: %v", err)
		}
	}
	return conns[0], conns[1]
}
