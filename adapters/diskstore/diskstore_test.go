package diskstore_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"go.uber.org/goleak"

	"github.com/captp-go/captp/adapters/diskstore"
	"github.com/captp-go/captp/core/sturdyref"
)

func TestMain(m *testing.M) {
	if os.Getenv("DISKSTORE_CHILD") != "" {
		os.Exit(child())
	}
	goleak.VerifyTestMain(m)
}

// child is another process: it stores a record and exits without
// closing the store (as a killed process would).
func child() int {
	s, err := diskstore.Open(os.Getenv("DISKSTORE_CHILD"), nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if err := s.Put(context.Background(), sturdyref.KeyOf([]byte("child")), sturdyref.Record{Kind: "k", Data: []byte("from another process")}); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	os.Exit(0) // no Close
	return 0
}

func open(t *testing.T, path string) *diskstore.Store {
	t.Helper()
	s, err := diskstore.Open(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func get(t *testing.T, s *diskstore.Store, id string) (sturdyref.Record, bool) {
	t.Helper()
	rec, ok, err := s.Get(context.Background(), sturdyref.KeyOf([]byte(id)))
	if err != nil {
		t.Fatal(err)
	}
	return rec, ok
}

func TestSurvivesReopen(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "store")
	s := open(t, path)
	s.Put(ctx, sturdyref.KeyOf([]byte("a")), sturdyref.Record{Kind: "echo", Data: []byte{0, 1, 2}})
	s.Put(ctx, sturdyref.KeyOf([]byte("b")), sturdyref.Record{Kind: "echo", Data: []byte("b1")})
	s.Put(ctx, sturdyref.KeyOf([]byte("b")), sturdyref.Record{Kind: "echo", Data: []byte("b2")})
	s.Put(ctx, sturdyref.KeyOf([]byte("c")), sturdyref.Record{Kind: "x"})
	s.Delete(ctx, sturdyref.KeyOf([]byte("c")))
	s.Close()

	s2 := open(t, path)
	if rec, ok := get(t, s2, "a"); !ok || rec.Kind != "echo" || !bytes.Equal(rec.Data, []byte{0, 1, 2}) {
		t.Fatalf("a = %+v, %v", rec, ok)
	}
	if rec, ok := get(t, s2, "b"); !ok || string(rec.Data) != "b2" {
		t.Fatalf("b = %+v, %v; want the last Put", rec, ok)
	}
	if _, ok := get(t, s2, "c"); ok {
		t.Fatal("deleted record came back")
	}
	if s2.Len() != 2 {
		t.Fatalf("Len %d", s2.Len())
	}
}

// The file holds the SHA-256 of service IDs, never the IDs.
func TestFileHoldsNoServiceIDs(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store")
	s := open(t, path)
	id := []byte("a-secret-service-id-that-must-not-be-on-disk")
	if err := s.Put(context.Background(), sturdyref.KeyOf(id), sturdyref.Record{Kind: "k", Data: []byte("state")}); err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(path)
	key := sturdyref.KeyOf(id)
	if bytes.Contains(data, id) || !bytes.Contains(data, key[:]) || !bytes.Contains(data, []byte("state")) {
		t.Fatalf("file %q: want the key and the state, not the ID", data)
	}
}

// A record written by a process that exits without Close is there.
func TestSurvivesProcessExit(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store")
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "DISKSTORE_CHILD="+path)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	s := open(t, path)
	if rec, ok := get(t, s, "child"); !ok || string(rec.Data) != "from another process" {
		t.Fatalf("child's record: %+v, %v", rec, ok)
	}
}

// Cutting the log anywhere inside its last record (a crash mid-append)
// loses only that record; every earlier one survives, and the store
// works afterwards.
func TestTornTailIsCut(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	path := filepath.Join(dir, "store")
	s := open(t, path)
	s.Put(ctx, sturdyref.KeyOf([]byte("a")), sturdyref.Record{Kind: "k", Data: []byte("first")})
	fi, _ := os.Stat(path)
	good := fi.Size()
	s.Put(ctx, sturdyref.KeyOf([]byte("b")), sturdyref.Record{Kind: "k", Data: []byte("second")})
	s.Close()
	full, _ := os.ReadFile(path)
	for cut := good + 1; cut < int64(len(full)); cut++ {
		p := filepath.Join(dir, fmt.Sprintf("cut%d", cut))
		os.WriteFile(p, full[:cut], 0o600)
		s, err := diskstore.Open(p, nil)
		if err != nil {
			t.Fatalf("cut at %d: %v", cut, err)
		}
		if _, ok, _ := s.Get(ctx, sturdyref.KeyOf([]byte("a"))); !ok {
			t.Fatalf("cut at %d lost the earlier record", cut)
		}
		if _, ok, _ := s.Get(ctx, sturdyref.KeyOf([]byte("b"))); ok {
			t.Fatalf("cut at %d kept the torn record", cut)
		}
		if err := s.Put(ctx, sturdyref.KeyOf([]byte("c")), sturdyref.Record{Kind: "k"}); err != nil {
			t.Fatal(err)
		}
		s.Close()
		s, err = diskstore.Open(p, nil)
		if err != nil {
			t.Fatalf("reopen after cut at %d: %v", cut, err)
		}
		if _, ok, _ := s.Get(ctx, sturdyref.KeyOf([]byte("c"))); !ok {
			t.Fatalf("record written after the cut at %d is gone", cut)
		}
		s.Close()
	}
	// Zeros after the last good record (an extended but unwritten file).
	p := filepath.Join(dir, "zeros")
	os.WriteFile(p, append(full[:good:good], make([]byte, 100)...), 0o600)
	s, err := diskstore.Open(p, nil)
	if err != nil {
		t.Fatalf("zero tail: %v", err)
	}
	s.Close()
}

// Damage in the middle of the log is an error naming the offset, not a
// silent loss or a panic.
func TestCorruptionIsReported(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	path := filepath.Join(dir, "store")
	s := open(t, path)
	for i := range 3 {
		s.Put(ctx, sturdyref.KeyOf(fmt.Appendf(nil, "%d", i)), sturdyref.Record{Kind: "k", Data: []byte("payload")})
	}
	s.Close()
	full, _ := os.ReadFile(path)
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"bad header", append([]byte("not a store\n"), full[15:]...)},
		{"flipped byte", flip(full, 40)},
		{"huge length", setLen(full, 15, 0x7fffffff)},
	} {
		p := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "_"))
		os.WriteFile(p, tc.data, 0o600)
		s, err := diskstore.Open(p, nil)
		if err == nil {
			s.Close()
			t.Errorf("%s: Open succeeded", tc.name)
			continue
		}
		if !errors.Is(err, diskstore.ErrCorrupt) {
			t.Errorf("%s: %v; want ErrCorrupt", tc.name, err)
		}
	}
}

