package netcap

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
)

// Kind says why an operation failed. It travels on the wire as the
// Failure.Kind enum and maps to the sentinel errors below.
type Kind = Failure_Kind

// The kinds of failure.
const (
	KindOther          = Failure_Kind_other
	KindDenied         = Failure_Kind_denied
	KindRefused        = Failure_Kind_refused
	KindUnreachable    = Failure_Kind_unreachable
	KindTimeout        = Failure_Kind_timeout
	KindAddressInUse   = Failure_Kind_addressInUse
	KindInvalidAddress = Failure_Kind_invalidAddress
	KindClosed         = Failure_Kind_closed
	KindLimit          = Failure_Kind_limit
	KindReset          = Failure_Kind_reset
	KindCanceled       = Failure_Kind_canceled
)

// Sentinel errors, one per Kind: errors.Is(err, ErrDenied) holds for an
// *Error of kind KindDenied, whichever side produced it.
var (
	ErrOther          = errors.New("netcap: failed")
	ErrDenied         = errors.New("netcap: denied by policy")
	ErrRefused        = errors.New("netcap: connection refused")
	ErrUnreachable    = errors.New("netcap: unreachable")
	ErrTimeout        = errors.New("netcap: timeout")
	ErrAddressInUse   = errors.New("netcap: address in use")
	ErrInvalidAddress = errors.New("netcap: invalid address")
	ErrClosed         = errors.New("netcap: closed")
	ErrLimit          = errors.New("netcap: limit reached")
	ErrReset          = errors.New("netcap: connection reset")
	ErrCanceled       = errors.New("netcap: canceled")
)

var sentinels = map[Kind]error{
	KindOther:          ErrOther,
	KindDenied:         ErrDenied,
	KindRefused:        ErrRefused,
	KindUnreachable:    ErrUnreachable,
	KindTimeout:        ErrTimeout,
	KindAddressInUse:   ErrAddressInUse,
	KindInvalidAddress: ErrInvalidAddress,
	KindClosed:         ErrClosed,
	KindLimit:          ErrLimit,
	KindReset:          ErrReset,
	KindCanceled:       ErrCanceled,
}

// Error is a typed netcap failure: a Kind and the host's description.
type Error struct {
	Kind   Kind
	Detail string
}

func (e *Error) Error() string {
	s := sentinels[e.Kind]
	if s == nil {
		s = ErrOther
	}
	if e.Detail == "" {
		return s.Error()
	}
	return s.Error() + ": " + e.Detail
}

// Is matches the sentinel of e's kind; a timeout also matches
// os.ErrDeadlineExceeded and context.DeadlineExceeded, a cancellation
// context.Canceled, and closed net.ErrClosed, as callers of net.Conn
// expect.
func (e *Error) Is(target error) bool {
	if s, ok := sentinels[e.Kind]; ok && target == s {
		return true
	}
	switch e.Kind {
	case KindTimeout:
		return target == os.ErrDeadlineExceeded || target == context.DeadlineExceeded
	case KindCanceled:
		return target == context.Canceled
	case KindClosed:
		return target == net.ErrClosed
	}
	return false
}

// Timeout reports whether e is a timeout (net.Error).
func (e *Error) Timeout() bool { return e.Kind == KindTimeout }

// Temporary is false: net.Error requires it, and no netcap failure is
// worth retrying blindly.
func (e *Error) Temporary() bool { return false }

var _ net.Error = (*Error)(nil)

func newError(k Kind, format string, args ...any) *Error {
	return &Error{Kind: k, Detail: fmt.Sprintf(format, args...)}
}

// maxDetail bounds the description a peer can make us keep or print.
const maxDetail = 1024

// fromFailure converts a Failure from the wire. A kind this version does
// not know becomes KindOther.
func fromFailure(f Failure) *Error {
	k := f.Kind()
	if _, ok := sentinels[k]; !ok {
		k = KindOther
	}
	d, _ := f.Detail()
	if len(d) > maxDetail {
		d = d[:maxDetail] + "…"
	}
	return &Error{Kind: k, Detail: d}
}

// setFailure writes e into f.
func setFailure(f Failure, e *Error) error {
	f.SetKind(e.Kind)
	return f.SetDetail(e.Detail)
}

// asError returns err as an *Error, classifying host errors (the kernel's
// or a userspace stack's) by kind.
func asError(err error) *Error {
	var ne *Error
	if errors.As(err, &ne) {
		return ne
	}
	return &Error{Kind: classify(err), Detail: err.Error()}
}

// classify finds the Kind of a host error.
func classify(err error) Kind {
	switch {
	case errors.Is(err, context.Canceled):
		return KindCanceled
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, os.ErrDeadlineExceeded):
		return KindTimeout
	case errors.Is(err, net.ErrClosed), errors.Is(err, io.ErrClosedPipe):
		return KindClosed
	}
	if k, ok := classifyErrno(err); ok {
		return k
	}
	var te interface{ Timeout() bool }
	if errors.As(err, &te) && te.Timeout() {
		return KindTimeout
	}
	var dns *net.DNSError
	if errors.As(err, &dns) {
		return KindUnreachable
	}
	// Userspace stacks (gVisor) report errors as text.
	s := strings.ToLower(err.Error())
	for _, m := range []struct {
		text string
		kind Kind
	}{
		{"connection refused", KindRefused},
		{"connection reset", KindReset},
		{"no route to host", KindUnreachable},
		{"network is unreachable", KindUnreachable},
		{"host is unreachable", KindUnreachable},
		{"address already in use", KindAddressInUse},
		{"port is in use", KindAddressInUse},
		{"timed out", KindTimeout},
		{"endpoint is closed", KindClosed},
	} {
		if strings.Contains(s, m.text) {
			return m.kind
		}
	}
	return KindOther
}
