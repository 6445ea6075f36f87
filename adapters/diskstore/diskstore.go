// Package diskstore is a sturdyref.Store on disk: the persistent services
// of a vat survive restarts, crashes and power loss.
//
// It is an append-only log with fsync: each Put or Delete appends one
// checksummed record and syncs the file before returning, so a
// successful call is durable. Open replays the log into memory; a record
// torn by a crash at the end of the log is cut off (the call that wrote it
// never returned), while a damaged record in the middle is reported as an
// error, never skipped silently. When dead records (replaced or deleted)
// outweigh live ones, the log is compacted: the live records are written
// to a new file, synced, and renamed over the old one, so a crash at any
// point leaves one complete log.
//
// Why not bbolt, pebble or SQLite: a restorer's store holds a few small
// records per persistent service and is read once at start; an
// append-only log does that in a couple of hundred lines of the standard
// library, its crash safety follows from append + fsync + rename, and it
// adds no module, no cgo and no mmap (bbolt's mmap and pebble's size are
// at odds with TamaGo and wasm builds of the rest of the project). The
// whole store lives in memory, which bounds it to what a vat can hold:
// MaxRecordSize per record.
//
// Keys are SHA-256 digests of service IDs (sturdyref.Key): the file never
// holds an ID, so reading it, or a backup of it, does not give away
// capabilities. One process at a time may open a store.
package diskstore

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"

	"github.com/captp-go/captp/core/sturdyref"
)

// MaxRecordSize bounds one record's Kind plus Data.
const MaxRecordSize = 1 << 20

const (
	magic     = "captp-store-v1\n"
	headerLen = 8 // body length, CRC-32C of body
	opPut     = 1
	opDelete  = 2
	// compactMin: below this much dead data, never compact.
	compactMin = 64 << 10
)

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// ErrCorrupt is wrapped by Open's error for a damaged log.
var ErrCorrupt = errors.New("diskstore: corrupt log")

// Store is the on-disk store. Its methods are safe for concurrent use.
type Store struct {
	path string
	log  *slog.Logger

	mu        sync.Mutex
	f         *os.File
	size      int64 // bytes in the log
	liveBytes int64 // bytes of the records that are current
	recs      map[sturdyref.Key]entry
	closed    bool
}

type entry struct {
	rec  sturdyref.Record
	size int64 // the log record's size
}

var _ sturdyref.Store = (*Store)(nil)

// Options configure Open.
type Options struct {
	// Logger reports a cut torn tail and compactions. Nil discards.
	Logger *slog.Logger
}

// Open opens (creating if needed) the store in the file at path and
// replays it.
func Open(path string, opts *Options) (*Store, error) {
	s := &Store{path: path, recs: make(map[sturdyref.Key]entry)}
	if opts != nil && opts.Logger != nil {
		s.log = opts.Logger
	} else {
		s.log = slog.New(slog.DiscardHandler)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("diskstore: open: %w", err)
	}
	s.f = f
	if err := s.replay(); err != nil {
		f.Close()
		return nil, err
	}
	if err := s.maybeCompact(); err != nil {
		f.Close()
		return nil, err
	}
	return s, nil
}

// replay reads the log into memory, writing the header of a new file and
// cutting a torn last record.
func (s *Store) replay() error {
	fi, err := s.f.Stat()
	if err != nil {
		return fmt.Errorf("diskstore: stat: %w", err)
	}
	total := fi.Size()
	if total == 0 {
		if _, err := s.f.Write([]byte(magic)); err != nil {
			return fmt.Errorf("diskstore: write header: %w", err)
		}
		if err := s.f.Sync(); err != nil {
			return fmt.Errorf("diskstore: sync: %w", err)
		}
		s.size = int64(len(magic))
		return syncDir(s.path)
	}
	r := bufio.NewReader(io.NewSectionReader(s.f, 0, total))
	head := make([]byte, len(magic))
	if _, err := io.ReadFull(r, head); err != nil || string(head) != magic {
		return fmt.Errorf("%w: %s is not a captp store (bad header)", ErrCorrupt, s.path)
	}
	off := int64(len(magic))
	for off < total {
		body, n, err := readRecord(r, total-off)
		if err == nil {
			err = s.apply(body, n)
		}
		if err == nil {
			off += n
			continue
		}
		if !(errors.Is(err, errTorn) && isTail(off, n, total)) && !s.zeros(off, total) {
			return fmt.Errorf("%w: %s at offset %d: %v (data follows it, so this is damage rather than an interrupted write; restore the file from a backup)", ErrCorrupt, s.path, off, err)
		}
		s.log.Warn("diskstore: cutting a torn record at the end of the log (a write interrupted by a crash)", "path", s.path, "offset", off, "bytes", total-off)
		if err := s.f.Truncate(off); err != nil {
			return fmt.Errorf("diskstore: cut torn tail: %w", err)
		}
		if err := s.f.Sync(); err != nil {
			return fmt.Errorf("diskstore: sync: %w", err)
		}
		break
	}
	s.size = off
	return nil
}

