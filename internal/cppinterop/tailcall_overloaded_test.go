package cppinterop

import (
	"net"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// A peer forwards our call back to us as a tail call (what the C++
// reference does) while we are at MaxAnswers calls in progress.
func TestTailCallWhileOverloaded(t *testing.T) {
	for _, busy := range []bool{false, true} {
		name := map[bool]string{false: "idle", true: "busy"}[busy]
		t.Run(name, func(t *testing.T) {
			ctx := testCtx(t, 10*time.Second)
			a, b := net.Pipe()
			defer b.Close()
			obj := testimpl.New("server", nil)
			conn := core.NewConn(a, &core.Options{
				BootstrapClient: capnp.Client(obj.Client()),
				Limits:          core.Limits{MaxAnswers: 1},
				Logger:          testLogger(t),
			})
			defer conn.Close()
			msgs := make(chan rpccp.Message, 64)
			go func() {
				defer close(msgs)
				dec := capnp.NewDecoder(b)
				for {
					msg, err := dec.Decode()
					if err != nil {
						return
					}
					m, err := rpccp.ReadRootMessage(msg)
					if err != nil {
						return
					}
					msgs <- m
				}
			}()
			next := func(which rpccp.Message_Which) rpccp.Message {
				for {
					select {
					case m, ok := <-msgs:
						if !ok {
							t.Fatalf("connection ended waiting for %v: %v", which, conn.Err())
						}
						if m.Which() == which {
							return m
						}
					case <-ctx.Done():
						t.Fatalf("no %v", which)
					}
				}
			}
			send := func(f []byte) {
				if _, err := b.Write(f); err != nil {
					t.Fatal(err)
				}
			}
			// The peer takes our bootstrap capability (export id e).
			send(bootstrapFrame(0))
			r, _ := next(rpccp.Message_Which_return).Return()
			res, _ := r.Results()
			ct, _ := res.CapTable()
			e := ct.At(0).SenderHosted()
			if busy {
				send(callFrame(1, e, true, 2, nil)) // block(): MaxAnswers in progress
				<-obj.BlockStarted()
			}
			// We call the peer's bootstrap capability.
			boot := testcapnp.Test(conn.Bootstrap(ctx))
			defer boot.Release()
			bq, _ := next(rpccp.Message_Which_bootstrap).Bootstrap()
			f, release := boot.Echo(ctx, func(p testcapnp.Test_echo_Params) error { return p.SetData([]byte("hi")) })
			c, _ := next(rpccp.Message_Which_call).Call()
			_ = bq
			// The peer forwards it back to our object as a tail call.
			send(rpcFrame(func(m rpccp.Message) error {
				c2, err := m.NewCall()
				if err != nil {
					return err
				}
				c2.SetQuestionId(2)
				c2.SetInterfaceId(testcapnp.Test_TypeID)
				c2.SetMethodId(0)
				c2.SendResultsTo().SetYourself()
				mt, _ := c2.NewTarget()
				mt.SetImportedCap(e)
				p, _ := c2.NewParams()
				args, _ := capnp.NewStruct(p.Segment(), capnp.ObjectSize{PointerCount: 1})
				args.SetData(0, []byte("hi"))
				return p.SetContent(args.ToPtr())
			}))
			send(rpcFrame(func(m rpccp.Message) error {
				r, err := m.NewReturn()
				if err != nil {
					return err
				}
				r.SetAnswerId(c.QuestionId())
				r.SetTakeFromOtherQuestion(2)
				return nil
			}))
			_, err := f.Struct()
			t.Logf("forwarded echo -> %v; connection: %v", err, conn.Err())
			if conn.Err() != nil {
				t.Errorf("the connection ended: %v", conn.Err())
			}
			if err == nil || !busy {
				release()
			}
		})
	}
}
