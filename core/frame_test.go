package core

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand"
	"runtime"
	"strings"
	"testing"
	"testing/iotest"
	"unsafe"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"
)

// testMessage builds a message whose root struct holds a list of Data
// blobs of the given sizes; blob i is filled with byte(i+1). A multi-segment
// arena spills large blobs into new segments.
func testMessage(t testing.TB, multi bool, blobs ...int) *capnp.Message {
	t.Helper()
	arena := capnp.SingleSegment(nil)
	if multi {
		arena = capnp.MultiSegment(nil)
	}
	msg, seg, err := capnp.NewMessage(arena)
	if err != nil {
		t.Fatal(err)
	}
	root, err := capnp.NewRootStruct(seg, capnp.ObjectSize{PointerCount: 1})
	if err != nil {
		t.Fatal(err)
	}
	list, err := capnp.NewDataList(seg, int32(len(blobs)))
	if err != nil {
		t.Fatal(err)
	}
	if err := root.SetPtr(0, list.ToPtr()); err != nil {
		t.Fatal(err)
	}
	for i, n := range blobs {
		if err := list.Set(i, bytes.Repeat([]byte{byte(i + 1)}, n)); err != nil {
			t.Fatal(err)
		}
	}
	return msg
}

// checkTestMessage verifies the content written by testMessage.
func checkTestMessage(t testing.TB, msg *capnp.Message, blobs ...int) {
	t.Helper()
	root, err := msg.Root()
	if err != nil {
		t.Fatal(err)
	}
	p, err := root.Struct().Ptr(0)
	if err != nil {
		t.Fatal(err)
	}
	list := capnp.DataList(p.List())
	if list.Len() != len(blobs) {
		t.Fatalf("list has %d blobs, want %d", list.Len(), len(blobs))
	}
	for i, n := range blobs {
		b, err := list.At(i)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(b, bytes.Repeat([]byte{byte(i + 1)}, n)) {
			t.Fatalf("blob %d differs", i)
		}
	}
}

func mustFrame(t testing.TB, msg *capnp.Message) []byte {
	t.Helper()
	b, err := appendFrame(nil, msg)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// rawFrame builds a frame by hand: the given segment sizes in words, each
// segment filled with its index + 1.
func rawFrame(words ...uint32) []byte {
	var b []byte
	b = binary.LittleEndian.AppendUint32(b, uint32(len(words)-1))
	for _, w := range words {
		b = binary.LittleEndian.AppendUint32(b, w)
	}
	if len(words)%2 == 0 {
		b = append(b, 0, 0, 0, 0)
	}
	for i, w := range words {
		b = append(b, bytes.Repeat([]byte{byte(i + 1)}, int(w)*8)...)
	}
	return b
}

// checkFrameErr fails unless err is one of readMessage's documented kinds
// for an in-memory stream.
func checkFrameErr(t testing.TB, err error) {
	t.Helper()
	var fe *FrameError
	switch {
	case err == io.EOF:
	case errors.Is(err, io.ErrUnexpectedEOF):
	case errors.As(err, &fe):
		if fe.Reason == "" {
			t.Fatal("FrameError without a reason")
		}
	default:
		t.Fatalf("unexpected error kind %T: %v", err, err)
	}
}

func TestFrameRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name  string
		multi bool
		blobs []int
	}{
		{"single/empty-list", false, nil},
		{"single/small", false, []int{3, 100}},
		{"single/large", false, []int{200 << 10}},
		{"multi/small", true, []int{10}},
		{"multi/spilled", true, []int{2000, 5000, 20000, 100 << 10}},
		// Larger than frameGrowStep: the body buffer grows as it is read.
		{"single/huge", false, []int{3 << 20}},
		{"multi/huge", true, []int{10, 1 << 20, 2 << 20}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			msg := testMessage(t, tc.multi, tc.blobs...)
			if tc.name == "multi/spilled" && msg.NumSegments() < 3 {
				t.Fatalf("test message has %d segments; want several", msg.NumSegments())
			}
			frame := mustFrame(t, msg)
			// go-capnp's own encoding is the reference.
			want, err := msg.Marshal()
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(frame, want) {
				t.Fatal("appendFrame differs from go-capnp's Marshal")
			}

			fr := newFrameReader(bytes.NewReader(frame), Limits{})
			got, err := fr.readMessage()
			if err != nil {
				t.Fatal(err)
			}
			if got.NumSegments() != msg.NumSegments() {
				t.Fatalf("got %d segments, want %d", got.NumSegments(), msg.NumSegments())
			}
			checkTestMessage(t, got, tc.blobs...)
			checkCapped(t, got)
			if again := mustFrame(t, got); !bytes.Equal(again, frame) {
				t.Fatal("re-encoding differs")
			}
			if _, err := fr.readMessage(); err != io.EOF {
				t.Fatalf("after last frame: got %v, want io.EOF", err)
			}
		})
	}
}