// isTail reports whether a bad record at off, n bytes long as far as its
// header says, is the last thing in the log.
func isTail(off, n, total int64) bool { return n <= 0 || off+n >= total }

// zeros reports whether the log is all zero bytes from off to total: file
// systems may extend a file before the data of an interrupted write lands.
func (s *Store) zeros(off, total int64) bool {
	buf := make([]byte, 32<<10)
	for off < total {
		n, err := s.f.ReadAt(buf[:min(int64(len(buf)), total-off)], off)
		for _, b := range buf[:n] {
			if b != 0 {
				return false
			}
		}
		if err != nil && n == 0 {
			return false
		}
		off += int64(n)
	}
	return true
}

var errTorn = errors.New("incomplete or damaged record")

// readRecord reads one record; n is its size as its header declares (0
// if the header itself is cut).
func readRecord(r *bufio.Reader, left int64) (body []byte, n int64, err error) {
	var h [headerLen]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return nil, 0, fmt.Errorf("%w: header cut", errTorn)
	}
	ln := int64(binary.BigEndian.Uint32(h[:4]))
	n = headerLen + ln
	if ln > MaxRecordSize+64 {
		// Never written by us, even torn: damage.
		return nil, n, fmt.Errorf("record declares %d bytes, more than a record can hold", ln)
	}
	if n > left {
		return nil, n, fmt.Errorf("%w: body cut", errTorn)
	}
	body = make([]byte, ln)
	if _, err := io.ReadFull(r, body); err != nil {
		return nil, n, fmt.Errorf("%w: body cut", errTorn)
	}
	if crc32.Checksum(body, crcTable) != binary.BigEndian.Uint32(h[4:]) {
		return nil, n, fmt.Errorf("%w: checksum mismatch", errTorn)
	}
	return body, n, nil
}

// apply replays one record body of n log bytes.
func (s *Store) apply(body []byte, n int64) error {
	if len(body) < 1+len(sturdyref.Key{}) {
		return errors.New("record too short")
	}
	var k sturdyref.Key
	copy(k[:], body[1:])
	rest := body[1+len(k):]
	old, had := s.recs[k]
	switch body[0] {
	case opPut:
		kl, m := binary.Uvarint(rest)
		if m <= 0 || kl > uint64(len(rest)-m) {
			return errors.New("bad kind length")
		}
		rec := sturdyref.Record{Kind: string(rest[m : m+int(kl)]), Data: append([]byte{}, rest[m+int(kl):]...)}
		if had {
			s.liveBytes -= old.size
		}
		s.recs[k] = entry{rec: rec, size: n}
		s.liveBytes += n
	case opDelete:
		if len(rest) != 0 {
			return errors.New("bad delete record")
		}
		if had {
			s.liveBytes -= old.size
			delete(s.recs, k)
		}
	default:
		return fmt.Errorf("unknown record type %d", body[0])
	}
	return nil
}

func encode(op byte, k sturdyref.Key, rec sturdyref.Record) []byte {
	body := []byte{op}
	body = append(body, k[:]...)
	if op == opPut {
		body = binary.AppendUvarint(body, uint64(len(rec.Kind)))
		body = append(body, rec.Kind...)
		body = append(body, rec.Data...)
	}
	out := make([]byte, headerLen, headerLen+len(body))
	binary.BigEndian.PutUint32(out[:4], uint32(len(body)))
	binary.BigEndian.PutUint32(out[4:], crc32.Checksum(body, crcTable))
	return append(out, body...)
}