func flip(b []byte, i int) []byte {
	c := append([]byte{}, b...)
	c[i] ^= 0xff
	return c
}

func setLen(b []byte, off int, n uint32) []byte {
	c := append([]byte{}, b...)
	c[off], c[off+1], c[off+2], c[off+3] = byte(n>>24), byte(n>>16), byte(n>>8), byte(n)
	return c
}

// Replacing one record many times compacts the log: its size stays
// bounded, and the content survives the compaction and a reopen.
func TestCompaction(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "store")
	s := open(t, path)
	data := bytes.Repeat([]byte("x"), 1000)
	for i := range 500 {
		if err := s.Put(ctx, sturdyref.KeyOf([]byte("k")), sturdyref.Record{Kind: fmt.Sprint(i), Data: data}); err != nil {
			t.Fatal(err)
		}
	}
	fi, _ := os.Stat(path)
	if fi.Size() > 200<<10 {
		t.Fatalf("log is %d bytes after 500 replacements of a 1 KB record; compaction did not run", fi.Size())
	}
	s.Close()
	s2 := open(t, path)
	if rec, ok := get(t, s2, "k"); !ok || rec.Kind != "499" {
		t.Fatalf("after compaction: %+v, %v", rec, ok)
	}
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Fatalf("left files behind: %v", entries)
	}
}

func TestRecordSizeLimit(t *testing.T) {
	s := open(t, filepath.Join(t.TempDir(), "store"))
	err := s.Put(context.Background(), sturdyref.Key{}, sturdyref.Record{Data: make([]byte, diskstore.MaxRecordSize+1)})
	if err == nil {
		t.Fatal("oversized record accepted")
	}
}

// FuzzOpen: whatever the file holds, Open returns a store or an error,
// never panics.
func FuzzOpen(f *testing.F) {
	f.Add([]byte("captp-store-v1\n"))
	f.Add([]byte("captp-store-v1\n\x00\x00\x00\x21\x00\x00\x00\x00"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		p := filepath.Join(t.TempDir(), "s")
		os.WriteFile(p, data, 0o600)
		s, err := diskstore.Open(p, nil)
		if err == nil {
			s.Close()
		}
	})
}

// Concurrent writers: every record is there after a reopen.
func TestConcurrentPuts(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "store")
	s := open(t, path)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 20 {
				if err := s.Put(ctx, sturdyref.KeyOf(fmt.Appendf(nil, "%d/%d", g, i)), sturdyref.Record{Kind: "k", Data: []byte{byte(i)}}); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	s.Close()
	s2 := open(t, path)
	if s2.Len() != 160 {
		t.Fatalf("%d records after reopen; want 160", s2.Len())
	}
}
