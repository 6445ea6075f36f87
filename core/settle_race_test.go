package core

import (
	"context"
	"io"
	"sync"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

type rwPipe struct {
	*io.PipeReader
	*io.PipeWriter
	once sync.Once
}

func (p *rwPipe) Close() error {
	p.once.Do(func() { p.PipeReader.Close(); p.PipeWriter.Close() })
	return nil
}

// pipeConns connects a client and a server Conn over in-memory pipes;
// cleanup closes both and waits for them.
func pipeConns(t *testing.T, serverOpts, clientOpts *Options) (client, server *Conn) {
	t.Helper()
	ar, bw := io.Pipe()
	br, aw := io.Pipe()
	server = NewConn(&rwPipe{PipeReader: br, PipeWriter: bw}, serverOpts)
	client = NewConn(&rwPipe{PipeReader: ar, PipeWriter: aw}, clientOpts)
	t.Cleanup(func() {
		client.Close()
		server.Close()
		<-client.Done()
		<-server.Done()
	})
	return client, server
}

// A caller that releases an answer while its Return is being settled must
// still be able to call a capability it took from the answer's pipeline:
// the results stay until the promise has them. (Found by the C++ interop
// test: "pipelined call on a finished question".)
func TestReleaseDuringSettleKeepsPipelinedCapability(t *testing.T) {
	client, _ := pipeConns(t, &Options{BootstrapClient: capnp.Client(testimpl.New("root", nil).Client())}, nil)
	ctx := context.Background()
	boot := testcapnp.Test(client.Bootstrap(ctx))
	defer boot.Release()

	// The caller's release races the reader's settle effect, and the
	// caller calls the pipelined capability before the promise has the
	// results: both happen here, while the reader is about to fulfil it.
	var child testcapnp.Test
	var nameFuture testcapnp.Test_name_Results_Future
	var nameRelease capnp.ReleaseFunc
	var once sync.Once
	childReady := make(chan struct{})
	beforeSettle := func(q *question) {
		if q.method.MethodID != 3 { // child
			return
		}
		once.Do(func() {
			<-childReady
			done := make(chan struct{})
			go func() { q.release(); close(done) }()
			select {
			case <-done:
			case <-time.After(time.Second):
				// The release waits for the promise this goroutine is
				// about to fulfil.
			}
			nameFuture, nameRelease = child.Name(ctx, nil)
		})
	}
	testBeforeSettle.Store(&beforeSettle)
	defer testBeforeSettle.Store(nil)

	f, rel := boot.Child(ctx, func(p testcapnp.Test_child_Params) error { return p.SetName("kid") })
	child = f.Child().AddRef()
	defer child.Release()
	close(childReady)
	if _, err := f.Struct(); err != nil {
		t.Fatalf("child: %v", err)
	}
	rel() // already released by the hook; harmless
	if nameRelease == nil {
		t.Fatal("the settle hook did not run")
	}
	defer nameRelease()
	res, err := nameFuture.Struct()
	if err != nil {
		t.Fatalf("name() on the child of an answer released while settling: %v", err)
	}
	if n, _ := res.Name(); n != "kid" {
		t.Errorf("name() = %q, want kid", n)
	}
}

// A call that passed go-capnp's "answer not resolved" check reaches the
// question only after its caller released the answer and the question was
// retired: within the grace period it still goes to the capability in the
// results. (Seen in the C++ interop test: "pipelined call on a finished
// question".)
func TestPipelineSendAfterRetireIsRedirected(t *testing.T) {
	client, _ := pipeConns(t, &Options{BootstrapClient: capnp.Client(testimpl.New("root", nil).Client())}, nil)
	ctx := context.Background()
	boot := testcapnp.Test(client.Bootstrap(ctx))
	defer boot.Release()
	if err := boot.Resolve(ctx); err != nil {
		t.Fatal(err)
	}

	ans, rel := capnp.Client(boot).SendCall(ctx, capnp.Send{
		Method:   capnp.Method{InterfaceID: testcapnp.Test_TypeID, MethodID: 3}, // child
		ArgsSize: capnp.ObjectSize{PointerCount: 1},
		PlaceArgs: func(s capnp.Struct) error {
			return testcapnp.Test_child_Params(s).SetName("kid")
		},
	})
	if _, err := ans.Struct(); err != nil {
		t.Fatalf("child: %v", err)
	}
	client.mu.Lock()
	q := client.questionsByAns[ans]
	client.unlock()
	if q == nil {
		t.Fatal("no question for the answer")
	}
	rel() // Finish: the question is retired
	client.mu.Lock()
	retired := client.questions[q.id] != q
	client.unlock()
	if !retired {
		t.Fatal("the question was not retired by the release")
	}
	// What go-capnp does for a call that passed its check before the release.
	nans, nrel := q.PipelineSend(ctx, []capnp.PipelineOp{{Field: 0}}, capnp.Send{
		Method:   capnp.Method{InterfaceID: testcapnp.Test_TypeID, MethodID: 4}, // name
		ArgsSize: capnp.ObjectSize{},
	})
	defer nrel()
	res, err := nans.Struct()
	if err != nil {
		t.Fatalf("name() through the retired question: %v", err)
	}
	if n, _ := testcapnp.Test_name_Results(res).Name(); n != "kid" {
		t.Errorf("name() = %q, want kid", n)
	}
}
