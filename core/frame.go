package core

// Standard Cap'n Proto stream framing
// (https://capnproto.org/encoding.html#serialization-over-a-stream):
//
//	(4 bytes) segment count - 1, little-endian uint32
//	(N * 4 bytes) size of each segment in 8-byte words
//	(0 or 4 bytes) padding to a word boundary
//	segment contents, in order

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"sync"
	"sync/atomic"

	"capnproto.org/go/capnp/v3"
)

// FrameError is a violation of stream framing or of the inbound size limits
// by the peer. Reason is the text sent to the peer in the Abort message.
type FrameError struct {
	Reason string
}

// Error returns the reason prefixed with "frame: ".
func (e *FrameError) Error() string { return "frame: " + e.Reason }

func frameErrorf(format string, args ...any) *FrameError {
	return &FrameError{Reason: fmt.Sprintf(format, args...)}
}

const (
	// frameBufSize is the reusable read buffer. Most RPC messages and every
	// header within the default segment limit fit, so reading them takes
	// one Read call for several messages rather than several per message.
	frameBufSize = 8 << 10
	// readAheadFrom is the body size from which the reader reads past the
	// frame's end (see readLargeAhead): bulk streams, where a few KiB of
	// spare room per body cost nothing next to the read they save.
	readAheadFrom = 64 << 10

	// Small bodies are carved out of a shared chunk, one allocation per
	// chunk rather than per message. The GC keeps a chunk alive while any
	// message carved from it lives, so one retained message can pin up to
	// frameChunkSize: 4096 calls held by handlers could pin 64 MiB if other
	// traffic spreads them over as many chunks. That is why the chunk is
	// small; a peer could pin more with large messages anyway. A body too
	// big for the rest of the chunk starts a new one, wasting < 1/8 of it.
	frameChunkSize = 16 << 10
	frameSmallBody = frameChunkSize / 8

	// A body larger than buf is read into a buffer that grows as bytes
	// arrive: its capacity stays below frameGrowFactor × the bytes arrived
	// + 2 × frameGrowStep, so a peer that declares a huge frame and then
	// stalls costs little memory. Few, large steps mean little copying: a
	// 1 MiB body takes two allocations and one 256 KiB copy.
	frameGrowStep      = 256 << 10
	frameGrowFactor    = 4
	frameFastGrowLimit = 1 << 20

	// maxReadBytes caps one Read. Go's memmove copies 1 MiB or more with
	// non-temporal stores, which bypass the CPU cache. An in-memory
	// transport (net.Pipe) copies a writer's segment straight into our
	// buffer, so a 1 MiB body read in one piece would land in RAM, and
	// whoever uses it next (a handler, or the Return that echoes it) would
	// read it back from there: half the speed of two cached half copies.
	// A kernel socket seldom returns more per read, and one more read per
	// 512 KiB costs little next to copying them.
	maxReadBytes = 512 << 10

	// maxSegmentBytes is the largest segment go-capnp can address.
	maxSegmentBytes = 1<<32 - 8

	// maxEmptyReads: like bufio, give up on a Reader that keeps returning
	// (0, nil) instead of spinning forever.
	maxEmptyReads = 100

	// maxSmallInBulk small frames in a row end bulk mode (a stream's
	// chunks come with a Finish or Return or two between them).
	maxSmallInBulk = 8
	// maxBulkBody is the largest body size bulk mode reads into: the
	// reader holds such a buffer while it waits for the peer.
	maxBulkBody = 1 << 20
	// bulkRound rounds bulk buffer sizes up, so that streams whose
	// frames differ by a few bytes reuse the same pooled buffers.
	bulkRound = 32 << 10
)

