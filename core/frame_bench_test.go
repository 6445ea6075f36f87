package core

import (
	"bytes"
	"testing"
)

// loopReader serves data over and over, at most max bytes per Read and
// never past the end of data, like a socket delivering a repeated stream.
type loopReader struct {
	data []byte
	pos  int
	max  int
}

func (l *loopReader) Read(p []byte) (int, error) {
	if l.pos == len(l.data) {
		l.pos = 0
	}
	rest := l.data[l.pos:]
	if len(rest) > l.max {
		rest = rest[:l.max]
	}
	n := copy(p, rest)
	l.pos += n
	return n, nil
}

// benchFrames reads b.N messages from frames (a whole number of frames
// repeated), served max bytes per Read.
func benchFrames(b *testing.B, data []byte, nframes, max int) {
	fr := newFrameReader(&loopReader{data: data, max: max}, Limits{})
	b.SetBytes(int64(len(data) / nframes))
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		msg, err := fr.readMessage()
		if err != nil {
			b.Fatal(err)
		}
		if msg.NumSegments() != 1 {
			b.Fatal("wrong segment count")
		}
	}
}

var benchReads = []struct {
	name string
	max  int
}{
	{"64KiB-reads", 64 << 10},
	{"whole", 1 << 30},
}

// BenchmarkFrameBig reads single-segment frames with a 1 MiB body, and
// with a 1 MiB payload plus some message around it, as in an echo call.
func BenchmarkFrameBig(b *testing.B) {
	for _, size := range []struct {
		name  string
		words uint32
	}{
		{"1MiB", 1 << 20 / 8},
		{"1MiB+128", (1<<20 + 128) / 8},
	} {
		frame := rawFrame(size.words)
		for _, r := range benchReads {
			b.Run(size.name+"/"+r.name, func(b *testing.B) { benchFrames(b, frame, 1, r.max) })
		}
	}
}

// BenchmarkFrameSmall reads a stream of single-segment frames with a 96-byte
// body, typical of calls and returns.
func BenchmarkFrameSmall(b *testing.B) {
	const n = 1000
	data := bytes.Repeat(rawFrame(12), n)
	for _, r := range benchReads {
		b.Run(r.name, func(b *testing.B) { benchFrames(b, data, n, r.max) })
	}
}
