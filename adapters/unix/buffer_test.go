//go:build linux

package unix

import (
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/captp-go/captp/internal/testsock"
)

// sockBuf reads a socket's SO_SNDBUF and SO_RCVBUF.
func sockBuf(t *testing.T, c net.Conn) (snd, rcv int) {
	t.Helper()
	raw, err := c.(syscall.Conn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr, rerr error
	if err := raw.Control(func(fd uintptr) {
		snd, serr = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF)
		rcv, rerr = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF)
	}); err != nil {
		t.Fatal(err)
	}
	if serr != nil || rerr != nil {
		t.Fatalf("getsockopt: %v, %v", serr, rerr)
	}
	return snd, rcv
}

// sysctlInt reads a number from /proc/sys, or returns 0.
func sysctlInt(name string) int {
	b, err := os.ReadFile("/proc/sys/net/core/" + name)
	if err != nil {
		return 0
	}
	n, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return n
}

// Unix domain sockets get DefaultSocketBuffer (as far as the kernel's
// caps allow; Linux reports twice what was set), WithSocketBuffer sets
// another size, and WithSocketBuffer(0) leaves the kernel's defaults.
func TestSocketBufferUnix(t *testing.T) {
	a, b := testsock.Pair(t)
	defer a.Close()
	defer b.Close()
	if _, ok := a.(*net.UnixConn); !ok {
		t.Fatalf("testsock.Pair gave %T, not a Unix socket", a)
	}
	snd0, rcv0 := sockBuf(t, a)
	config{}.wrap(a)
	snd, rcv := sockBuf(t, a)
	wantSnd := min(DefaultSocketBuffer, max(sysctlInt("wmem_max"), 1))
	if wantSnd > snd0/2 && snd < wantSnd {
		t.Errorf("default: SO_SNDBUF %d (was %d); want at least %d", snd, snd0, wantSnd)
	}
	wantRcv := min(DefaultSocketBuffer, max(sysctlInt("rmem_max"), 1))
	if wantRcv > rcv0/2 && rcv < wantRcv {
		t.Errorf("default: SO_RCVBUF %d (was %d); want at least %d", rcv, rcv0, wantRcv)
	}

	newConfig([]Option{WithSocketBuffer(64 << 10)}).wrap(b)
	if snd, rcv := sockBuf(t, b); snd < 64<<10 || snd > 256<<10 || rcv < 64<<10 || rcv > 256<<10 {
		t.Errorf("WithSocketBuffer(64 KiB): SO_SNDBUF %d, SO_RCVBUF %d; want about 128 KiB", snd, rcv)
	}

	c, d := testsock.Pair(t)
	defer c.Close()
	defer d.Close()
	snd0, rcv0 = sockBuf(t, c)
	newConfig([]Option{WithSocketBuffer(0)}).wrap(c)
	if snd, rcv := sockBuf(t, c); snd != snd0 || rcv != rcv0 {
		t.Errorf("WithSocketBuffer(0): buffers %d/%d; want the kernel's %d/%d", snd, rcv, snd0, rcv0)
	}
}

// TCP sockets keep the kernel's automatic tuning unless asked.
func TestSocketBufferTCP(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	c, err := net.Dial("tcp", lis.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := lis.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	snd0, rcv0 := sockBuf(t, c)
	config{}.wrap(c)
	if snd, rcv := sockBuf(t, c); snd != snd0 || rcv != rcv0 {
		t.Errorf("TCP by default: buffers %d/%d; want the kernel's %d/%d", snd, rcv, snd0, rcv0)
	}
	newConfig([]Option{WithSocketBuffer(96 << 10)}).wrap(s)
	if snd, _ := sockBuf(t, s); snd < 96<<10 || snd > 384<<10 {
		t.Errorf("TCP WithSocketBuffer(96 KiB): SO_SNDBUF %d; want about 192 KiB", snd)
	}
}