func TestFrameLimitsApplied(t *testing.T) {
	frame := mustFrame(t, testMessage(t, false, 100))
	fr := newFrameReader(bytes.NewReader(frame), Limits{TraversalLimit: 3, NestingLimit: 5})
	msg, err := fr.readMessage()
	if err != nil {
		t.Fatal(err)
	}
	if msg.TraverseLimit != 24 || msg.DepthLimit != 5 {
		t.Fatalf("TraverseLimit=%d DepthLimit=%d, want 24 and 5", msg.TraverseLimit, msg.DepthLimit)
	}
	// Three words are not enough to reach the blob: the limit is enforced.
	root, err := msg.Root()
	if err == nil {
		var p capnp.Ptr
		if p, err = root.Struct().Ptr(0); err == nil {
			_, err = capnp.DataList(p.List()).At(0)
		}
	}
	if err == nil {
		t.Fatal("traversal limit of 3 words not enforced")
	}
}

func TestAppendFrameAppends(t *testing.T) {
	msg := testMessage(t, true, 10, 3000)
	frame := mustFrame(t, msg)
	prefix := []byte("prefix")
	out, err := appendFrame(prefix, msg)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out[:len(prefix)], prefix) || !bytes.Equal(out[len(prefix):], frame) {
		t.Fatal("appendFrame did not append")
	}
	if out, err := appendFrame(prefix, nil); err == nil || !bytes.Equal(out, prefix) {
		t.Fatalf("nil message: got %q, %v", out, err)
	}
}

// stream encodes a varied sequence of messages back to back.
func stream(t testing.TB) (data []byte, frames [][]byte) {
	for i := range 40 {
		var msg *capnp.Message
		switch i % 4 {
		case 0:
			msg = testMessage(t, false, i)
		case 1:
			msg = testMessage(t, true, 1500, 4000+i)
		case 2:
			frame := rawFrame(0, uint32(i), 0, 1) // zero-word segments are fine
			frames = append(frames, frame)
			data = append(data, frame...)
			continue
		case 3:
			msg = testMessage(t, true, i*1000, 70<<10) // larger than the buffer
		}
		frame := mustFrame(t, msg)
		frames = append(frames, frame)
		data = append(data, frame...)
	}
	return data, frames
}

func TestFrameManyMessages(t *testing.T) {
	data, frames := stream(t)
	for _, tc := range []struct {
		name string
		r    func(io.Reader) io.Reader
	}{
		{"whole", func(r io.Reader) io.Reader { return r }},
		{"one-byte", iotest.OneByteReader},
		{"half", iotest.HalfReader},
		{"data-err", iotest.DataErrReader},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fr := newFrameReader(tc.r(bytes.NewReader(data)), Limits{})
			for i, want := range frames {
				msg, err := fr.readMessage()
				if err != nil {
					t.Fatalf("message %d: %v", i, err)
				}
				if got := mustFrame(t, msg); !bytes.Equal(got, want) {
					t.Fatalf("message %d differs", i)
				}
				checkCapped(t, msg)
			}
			for range 2 {
				if _, err := fr.readMessage(); err != io.EOF {
					t.Fatalf("at end: got %v, want io.EOF", err)
				}
			}
		})
	}
}

// countingReader counts Read calls.
type countingReader struct {
	r     io.Reader
	reads int
}

func (c *countingReader) Read(p []byte) (int, error) {
	c.reads++
	return c.r.Read(p)
}

func TestFrameBuffersSmallMessages(t *testing.T) {
	frame := mustFrame(t, testMessage(t, false, 16))
	const n = 200
	cr := &countingReader{r: bytes.NewReader(bytes.Repeat(frame, n))}
	fr := newFrameReader(cr, Limits{})
	for range n {
		if _, err := fr.readMessage(); err != nil {
			t.Fatal(err)
		}
	}
	if max := n*len(frame)/frameBufSize + 2; cr.reads > max {
		t.Fatalf("%d Read calls for %d small messages, want at most %d", cr.reads, n, max)
	}
}