// Put implements sturdyref.Store: rec is on disk when it returns.
func (s *Store) Put(ctx context.Context, k sturdyref.Key, rec sturdyref.Record) error {
	if len(rec.Kind)+len(rec.Data) > MaxRecordSize {
		return fmt.Errorf("diskstore: record of %d bytes is larger than %d", len(rec.Kind)+len(rec.Data), MaxRecordSize)
	}
	b := encode(opPut, k, rec)
	return s.append(ctx, b, func() error { return s.apply(b[headerLen:], int64(len(b))) })
}

// Delete implements sturdyref.Store: the deletion is on disk when it
// returns.
func (s *Store) Delete(ctx context.Context, k sturdyref.Key) error {
	s.mu.Lock()
	_, had := s.recs[k]
	s.mu.Unlock()
	if !had {
		return nil
	}
	rec := encode(opDelete, k, sturdyref.Record{})
	return s.append(ctx, rec, func() error { return s.apply(rec[headerLen:], int64(len(rec))) })
}

// append writes and syncs one record, then applies it to memory.
func (s *Store) append(ctx context.Context, rec []byte, apply func() error) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("diskstore: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errors.New("diskstore: store closed")
	}
	if _, err := s.f.WriteAt(rec, s.size); err != nil {
		// Whatever part was written is a torn tail: cut it now.
		s.f.Truncate(s.size)
		return fmt.Errorf("diskstore: write: %w", err)
	}
	if err := s.f.Sync(); err != nil {
		s.f.Truncate(s.size)
		return fmt.Errorf("diskstore: sync: %w", err)
	}
	s.size += int64(len(rec))
	if err := apply(); err != nil {
		return fmt.Errorf("diskstore: %w", err)
	}
	if err := s.maybeCompact(); err != nil {
		// The record is durable; a failed compaction only wastes space.
		s.log.Error("diskstore: compaction failed", "path", s.path, "err", err)
	}
	return nil
}

// Get implements sturdyref.Store.
func (s *Store) Get(_ context.Context, k sturdyref.Key) (sturdyref.Record, bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return sturdyref.Record{}, false, errors.New("diskstore: store closed")
	}
	e, ok := s.recs[k]
	if !ok {
		return sturdyref.Record{}, false, nil
	}
	return sturdyref.Record{Kind: e.rec.Kind, Data: append([]byte{}, e.rec.Data...)}, true, nil
}

// Len returns the number of records.
func (s *Store) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.recs)
}

// maybeCompact rewrites the log when dead records outweigh live ones.
func (s *Store) maybeCompact() error {
	dead := s.size - int64(len(magic)) - s.liveBytes
	if dead < compactMin || dead < s.liveBytes {
		return nil
	}
	return s.compact()
}

// compact writes the live records to a new file and renames it over the
// log; s.mu is held (or s is not shared yet).
func (s *Store) compact() error {
	tmp, err := os.CreateTemp(filepath.Dir(s.path), ".compact-"+filepath.Base(s.path)+"-*")
	if err != nil {
		return fmt.Errorf("diskstore: compact: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	w := bufio.NewWriter(tmp)
	w.WriteString(magic)
	size := int64(len(magic))
	recs := make(map[sturdyref.Key]entry, len(s.recs))
	for k, e := range s.recs {
		b := encode(opPut, k, e.rec)
		w.Write(b)
		recs[k] = entry{rec: e.rec, size: int64(len(b))}
		size += int64(len(b))
	}
	if err := w.Flush(); err != nil {
		return fmt.Errorf("diskstore: compact: %w", err)
	}
	if err := tmp.Chmod(0o600); err != nil {
		return fmt.Errorf("diskstore: compact: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("diskstore: compact: %w", err)
	}
	if err := os.Rename(tmp.Name(), s.path); err != nil {
		return fmt.Errorf("diskstore: compact: %w", err)
	}
	ok = true
	if err := syncDir(s.path); err != nil {
		s.log.Warn("diskstore: sync directory after compaction", "err", err)
	}
	s.log.Info("diskstore: compacted", "path", s.path, "from", s.size, "to", size)
	s.f.Close()
	s.f = tmp
	s.size = size
	s.liveBytes = size - int64(len(magic))
	s.recs = recs
	return nil
}

// syncDir makes a new or renamed file's directory entry durable.
func syncDir(path string) error {
	d, err := os.Open(filepath.Dir(path))
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// Close closes the file; later calls fail.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	return s.f.Close()
}