// frameReader splits a byte stream into Cap'n Proto messages, enforcing
// Limits. It buffers reads internally, so it may consume bytes from r beyond
// the current frame. Errors are sticky: once readMessage fails (including
// io.EOF) it returns the same error forever, since the stream position is
// no longer at a frame boundary.
type frameReader struct {
	r   io.Reader
	lim Limits

	buf        []byte // allocated on first use; len(buf) == frameBufSize
	rpos, wpos int    // unread bytes are buf[rpos:wpos]
	rerr       error  // error from r, reported once the buffered bytes run out

	chunk  []byte    // unused rest of the chunk that small bodies are carved from
	large  []byte    // the whole buffer of the large body just read, to lend out
	bodies *bodyPool // where large bodies are lent from: largeBodies but in tests

	sizes []uint32 // segment sizes in words of the frame being read; reused
	err   error    // sticky result

	// Bulk mode (a stream of large frames): once a large body has been
	// read, the next read with nothing buffered goes into a body-sized
	// buffer rather than buf, so that one read brings the next frame's
	// header and as much of its body as the socket holds, and the body is
	// then completed in place (readBulkBody) instead of being read 8 KiB
	// first and copied. small keeps buf's own array meanwhile.
	bulk      int    // size of the last large body; 0: not streaming
	smallRun  int    // small frames since the last large one
	small     []byte // buf's own array while buf is a bulk buffer
	bulkBytes []byte // the whole bulk buffer while buf is one
}

// newFrameReader returns a frameReader reading from r. Zero fields of lim
// take their defaults.
func newFrameReader(r io.Reader, lim Limits) *frameReader {
	return &frameReader{r: r, lim: lim.withDefaults(), bodies: &largeBodies}
}

// readMessage returns the next message. The message owns its bytes (small
// ones share an array with other messages, but each segment is capped at
// its own end) and is read-only (its arena cannot allocate).
//
// Errors:
//   - io.EOF itself when the stream ends cleanly at a frame boundary;
//   - an error wrapping io.ErrUnexpectedEOF when it ends inside a frame;
//   - *FrameError when the frame breaks the format or the Limits;
//   - other read errors, wrapped with context.
func (fr *frameReader) readMessage() (*capnp.Message, error) {
	if fr.err != nil {
		return nil, fr.err
	}
	msg, err := fr.next()
	if err != nil {
		fr.err = err
		fr.buf, fr.chunk, fr.sizes = nil, nil, nil // nothing more will be read
		fr.small, fr.bulkBytes, fr.bulk = nil, nil, 0
		fr.rpos, fr.wpos = 0, 0
		return nil, err
	}
	return msg, nil
}

func (fr *frameReader) next() (*capnp.Message, error) {
	if fr.buffered() == 0 && fr.bulk > 0 && fr.small == nil && fr.rerr == nil {
		fr.startBulk()
	}
	msg, err := fr.nextFrame()
	if err == nil && fr.small != nil {
		fr.endBulk()
	}
	return msg, err
}

// startBulk makes buf a buffer that holds a body of the last large size
// and the frame around it, and reads into it.
func (fr *frameReader) startBulk() {
	// Room for small frames and a header before the body (a Finish or
	// two, say), the body, and the read-ahead after it; rounded up, so
	// that bodies differing by a few bytes reuse each other's buffers.
	size := (fr.bulk + 2*frameBufSize + bulkRound - 1) / bulkRound * bulkRound
	b := fr.bodies.get(size)
	if b == nil {
		b = make([]byte, size)
	}
	b = b[:cap(b)]
	if fr.buf == nil {
		fr.buf = make([]byte, frameBufSize)
	}
	fr.small, fr.bulkBytes = fr.buf, b
	fr.buf, fr.rpos, fr.wpos = b, 0, 0
	// No more than a body and frameBufSize: a body of the last size then
	// ends within frameBufSize of what is read, so readBulkBody completes
	// it in place.
	fr.wpos = fr.read(b[:min(len(b), fr.bulk+frameBufSize)])
}

// endBulk goes back to the small buffer once what is buffered fits it
// (a frame was completed in place or nothing is left), giving the bulk
// buffer back unless a message was lent it.
func (fr *frameReader) endBulk() {
	if fr.buffered() > len(fr.small) {
		return // several small frames read at once: stay until they are consumed
	}
	n := copy(fr.small, fr.buf[fr.rpos:fr.wpos])
	if fr.bulkBytes != nil {
		fr.bodies.put(fr.bulkBytes)
	}
	fr.buf, fr.small, fr.bulkBytes = fr.small, nil, nil
	fr.rpos, fr.wpos = 0, n
}