func TestFrameMessagesOwnTheirBytes(t *testing.T) {
	a := mustFrame(t, testMessage(t, false, 40))
	b := mustFrame(t, testMessage(t, false, 41))
	fr := newFrameReader(bytes.NewReader(append(append([]byte{}, a...), b...)), Limits{})
	m1, err := fr.readMessage()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fr.readMessage(); err != nil {
		t.Fatal(err)
	}
	checkTestMessage(t, m1, 40)
}

func TestFrameAllocsPerSmallMessage(t *testing.T) {
	frame := mustFrame(t, testMessage(t, false, 16))
	const n = 100
	data := bytes.Repeat(frame, n)
	r := bytes.NewReader(data)
	fr := newFrameReader(r, Limits{})
	allocs := testing.AllocsPerRun(n-1, func() {
		if _, err := fr.readMessage(); err != nil {
			t.Fatal(err)
		}
	})
	t.Logf("%.1f allocations per small message", allocs)
	// Message and arena: the read buffer is reused and bodies are carved
	// from a shared chunk.
	if allocs > 2 {
		t.Fatalf("%.1f allocations per small message, want <= 2", allocs)
	}
}

// checkCapped fails unless every segment of msg ends at its capacity, so
// that nothing written past a segment can reach another's bytes.
func checkCapped(t testing.TB, msg *capnp.Message) {
	t.Helper()
	for i := range msg.NumSegments() {
		seg, err := msg.Segment(capnp.SegmentID(i))
		if err != nil {
			t.Fatal(err)
		}
		if d := seg.Data(); d == nil || len(d) != cap(d) {
			t.Fatalf("segment %d: len %d, cap %d, nil %t", i, len(d), cap(d), d == nil)
		}
	}
}

// Small messages share a chunk; none can change another through its arena,
// its segment slices or Release.
func TestFrameSmallMessagesIsolated(t *testing.T) {
	var data []byte
	const n = 4
	for i := range n {
		data = append(data, mustFrame(t, testMessage(t, i%2 == 1, 40+i))...)
	}
	fr := newFrameReader(bytes.NewReader(data), Limits{})
	msgs := make([]*capnp.Message, n)
	for i := range msgs {
		var err error
		if msgs[i], err = fr.readMessage(); err != nil {
			t.Fatal(err)
		}
		checkCapped(t, msgs[i])
	}
	check := func(skip int) {
		t.Helper()
		for i, m := range msgs {
			if i != skip {
				checkTestMessage(t, m, 40+i)
			}
		}
	}
	seg0, err := msgs[0].Segment(0)
	if err != nil {
		t.Fatal(err)
	}
	seg1, err := msgs[1].Segment(0)
	if err != nil {
		t.Fatal(err)
	}
	d0, d1 := seg0.Data(), seg1.Data()
	// The test means something only if the bodies are neighbours.
	if end := unsafe.Add(unsafe.Pointer(unsafe.SliceData(d0)), len(d0)); end != unsafe.Pointer(unsafe.SliceData(d1)) {
		t.Fatal("consecutive small bodies are not adjacent in one chunk")
	}

	// Allocating in a message fails rather than using a neighbour's bytes.
	for i, m := range msgs {
		seg, _ := m.Segment(0)
		if _, err := capnp.NewData(seg, []byte("spill")); err == nil {
			t.Fatalf("message %d: allocation in a read message succeeded", i)
		}
		if _, err := capnp.NewStruct(seg, capnp.ObjectSize{DataSize: 8}); err == nil {
			t.Fatalf("message %d: allocation in a read message succeeded", i)
		}
	}
	check(-1)

	// Appending to a segment's bytes reallocates.
	grown := append(d0, bytes.Repeat([]byte{0xee}, 64)...)
	if unsafe.SliceData(grown) == unsafe.SliceData(d0) {
		t.Fatal("append to a segment wrote in place")
	}
	check(-1)

	// Overwriting a message in place stays within it.
	for i := range d0 {
		d0[i] = 0xff
	}
	check(0)

	msgs[1].Release()
	msgs[1] = nil
	for i, m := range msgs {
		if m != nil && i != 0 {
			checkTestMessage(t, m, 40+i)
		}
	}
}

