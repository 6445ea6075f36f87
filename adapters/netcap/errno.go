//go:build unix || windows

package netcap

import (
	"errors"
	"syscall"
)

// classifyErrno classifies the kernel's errors.
func classifyErrno(err error) (Kind, bool) {
	var errno syscall.Errno
	if !errors.As(err, &errno) {
		return 0, false
	}
	switch errno {
	case syscall.ECONNREFUSED:
		return KindRefused, true
	case syscall.ECONNRESET, syscall.EPIPE, syscall.ECONNABORTED:
		return KindReset, true
	case syscall.EHOSTUNREACH, syscall.ENETUNREACH, syscall.EHOSTDOWN, syscall.ENETDOWN:
		return KindUnreachable, true
	case syscall.EADDRINUSE:
		return KindAddressInUse, true
	case syscall.EADDRNOTAVAIL, syscall.EINVAL:
		return KindInvalidAddress, true
	case syscall.ETIMEDOUT:
		return KindTimeout, true
	case syscall.EACCES, syscall.EPERM:
		return KindDenied, true
	}
	return 0, false
}