func (fr *frameReader) nextFrame() (*capnp.Message, error) {
	// First word: segment count - 1 and the size of segment 0.
	if err := fr.fill(8); err != nil {
		if err == io.EOF && fr.buffered() == 0 {
			return nil, io.EOF
		}
		return nil, readError("frame header", err)
	}
	nseg := uint64(binary.LittleEndian.Uint32(fr.buf[fr.rpos:])) + 1
	if nseg == 1<<32 {
		// The count wraps to zero in the wire's uint32.
		return nil, frameErrorf("frame declares 0 segments")
	}
	if int64(nseg) > int64(fr.lim.MaxSegments) {
		return nil, frameErrorf("frame has %d segments, more than MaxSegments (%d)", nseg, fr.lim.MaxSegments)
	}
	hdrSize := (nseg/2 + 1) * 8 // 4 + 4*nseg, padded to a word
	if hdrSize > fr.lim.MaxMessageSize {
		return nil, frameErrorf("frame header of %d bytes exceeds MaxMessageSize (%d bytes)", hdrSize, fr.lim.MaxMessageSize)
	}
	if hdrSize > math.MaxInt {
		return nil, frameErrorf("frame header of %d bytes is too large for this platform", hdrSize)
	}

	// Header. Within the default limits it fits in buf; a larger one (a
	// raised MaxSegments) is read like a large body, as it arrives.
	var hdr []byte
	if hdrSize <= frameBufSize {
		if err := fr.fill(int(hdrSize)); err != nil {
			return nil, readError("frame header", err)
		}
		hdr = fr.buf[fr.rpos : fr.rpos+int(hdrSize)]
		fr.rpos += int(hdrSize)
	} else {
		var err error
		if hdr, err = fr.readLarge(int(hdrSize)); err != nil {
			return nil, readError("frame header", err)
		}
		fr.large = nil // copied out below; not the message's
	}

	// Sizes. hdr may alias buf, so copy them out before reading the body.
	// The sum cannot overflow: at most 2^32 segments of < 2^32 bytes each.
	fr.sizes = fr.sizes[:0]
	total := hdrSize
	for i := range nseg {
		w := binary.LittleEndian.Uint32(hdr[4+4*i:])
		if uint64(w)*8 > maxSegmentBytes {
			return nil, frameErrorf("segment %d has %d words, more than a segment can address", i, w)
		}
		fr.sizes = append(fr.sizes, w)
		total += uint64(w) * 8
	}
	if total > fr.lim.MaxMessageSize {
		return nil, frameErrorf("frame of %d bytes exceeds MaxMessageSize (%d bytes)", total, fr.lim.MaxMessageSize)
	}
	bodySize := total - hdrSize
	if bodySize > math.MaxInt {
		return nil, frameErrorf("frame body of %d bytes is too large for this platform", bodySize)
	}

	// Body: one slice holding every segment, owned by this message alone,
	// so the message stays valid while buf is reused.
	body, err := fr.readBody(int(bodySize))
	if err != nil {
		return nil, readError("frame body", err)
	}
	switch {
	case bodySize >= readAheadFrom && bodySize <= maxBulkBody:
		fr.bulk, fr.smallRun = int(bodySize), 0
	case bodySize > maxBulkBody:
		fr.bulk = 0 // an idle reader should not hold so much
	case fr.bulk > 0:
		// Stop reading into bulk buffers once the stream has ended.
		if fr.smallRun++; fr.smallRun > maxSmallInBulk {
			fr.bulk = 0
		}
	}

	var msg *capnp.Message
	if nseg == 1 {
		// A reused Message struct and arena (see recycleMessage); body
		// is non-nil, so Reset cannot fail. The arena is read-only: the
		// core never writes into a peer's message.
		msg = messagePool.Get().(*capnp.Message)
		_, _ = msg.Reset(inboundArena(body))
	} else {
		segs := make([][]byte, nseg)
		off := 0
		for i, w := range fr.sizes {
			end := off + int(w)*8
			// Cap each segment so that no arena write can spill into the next.
			segs[i] = body[off:end:end]
			off = end
		}
		msg, _ = capnp.NewMultiSegmentMessage(segs)
	}
	if fr.large != nil {
		fr.bodies.lend(msg, fr.large)
		fr.large = nil
	}
	msg.TraverseLimit = traverseBytes(fr.lim.TraversalLimit)
	msg.DepthLimit = 0 // go-capnp's default
	if fr.lim.NestingLimit > 0 {
		msg.DepthLimit = uint(fr.lim.NestingLimit)
	}
	return msg, nil
}