func TestFrameEOF(t *testing.T) {
	good := rawFrame(2)
	multi := rawFrame(1, 2, 3)
	big := rawFrame(20 << 10) // 160 KiB body: read outside the buffer
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"partial first word", []byte{0, 0, 0}},
		{"partial segment table", multi[:12]},
		{"partial padding", rawFrame(1, 1)[:13]},
		{"partial body", good[:len(good)-1]},
		{"header only", good[:8]},
		{"partial large body", big[:100<<10]},
		{"after a good frame", append(append([]byte{}, good...), good[:9]...)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fr := newFrameReader(bytes.NewReader(tc.data), Limits{})
			var err error
			for err == nil {
				_, err = fr.readMessage()
			}
			if err == io.EOF || !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("got %v, want io.ErrUnexpectedEOF", err)
			}
			if _, again := fr.readMessage(); again != err {
				t.Fatalf("error not sticky: %v then %v", err, again)
			}
		})
	}

	fr := newFrameReader(bytes.NewReader(nil), Limits{})
	if _, err := fr.readMessage(); err != io.EOF {
		t.Fatalf("empty stream: got %v, want io.EOF", err)
	}
}

func TestFrameReadErrorWrapped(t *testing.T) {
	boom := errors.New("boom")
	good := rawFrame(2)
	r := io.MultiReader(bytes.NewReader(good[:10]), iotest.ErrReader(boom))
	_, err := newFrameReader(r, Limits{}).readMessage()
	if !errors.Is(err, boom) || !strings.Contains(err.Error(), "frame body") {
		t.Fatalf("got %v, want wrapped boom", err)
	}
	// A stream that yields (0, nil) forever is not spun on.
	_, err = newFrameReader(zeroReader{}, Limits{}).readMessage()
	if !errors.Is(err, io.ErrNoProgress) {
		t.Fatalf("got %v, want io.ErrNoProgress", err)
	}
}

type zeroReader struct{}

func (zeroReader) Read([]byte) (int, error) { return 0, nil }

func TestFrameViolations(t *testing.T) {
	lim := Limits{MaxMessageSize: 1024, MaxSegments: 4}
	u32 := func(v ...uint32) []byte {
		var b []byte
		for _, x := range v {
			b = binary.LittleEndian.AppendUint32(b, x)
		}
		return b
	}
	for _, tc := range []struct {
		name string
		data []byte
		want []string // substrings of the reason
	}{
		{"zero segments", u32(0xffffffff, 0), []string{"0 segments"}},
		{"too many segments", u32(4, 0), []string{"5 segments", "MaxSegments (4)"}},
		{"huge segment count", u32(0xfffffffe, 0), []string{"4294967295 segments", "MaxSegments"}},
		{"oversized single", u32(0, 128), []string{"1032 bytes", "MaxMessageSize (1024 bytes)"}},
		// Rejected from the header alone: the body never arrives.
		{"oversized multi", u32(2, 100, 100, 100), []string{"2416 bytes", "MaxMessageSize"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := newFrameReader(bytes.NewReader(tc.data), lim).readMessage()
			var fe *FrameError
			if !errors.As(err, &fe) {
				t.Fatalf("got %v, want *FrameError", err)
			}
			for _, s := range tc.want {
				if !strings.Contains(fe.Reason, s) {
					t.Errorf("reason %q does not mention %q", fe.Reason, s)
				}
			}
		})
	}

	// At the limits exactly: accepted.
	for _, data := range [][]byte{
		rawFrame(127),        // 8 + 1016 = 1024 bytes
		rawFrame(0, 0, 0, 0), // 4 segments, all empty
		rawFrame(0),
	} {
		if _, err := newFrameReader(bytes.NewReader(data), lim).readMessage(); err != nil {
			t.Errorf("%d-byte frame within limits: %v", len(data), err)
		}
	}

	// Oversized headers fail before the body, not with EOF.
	wide := Limits{MaxMessageSize: 64, MaxSegments: 100}
	_, err := newFrameReader(bytes.NewReader(u32(20, 0)), wide).readMessage()
	var fe *FrameError
	if !errors.As(err, &fe) || !strings.Contains(fe.Reason, "header") {
		t.Fatalf("got %v, want a header-size FrameError", err)
	}
}

