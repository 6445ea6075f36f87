package core

import (
	"testing"
	"unsafe"
)

// The per-call objects of the native path are allocated whole
// (newNativeQuestionLocked, newNativeAnswerLocked); a few bytes more can
// move them into the next size class of Go's allocator, which costs every
// call 64 or 128 bytes of garbage. Growing past these bounds should be a
// decision, not an accident.
func TestNativeCallObjectSizes(t *testing.T) {
	for _, tc := range []struct {
		name      string
		size, max uintptr
	}{
		{"question and nativeQuestion", unsafe.Sizeof(struct {
			q question
			n nativeQuestion
		}{}), 512},
		{"answer and ServerCall", unsafe.Sizeof(struct {
			a  answer
			sc ServerCall
		}{}), 1024},
	} {
		if tc.size > tc.max {
			t.Errorf("%s: %d bytes, over the %d-byte size class", tc.name, tc.size, tc.max)
		}
	}
}