// traverseBytes converts a limit in words to go-capnp's limit in bytes.
func traverseBytes(words uint64) uint64 {
	if words > math.MaxUint64/8 {
		return math.MaxUint64
	}
	return words * 8
}

// readError gives a read failure context; the end of the stream inside a
// frame becomes io.ErrUnexpectedEOF.
func readError(what string, err error) error {
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("read %s: %w", what, err)
}

func (fr *frameReader) buffered() int { return fr.wpos - fr.rpos }

// fill reads until at least n (<= frameBufSize) bytes are buffered. It reads
// as much as r offers into the free space, so later frames may already be
// buffered when this one is complete.
func (fr *frameReader) fill(n int) error {
	if fr.buffered() >= n {
		return nil
	}
	fr.compact() // fewer than n bytes remain, so this copy is cheap
	for fr.buffered() < n {
		if fr.rerr != nil {
			return fr.rerr
		}
		fr.wpos += fr.read(fr.buf[fr.wpos:])
	}
	return nil
}

// peekFrame reports whether readMessage can return the next message
// without reading (it is wholly buffered, or readMessage will report an
// error), and whether the next frame fits buf, so that readSome can
// complete it. A frame that does not fit, or a stream of large frames, is
// left to the read loop (see readForCaller).
func (fr *frameReader) peekFrame() (complete, fits bool) {
	if fr.err != nil || fr.rerr != nil {
		return true, true
	}
	if fr.small != nil || fr.bulk > 0 {
		return false, false
	}
	have := fr.buffered()
	if have < 8 {
		return false, true
	}
	b := fr.buf[fr.rpos:fr.wpos]
	nseg := uint64(binary.LittleEndian.Uint32(b)) + 1
	if nseg == 1<<32 || int64(nseg) > int64(fr.lim.MaxSegments) {
		return true, true // readMessage reports it
	}
	total := (nseg/2 + 1) * 8
	if total > frameBufSize {
		return false, false
	}
	if uint64(have) < total {
		return false, true
	}
	for i := range nseg {
		total += uint64(binary.LittleEndian.Uint32(b[4+4*i:])) * 8
	}
	if total > frameBufSize {
		return false, false
	}
	return uint64(have) >= total, true
}

// compact allocates buf on first use and moves the unread bytes to its
// start, making room to read into.
func (fr *frameReader) compact() {
	if fr.buf == nil {
		fr.buf = make([]byte, frameBufSize)
	}
	if fr.rpos > 0 {
		copy(fr.buf, fr.buf[fr.rpos:fr.wpos])
		fr.wpos -= fr.rpos
		fr.rpos = 0
	}
}

// readSome makes one Read into buf's free space, after moving the unread
// bytes to its start, and returns the Read's result without recording an
// error: the caller decides whether it ends the stream (rerr). The caller
// has checked with peekFrame that the next frame fits buf and is not
// complete, so there is free space.
func (fr *frameReader) readSome() (int, error) {
	fr.compact()
	free := fr.buf[fr.wpos:]
	n, err := fr.r.Read(free)
	if n < 0 || n > len(free) {
		return 0, errors.New("reader returned an invalid count")
	}
	fr.wpos += n
	return n, err
}