// stallReader yields data, then calls onStall and fails with errStall,
// standing in for a peer that stops sending.
type stallReader struct {
	data    []byte
	onStall func()
}

var errStall = errors.New("stalled")

func (s *stallReader) Read(p []byte) (int, error) {
	if len(s.data) == 0 {
		s.onStall()
		return 0, errStall
	}
	n := copy(p, s.data)
	s.data = s.data[n:]
	return n, nil
}

func TestFrameStalledPeerAllocation(t *testing.T) {
	for _, sent := range []int{ // body bytes sent before stalling
		10,
		frameBufSize,
		frameGrowStep + 1, // just past a growth step: the worst ratio
		2 << 20,
	} {
		t.Run(fmt.Sprint(sent), func(t *testing.T) {
			// Declares 64 MiB (the default limit) in one segment.
			data := binary.LittleEndian.AppendUint32(nil, 0)
			data = binary.LittleEndian.AppendUint32(data, (64<<20-8)/8)
			data = append(data, make([]byte, sent)...)

			var before, during runtime.MemStats
			sr := &stallReader{data: data, onStall: func() { runtime.ReadMemStats(&during) }}
			fr := newFrameReader(sr, Limits{})
			runtime.GC()
			runtime.ReadMemStats(&before)
			_, err := fr.readMessage()
			if !errors.Is(err, errStall) {
				t.Fatalf("got %v, want the stall error", err)
			}
			if during.TotalAlloc == 0 {
				t.Fatal("reader never stalled")
			}
			used := during.TotalAlloc - before.TotalAlloc
			// The last buffer is below F × sent + 2 × step and the ones
			// before it sum to less than 1/(F-1) of it; 64 KiB covers the
			// read buffer and small allocations.
			const f = frameGrowFactor
			bound := uint64(f*(f*sent+2*frameGrowStep)/(f-1) + 64<<10)
			t.Logf("allocated %d bytes while stalled after %d body bytes (bound %d)", used, sent, bound)
			if used > bound {
				t.Fatalf("allocated %d bytes for a stalled 64 MiB frame after %d bytes, want < %d",
					used, sent, bound)
			}
		})
	}
}

func TestFrameGrowTo(t *testing.T) {
	const s, f = frameGrowStep, frameGrowFactor
	sizes := []int{0, 1, frameBufSize, s - 1, s, s + 1, 2 * s, f*s - 1, f * s, f*s + 1, 3 << 20, 64 << 20, math.MaxInt}
	for _, n := range sizes {
		for _, have := range sizes {
			if have >= n {
				continue
			}
			c := growTo(have, n)
			switch {
			case c <= have || c > n:
				t.Fatalf("growTo(%d, %d) = %d, want in (have, n]", have, n, c)
			case c < n && n-c < s:
				t.Fatalf("growTo(%d, %d) = %d leaves a tail shorter than a step", have, n, c)
			case have < (math.MaxInt-2*s)/f && c >= f*have+2*s:
				t.Fatalf("growTo(%d, %d) = %d, not below F × have + 2 × step", have, n, c)
			}
		}
	}
	// A 1 MiB payload with some message around it: one step, then the rest.
	n := 1<<20 + 128
	if c := growTo(frameBufSize, n); c != s {
		t.Fatalf("first buffer %d, want %d", c, s)
	}
	if c := growTo(s, n); c != n {
		t.Fatalf("second buffer %d, want %d", c, n)
	}
}

func TestFrameRandomBytes(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	data, _ := stream(t)
	lim := Limits{MaxMessageSize: 1 << 16, MaxSegments: 8}
	for i := range 3000 {
		var b []byte
		if i%2 == 0 {
			b = make([]byte, rng.Intn(200))
			rng.Read(b)
			if len(b) >= 4 && i%4 == 0 {
				// Plausible segment counts get past the first check.
				b[0], b[1], b[2], b[3] = byte(rng.Intn(10)), 0, 0, 0
			}
		} else {
			// Corrupt a valid stream.
			b = append([]byte{}, data[:rng.Intn(len(data))]...)
			for range 1 + rng.Intn(5) {
				if len(b) > 0 {
					b[rng.Intn(len(b))] = byte(rng.Intn(256))
				}
			}
		}
		fr := newFrameReader(bytes.NewReader(b), lim)
		for {
			msg, err := fr.readMessage()
			if err != nil {
				checkFrameErr(t, err)
				break
			}
			msg.Root() // decoding garbage must not panic either
		}
	}
}

