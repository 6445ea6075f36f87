package core

import (
	"bytes"
	"context"
	"io"
	"math/rand/v2"
	"sync"
	"testing"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// recordingPipe is an rwPipe (or, with r and w set, a pair of bufPipes)
// that keeps a copy of everything written.
type recordingPipe struct {
	rwPipe
	r, w *bufPipe
	mu   sync.Mutex
	out  bytes.Buffer
}

func (p *recordingPipe) Write(b []byte) (int, error) {
	p.mu.Lock()
	p.out.Write(b)
	p.mu.Unlock()
	if p.w != nil {
		return p.w.Write(b)
	}
	return p.PipeWriter.Write(b)
}

func (p *recordingPipe) Read(b []byte) (int, error) {
	if p.r != nil {
		return p.r.Read(b)
	}
	return p.PipeReader.Read(b)
}

func (p *recordingPipe) Close() error {
	if p.r != nil {
		p.r.close()
		p.w.close()
		return nil
	}
	return p.rwPipe.Close()
}

// frameSegments decodes the recorded stream and returns each frame's
// segment count and total size.
func (p *recordingPipe) frameSegments(t *testing.T) (segs []int64, sizes []int64) {
	t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	dec := capnp.NewDecoder(bytes.NewReader(p.out.Bytes()))
	dec.MaxMessageSize = 1 << 30
	for {
		msg, err := dec.Decode()
		if err == io.EOF {
			return segs, sizes
		}
		if err != nil {
			t.Fatalf("decode recorded frame: %v", err)
		}
		size, _ := msg.TotalSize()
		segs, sizes = append(segs, msg.NumSegments()), append(sizes, int64(size))
	}
}

func TestWithDataReference(t *testing.T) {
	for _, tc := range []struct {
		name  string
		size  int
		byRef bool
	}{
		{"256KiB", 256 << 10, true},
		{"64KiB", largeFrameBytes, true},
		{"unaligned", largeFrameBytes + 4, false},
		{"small", 4096, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ar, bw := io.Pipe()
			br, aw := io.Pipe()
			server := NewConn(&rwPipe{PipeReader: br, PipeWriter: bw}, &Options{BootstrapClient: capnp.Client(testimpl.New("root", nil).Client())})
			rec := &recordingPipe{rwPipe: rwPipe{PipeReader: ar, PipeWriter: aw}}
			client := NewConn(rec, nil)
			defer func() {
				client.Close()
				server.Close()
				<-client.Done()
				<-server.Done()
			}()
			ctx := context.Background()
			boot := testcapnp.Test(client.Bootstrap(ctx))
			defer boot.Release()

			data := make([]byte, tc.size)
			for i := range data {
				data[i] = byte(rand.IntN(256))
			}
			want := bytes.Clone(data)
			f, release := boot.Echo(WithDataReference(ctx, 0, data), func(p testcapnp.Test_echo_Params) error {
				if p.HasData() {
					return nil
				}
				return p.SetData(data)
			})
			defer release()
			// The call has returned: the bytes are written (or copied),
			// so the caller may reuse its buffer at once.
			clear(data)
			res, err := f.Struct()
			if err != nil {
				t.Fatalf("echo: %v", err)
			}
			got, err := res.Data()
			if err != nil {
				t.Fatalf("echo results: %v", err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("echo returned %d bytes that differ from the %d sent", len(got), len(want))
			}

			segs, sizes := rec.frameSegments(t)
			var callSegs int64
			for i := range segs {
				if sizes[i] >= int64(tc.size) {
					callSegs = segs[i]
				}
			}
			switch {
			case callSegs == 0:
				t.Fatalf("no frame of at least %d bytes among %d recorded", tc.size, len(segs))
			case tc.byRef && callSegs != 2:
				t.Fatalf("call frame has %d segments; want 2 (data referenced as its own segment)", callSegs)
			case !tc.byRef && callSegs != 1:
				t.Fatalf("call frame has %d segments; want 1 (data copied)", callSegs)
			}
		})
	}
}

// A hint is used by one call only: a call the core forwards elsewhere
// (a promise resolved meanwhile) must copy the data instead.
func TestDataReferenceTakenOnce(t *testing.T) {
	ctx := WithDataReference(context.Background(), 0, make([]byte, largeFrameBytes))
	if takeDataRef(ctx, true) != nil {
		t.Fatal("a manual (simulated) connection took the hint")
	}
	if takeDataRef(ctx, false) == nil {
		t.Fatal("first take: no hint")
	}
	if takeDataRef(ctx, false) != nil {
		t.Fatal("second take: the hint was handed out twice")
	}
}