// readBody consumes the n-byte frame body and returns it in a slice with
// len == cap == n that shares no bytes with any other message: a capped
// slice means an arena that appends to a segment reallocates instead of
// writing into its neighbour.
func (fr *frameReader) readBody(n int) ([]byte, error) {
	if n >= readAheadFrom {
		if end := fr.rpos + n + frameBufSize; fr.bulkBytes != nil && end <= len(fr.buf) && fr.wpos <= end {
			return fr.readBulkBody(n)
		}
		return fr.readLargeAhead(n, frameBufSize)
	}
	if n > frameBufSize {
		return fr.readLarge(n)
	}
	if err := fr.fill(n); err != nil {
		return nil, err
	}
	src := fr.buf[fr.rpos : fr.rpos+n]
	fr.rpos += n
	switch {
	case n == 0:
		// Non-nil (a nil segment gets a writable arena), and pins no chunk.
		return []byte{}, nil
	case n > frameSmallBody:
		// append copies without zeroing first.
		return append([]byte(nil), src...)[:n:n], nil
	}
	if n > len(fr.chunk) {
		fr.chunk = make([]byte, frameChunkSize)
	}
	body := fr.chunk[:n:n]
	fr.chunk = fr.chunk[n:]
	copy(body, src)
	return body, nil
}

// readBulkBody completes the n-byte body that starts at rpos in the bulk
// buffer, in place, reading up to frameBufSize past it (see
// readLargeAhead), lends the bulk buffer with the message, and goes back
// to the small buffer with what follows the body (the caller checked that
// it fits).
func (fr *frameReader) readBulkBody(n int) ([]byte, error) {
	end := fr.rpos + n
	for fr.wpos < end {
		if fr.rerr != nil {
			return nil, fr.rerr
		}
		fr.wpos += fr.read(fr.buf[fr.wpos : end+frameBufSize])
	}
	body := fr.buf[fr.rpos:end:end]
	k := copy(fr.small, fr.buf[end:fr.wpos])
	fr.large = fr.bulkBytes
	fr.buf, fr.small, fr.bulkBytes = fr.small, nil, nil
	fr.rpos, fr.wpos = 0, k
	return body, nil
}

// readLarge consumes n (> frameBufSize) bytes and returns them in a new
// slice with len == cap == n. It takes what is buffered, then reads straight
// into the result, never past the end of the frame, growing the result only
// as bytes arrive (see frameGrowStep): a declared size alone allocates
// little.
func (fr *frameReader) readLarge(n int) ([]byte, error) {
	return fr.readLargeAhead(n, 0)
}

// readLargeAhead is readLarge that may also read up to ahead bytes past
// the frame, into spare room after it, and keeps them in buf for the next
// frame: a large body's last read then usually brings the next frame's
// header too, which saves a read (and often a wait for the socket) per
// frame of a bulk stream.
func (fr *frameReader) readLargeAhead(n, ahead int) ([]byte, error) {
	have := fr.buffered()
	if have >= n {
		// Only from a bulk buffer: the whole body is there already.
		out := append([]byte(nil), fr.buf[fr.rpos:fr.rpos+n]...)
		fr.rpos += n
		return out[:n:n], nil
	}
	want := n + ahead // capacity that makes the read-ahead possible
	var out []byte
	if b := fr.bodies.get(want); b != nil {
		// A body recycled with its message: no allocation, no zeroing,
		// and no memory that the peer's bytes have not earned already.
		out = b[:have]
	} else {
		out = make([]byte, have, growTo(have, want))
	}
	copy(out, fr.buf[fr.rpos:fr.wpos])
	fr.rpos, fr.wpos = 0, 0
	limit := n
	for len(out) < n {
		if fr.rerr != nil {
			return nil, fr.rerr
		}
		if len(out) == cap(out) {
			// Growing by a factor keeps the copying linear in the frame size.
			out = grow(out, growTo(len(out), want))
		}
		if ahead > 0 && cap(out) >= want {
			limit = want
		}
		// The allocator may have rounded cap up past n.
		m := fr.read(out[len(out):min(cap(out), limit)])
		out = out[:len(out)+m]
	}
	if extra := len(out) - n; extra > 0 {
		fr.wpos = copy(fr.buf, out[n:])
	}
	fr.large = out[:cap(out)]
	return out[:n:n], nil
}

// growTo is the next capacity of a buffer holding have of n bytes:
// frameGrowFactor × have (at least frameGrowStep) up to frameFastGrowLimit,
// doubling beyond, so a stalled peer that sent 1 MiB of a huge frame costs
// at most about 3 MiB; and n when that would leave less than
// frameGrowStep to go (a short tail, such as the message around a 1 MiB
// payload, is not worth another allocation and copy).
func growTo(have, n int) int {
	if have > n/2 { // also keeps the products below from overflowing
		return n
	}
	c := 2 * have
	if have < frameFastGrowLimit {
		c = max(frameGrowStep, min(frameGrowFactor*have, frameFastGrowLimit))
	}
	if c > n-frameGrowStep {
		return n
	}
	return c
}