// decodeAll reads every message of data, checking the fuzz invariants, and
// returns a transcript for comparing readers.
func decodeAll(t testing.TB, data []byte, r io.Reader) string {
	t.Helper()
	lim := Limits{MaxMessageSize: 4096, MaxSegments: 8, TraversalLimit: 1024, NestingLimit: 8}
	fr := newFrameReader(r, lim)
	var log strings.Builder
	off := 0
	for {
		msg, err := fr.readMessage()
		if err != nil {
			checkFrameErr(t, err)
			if err == io.EOF && off != len(data) {
				t.Fatalf("io.EOF after %d of %d bytes", off, len(data))
			}
			if err != io.EOF && off == len(data) {
				t.Fatalf("%v at the end of the input", err)
			}
			fmt.Fprintf(&log, "error %v", err)
			return log.String()
		}
		enc, err := appendFrame(nil, msg)
		if err != nil {
			t.Fatalf("re-encoding: %v", err)
		}
		if len(enc) > len(data)-off {
			t.Fatalf("re-encoding is %d bytes; only %d were left", len(enc), len(data)-off)
		}
		want := append([]byte{}, data[off:off+len(enc)]...)
		if nseg := binary.LittleEndian.Uint32(want) + 1; nseg%2 == 0 {
			// Header padding is ignored on input and written as zero.
			clear(want[4+4*nseg : 8+4*nseg])
		}
		if !bytes.Equal(enc, want) {
			t.Fatalf("message at %d re-encodes differently:\n got %x\nwant %x", off, enc, want)
		}
		off += len(enc)
		fmt.Fprintf(&log, "msg %d;", len(enc))
		msg.Root()
	}
}

func FuzzFrameDecode(f *testing.F) {
	f.Add([]byte{})
	f.Add(rawFrame(0))
	f.Add(rawFrame(1, 0, 2))
	f.Add(append(rawFrame(1), rawFrame(3, 1)...))
	f.Fuzz(func(t *testing.T, data []byte) {
		a := decodeAll(t, data, bytes.NewReader(data))
		b := decodeAll(t, data, iotest.OneByteReader(bytes.NewReader(data)))
		if a != b {
			t.Fatalf("result depends on read sizes:\n%s\n%s", a, b)
		}
	})
}

// The Finish frames copied from a template decode to the Finish that
// building the message would give.
func TestFinishTemplate(t *testing.T) {
	for _, rrc := range []bool{false, true} {
		for _, id := range []uint32{0, 1, 0x12345678, 0xffffffff} {
			c := newConn(nopRWC{}, nil)
			c.mu.Lock()
			c.sendFinishLocked(id, rrc)
			out := c.out
			c.mu.Unlock()
			msg, err := newFrameReader(bytes.NewReader(out), Limits{}).readMessage()
			if err != nil {
				t.Fatal(err)
			}
			m, err := rpccp.ReadRootMessage(msg)
			if err != nil || m.Which() != rpccp.Message_Which_finish {
				t.Fatalf("not a Finish: %v %v", m.Which(), err)
			}
			f, err := m.Finish()
			if err != nil {
				t.Fatal(err)
			}
			if f.QuestionId() != id || f.ReleaseResultCaps() != rrc {
				t.Errorf("Finish(%d, %v) decodes as Finish(%d, %v)", id, rrc, f.QuestionId(), f.ReleaseResultCaps())
			}
		}
	}
}

type nopRWC struct{}

func (nopRWC) Read([]byte) (int, error)    { return 0, io.EOF }
func (nopRWC) Write(p []byte) (int, error) { return len(p), nil }
func (nopRWC) Close() error                { return nil }

