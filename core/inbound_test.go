package core

import (
	"context"
	"sync"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	"capnproto.org/go/capnp/v3/exc"

	"github.com/captp-go/captp/core/flow"
	"github.com/captp-go/captp/internal/callqueue"
)

// holder keeps every call it receives, arguments and all, until let go.
type holder struct {
	mu    sync.Mutex
	calls []capnp.Recv
	got   chan struct{}
}

func (h *holder) Send(ctx context.Context, s capnp.Send) (*capnp.Answer, capnp.ReleaseFunc) {
	return callqueue.SendAsRecv(ctx, s, h.Recv)
}

func (h *holder) Recv(ctx context.Context, r capnp.Recv) capnp.PipelineCaller {
	h.mu.Lock()
	h.calls = append(h.calls, r)
	h.mu.Unlock()
	h.got <- struct{}{}
	return callqueue.Failed(exc.New(exc.Failed, "", "no pipelining on held calls"))
}

func (h *holder) letGo() {
	h.mu.Lock()
	calls := h.calls
	h.calls = nil
	h.mu.Unlock()
	for _, r := range calls {
		r.ReleaseArgs()
		r.Returner.PrepareReturn(nil)
		r.Returner.Return()
		r.Returner.ReleaseResults()
	}
}

func (h *holder) Brand() capnp.Brand { return capnp.Brand{Value: h} }
func (h *holder) String() string     { return "holder" }
func (h *holder) Shutdown()          {}

// Calls whose arguments the receiver still holds count against
// MaxInboundBytes; beyond it a call is answered overloaded at once, and
// once the held calls are released new ones are accepted again.
func TestMaxInboundBytesAnswersOverloaded(t *testing.T) {
	h := &holder{got: make(chan struct{}, 16)}
	// No flow control on the client: it would hold the calls back itself.
	client, server := pipeConns(t,
		&Options{BootstrapClient: capnp.NewClient(h), Limits: Limits{MaxInboundBytes: 1 << 20}},
		&Options{Limits: Limits{Flow: flow.Config{Mode: flow.Off}}})
	defer h.letGo() // before the connections close (cleanup)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	boot := client.Bootstrap(ctx)
	defer boot.Release()

	payload := make([]byte, 300<<10)
	call := func() (*capnp.Answer, capnp.ReleaseFunc) {
		return boot.SendCall(ctx, dataSend(capnp.Method{InterfaceID: 1, MethodID: 1}, payload))
	}
	var rels []capnp.ReleaseFunc
	defer func() {
		for _, r := range rels {
			r()
		}
	}()
	var held []*capnp.Answer
	for i := range 3 { // 3 × 300 KiB held: under 1 MiB
		a, rel := call()
		rels = append(rels, rel)
		held = append(held, a)
		select {
		case <-h.got:
		case <-ctx.Done():
			t.Fatalf("call %d never reached the server", i+1)
		}
	}
	a, rel := call()
	rels = append(rels, rel)
	_, err := a.Struct()
	if exc.TypeOf(err) != exc.Overloaded {
		t.Fatalf("fourth call while 900 KiB are held: %v; want overloaded", err)
	}
	if got := server.inboundHeld.Load(); got < 900<<10 || got > 1<<20 {
		t.Errorf("server holds %d bytes of calls; want the three held calls", got)
	}

	h.letGo()
	for i, a := range held {
		if _, err := a.Struct(); err != nil {
			t.Errorf("held call %d: %v", i+1, err)
		}
	}
	if got := server.inboundHeld.Load(); got != 0 {
		t.Errorf("server still counts %d bytes after every call released its arguments", got)
	}
	a, rel = call()
	rels = append(rels, rel)
	select {
	case <-h.got:
	case <-ctx.Done():
		t.Fatal("a call after the release never reached the server")
	}
	h.letGo()
	if _, err := a.Struct(); err != nil {
		t.Errorf("call after the release: %v", err)
	}
}

// Bootstrap's client gets a flow-control window of its own (go-capnp
// keeps limiters per client value, so it would otherwise have none), and
// none when flow control is off.
func TestBootstrapClientHasFlowWindow(t *testing.T) {
	for _, mode := range []flow.Mode{flow.Adaptive, flow.Off} {
		client, _ := pipeConns(t, &Options{BootstrapClient: capnp.NewClient(&holder{got: make(chan struct{}, 1)})},
			&Options{Limits: Limits{Flow: flow.Config{Mode: mode}}})
		boot := client.Bootstrap(context.Background())
		lim := boot.GetFlowLimiter()
		boot.Release()
		if _, limited := lim.(*flow.Limiter); limited != (mode != flow.Off) {
			t.Errorf("flow mode %v: Bootstrap's client has limiter %T", mode, lim)
		}
	}
}

// dataSend is a call to m whose arguments are one pointer field holding
// data.
func dataSend(m capnp.Method, data []byte) capnp.Send {
	return capnp.Send{
		Method:   m,
		ArgsSize: capnp.ObjectSize{PointerCount: 1},
		PlaceArgs: func(s capnp.Struct) error {
			d, err := capnp.NewData(s.Segment(), data)
			if err != nil {
				return err
			}
			return s.SetPtr(0, d.ToPtr())
		},
	}
}