// grow returns a copy of b with capacity c > len(b), without overshooting
// much: the array stays alive as long as the message.
func grow(b []byte, c int) []byte {
	if c > 2*len(b) {
		// Exact (to a size class) for so large a step, and unlike make
		// it does not zero the bytes that the copy overwrites.
		return slices.Grow(b, c-len(b))
	}
	// slices.Grow would round a smaller step up by as much as a quarter.
	out := make([]byte, len(b), c)
	copy(out, b)
	return out
}

// read makes one successful Read into p (len(p) > 0), recording any error
// in fr.rerr. It returns the number of bytes read, at most maxReadBytes.
func (fr *frameReader) read(p []byte) int {
	if len(p) > maxReadBytes {
		p = p[:maxReadBytes]
	}
	for range maxEmptyReads {
		n, err := fr.r.Read(p)
		if n < 0 || n > len(p) {
			fr.rerr = errors.New("reader returned an invalid count")
			return 0
		}
		if err != nil {
			fr.rerr = err
			return n
		}
		if n > 0 {
			return n
		}
	}
	fr.rerr = io.ErrNoProgress
	return 0
}

// growOutput makes room for n more bytes in an output buffer. Past
// 64 KiB it at least doubles the capacity: append grows large slices in
// steps of about 1.25×, which leave some four times the final size
// behind as garbage while a backlog builds (a peer that stops reading
// fills 16 MiB of queue, and the discarded buffers pushed a server's RSS
// past 64 MB before the collector caught up).
func growOutput(buf []byte, n int) []byte {
	if cap(buf)-len(buf) >= n {
		return buf
	}
	newCap := max(len(buf)+n, 2*cap(buf))
	if newCap < 64<<10 {
		return slices.Grow(buf, n)
	}
	out := make([]byte, len(buf), newCap)
	copy(out, buf)
	return out
}

// appendFrame appends msg's stream encoding (segment table, then segments)
// to buf. On error buf is returned unchanged.
func appendFrame(buf []byte, msg *capnp.Message) ([]byte, error) {
	if msg == nil || msg.Arena == nil {
		return buf, errors.New("encode frame: nil message")
	}
	nseg := msg.NumSegments()
	if nseg < 1 || nseg > 1<<32 {
		return buf, fmt.Errorf("encode frame: message has %d segments", nseg)
	}
	hdrSize := (nseg/2 + 1) * 8
	size := uint64(hdrSize)
	for i := range nseg {
		seg, err := msg.Segment(capnp.SegmentID(i))
		if err != nil {
			return buf, fmt.Errorf("encode frame: %w", err)
		}
		n := len(seg.Data())
		if n%8 != 0 || uint64(n) > maxSegmentBytes {
			return buf, fmt.Errorf("encode frame: segment %d has invalid size %d bytes", i, n)
		}
		size += uint64(n)
	}
	if size > uint64(math.MaxInt-len(buf)) {
		return buf, fmt.Errorf("encode frame: %d bytes is too large", size)
	}

	out := growOutput(buf, int(size))
	out = binary.LittleEndian.AppendUint32(out, uint32(nseg-1))
	for i := range nseg {
		seg, _ := msg.Segment(capnp.SegmentID(i)) // checked above
		out = binary.LittleEndian.AppendUint32(out, uint32(len(seg.Data())/8))
	}
	if nseg%2 == 0 {
		out = append(out, 0, 0, 0, 0)
	}
	for i := range nseg {
		seg, _ := msg.Segment(capnp.SegmentID(i))
		out = append(out, seg.Data()...)
	}
	return out, nil
}