// Large bodies come back for reuse only once their message is recycled:
// a live message never shares its body with a newer one.
func TestFrameLargeBodyReuse(t *testing.T) {
	frame := func(fill byte) []byte {
		msg, seg := capnp.NewSingleSegmentMessage(nil)
		defer msg.Release()
		d := make([]byte, 300<<10)
		for i := range d {
			d[i] = fill
		}
		data, err := capnp.NewData(seg, d)
		if err != nil {
			t.Fatal(err)
		}
		if err := msg.SetRoot(data.ToPtr()); err != nil {
			t.Fatal(err)
		}
		b, err := appendFrame(nil, msg)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	var stream []byte
	for i := range 4 {
		stream = append(stream, frame(byte(i+1))...)
	}
	fr := newFrameReader(bytes.NewReader(stream), Limits{})
	fr.bodies = new(bodyPool) // not shared with other tests' connections
	recycleMessage := func(msg *capnp.Message) {
		msg.Reset(nil)
		fr.bodies.giveBack(msg)
	}
	read := func(want byte) (*capnp.Message, *byte) {
		t.Helper()
		msg, err := fr.readMessage()
		if err != nil {
			t.Fatal(err)
		}
		root, err := msg.Root()
		if err != nil {
			t.Fatal(err)
		}
		d := root.Data()
		if len(d) != 300<<10 || d[0] != want || d[len(d)-1] != want {
			t.Fatalf("message %d: wrong body", want)
		}
		seg, _ := msg.Segment(0)
		return msg, &seg.Data()[0]
	}
	a, pa := read(1)
	b, pb := read(2)
	if pa == pb {
		t.Fatal("two live messages share a body")
	}
	recycleMessage(a)
	c, pc := read(3)
	if pc == pb {
		t.Fatal("a live message's body was lent again")
	}
	if pc != pa {
		t.Error("the recycled body was not reused for the next large frame")
	}
	recycleMessage(b)
	recycleMessage(c)
	d, _ := read(4)
	recycleMessage(d)
}

// A large body's last read also takes in the next frame's header (read
// ahead into spare room), so a stream of large frames costs one Read per
// frame when the transport has the bytes, not two.
func TestFrameReadAhead(t *testing.T) {
	var data []byte
	var frames [][]byte
	for i := range 10 {
		frame := mustFrame(t, testMessage(t, true, i*7, 100<<10))
		frames = append(frames, frame)
		data = append(data, frame...)
	}
	cr := &countingReader{r: bytes.NewReader(data)}
	fr := newFrameReader(cr, Limits{})
	for i, want := range frames {
		msg, err := fr.readMessage()
		if err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		if got := mustFrame(t, msg); !bytes.Equal(got, want) {
			t.Fatalf("message %d differs", i)
		}
	}
	if _, err := fr.readMessage(); err != io.EOF {
		t.Fatalf("at end: %v", err)
	}
	// The first frame's header takes one read of its own, then one read
	// per frame (the body plus the next header), then EOF.
	if cr.reads > len(frames)+3 {
		t.Errorf("%d reads for %d large frames; want about one per frame", cr.reads, len(frames))
	}
}

// largestReadRecorder records the largest buffer a Read was given.
type largestReadRecorder struct {
	r       io.Reader
	largest int
}

func (l *largestReadRecorder) Read(p []byte) (int, error) {
	l.largest = max(l.largest, len(p))
	return l.r.Read(p)
}

// Large bodies are read in pieces below memmove's non-temporal threshold
// (maxReadBytes), whether read once (readLargeAhead) or as a stream of
// equal frames (bulk mode), and still arrive whole.
func TestFrameReadsBelowNonTemporalCopies(t *testing.T) {
	sizes := [][]int{{3 << 20}, {1 << 20}, {1 << 20}, {1 << 20}, {16}, {(1 << 20) + 100}}
	var stream []byte
	for _, s := range sizes {
		stream = append(stream, mustFrame(t, testMessage(t, false, s...))...)
	}
	rec := &largestReadRecorder{r: bytes.NewReader(stream)}
	fr := newFrameReader(rec, Limits{})
	fr.bodies = new(bodyPool)
	for _, s := range sizes {
		msg, err := fr.readMessage()
		if err != nil {
			t.Fatal(err)
		}
		checkTestMessage(t, msg, s...)
		msg.Reset(nil)
		fr.bodies.giveBack(msg)
	}
	if rec.largest > maxReadBytes {
		t.Fatalf("a Read was given %d bytes, want at most %d: memmove copies 1 MiB or more past the cache", rec.largest, maxReadBytes)
	}
	if maxReadBytes >= 1<<20 {
		t.Fatalf("maxReadBytes = %d reaches memmove's non-temporal threshold (1 MiB)", maxReadBytes)
	}
}
