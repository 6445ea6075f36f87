package sturdyref

import (
	"context"
	"sync"
)

// MemStore is a Store in memory: for tests, and for vats whose services
// need not survive a restart. The zero value is ready to use.
type MemStore struct {
	mu sync.Mutex
	m  map[Key]Record
}

var _ Store = (*MemStore)(nil)

// Put implements Store.
func (s *MemStore) Put(_ context.Context, k Key, rec Record) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.m == nil {
		s.m = make(map[Key]Record)
	}
	s.m[k] = Record{Kind: rec.Kind, Data: append([]byte{}, rec.Data...)}
	return nil
}

// Get implements Store.
func (s *MemStore) Get(_ context.Context, k Key) (Record, bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	rec, ok := s.m[k]
	if ok {
		rec.Data = append([]byte{}, rec.Data...)
	}
	return rec, ok, nil
}

// Delete implements Store.
func (s *MemStore) Delete(_ context.Context, k Key) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.m, k)
	return nil
}

// Len returns the number of records.
func (s *MemStore) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.m)
}