// appendFrameHeader appends the segment table of a frame with segments
// segs (whose bytes the caller writes after it).
func appendFrameHeader(buf []byte, segs [][]byte) ([]byte, error) {
	if len(segs) < 1 {
		return buf, errors.New("encode frame: message has no segments")
	}
	out := binary.LittleEndian.AppendUint32(buf, uint32(len(segs)-1))
	for i, seg := range segs {
		if len(seg)%8 != 0 || uint64(len(seg)) > maxSegmentBytes {
			return buf, fmt.Errorf("encode frame: segment %d has invalid size %d bytes", i, len(seg))
		}
		out = binary.LittleEndian.AppendUint32(out, uint32(len(seg)/8))
	}
	if len(segs)%2 == 0 {
		out = append(out, 0, 0, 0, 0)
	}
	return out, nil
}

// largeBodies keeps the buffers of large inbound frame bodies for reuse:
// each is lent with its message and comes back when recycleMessage
// releases that message. Streams and big calls then read into memory that
// is already there instead of fresh, zeroed allocations that the garbage
// collector must chase. Bounded: at most maxLentBodies (and maxLentBytes)
// are tracked and maxFreeBodies (maxFreeBodyBytes) kept free, process-wide; a message
// released some other way just never gives its buffer back.
var largeBodies bodyPool

const (
	maxLentBodies    = 1024
	maxLentBytes     = 64 << 20
	maxFreeBodies    = 64 // get scans the free list; keep the scan short
	maxFreeBodyBytes = 16 << 20
)

type bodyPool struct {
	mu        sync.Mutex
	lent      map[*capnp.Message][]byte
	lentBytes int
	free      [][]byte
	freeBytes int
	nlent     atomic.Int32 // len(lent), checked without the lock
}

// get returns a free buffer (len 0) that holds n bytes without wasting
// more than n, or nil.
func (p *bodyPool) get(n int) []byte {
	p.mu.Lock()
	defer p.mu.Unlock()
	// The best fit, and of equal fits the one given back last: its bytes
	// are likeliest still in the CPU's cache (a stream that releases each
	// body before the next arrives reads into the same buffer every time).
	best := -1
	for i, b := range p.free {
		if cap(b) >= n && cap(b) <= 2*n && (best < 0 || cap(b) <= cap(p.free[best])) {
			best = i
		}
	}
	if best < 0 {
		return nil
	}
	b := p.free[best]
	p.free = slices.Delete(p.free, best, best+1) // keeps the order of the rest
	p.freeBytes -= cap(b)
	return b[:0]
}

// put gives back a buffer that no message holds.
func (p *bodyPool) put(buf []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.keepLocked(buf)
}

// keepLocked adds buf to the free list. When the list is full, the
// buffers given back longest ago make room: they belong to an earlier
// workload (say 1 MiB echoes), and keeping them would leave every body
// of the current one (256 KiB stream chunks) a fresh allocation.
func (p *bodyPool) keepLocked(buf []byte) {
	if cap(buf) > maxFreeBodyBytes {
		return
	}
	drop := 0
	for drop < len(p.free) && (len(p.free)-drop >= maxFreeBodies || p.freeBytes+cap(buf) > maxFreeBodyBytes) {
		p.freeBytes -= cap(p.free[drop])
		drop++
	}
	if drop > 0 {
		n := copy(p.free, p.free[drop:])
		clear(p.free[n:])
		p.free = p.free[:n]
	}
	p.free = append(p.free, buf[:0])
	p.freeBytes += cap(buf)
}

// lend records that msg's body is buf.
func (p *bodyPool) lend(msg *capnp.Message, buf []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.lent) >= maxLentBodies || p.lentBytes+cap(buf) > maxLentBytes {
		return
	}
	if p.lent == nil {
		p.lent = make(map[*capnp.Message][]byte)
	}
	p.lent[msg] = buf
	p.lentBytes += cap(buf)
	p.nlent.Store(int32(len(p.lent)))
}

// giveBack takes back the body lent with msg, which has been released.
func (p *bodyPool) giveBack(msg *capnp.Message) {
	if p.nlent.Load() == 0 {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	buf, ok := p.lent[msg]
	if !ok {
		return
	}
	delete(p.lent, msg)
	p.lentBytes -= cap(buf)
	p.nlent.Store(int32(len(p.lent)))
	p.keepLocked(buf)
}
