package cppinterop

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/captp-go/captp/core"
)

// cppScenarios are test_client's scenarios, with the checks the Go side
// makes on its output (the client checks results itself; these make sure
// the lines that matter were printed).
var cppScenarios = []struct {
	name  string
	lines []string // each must appear as a prefix of some output line
}{
	{"echo", []string{"echo null -> null", "echo empty -> empty", "echo 16 bytes -> 16 bytes, equal", "echo 1048576 bytes -> 1048576 bytes, equal"}},
	{"caps", []string{"callBack -> ping", "hold/getHeld -> client-local", "getHeld().echo(), pipelined -> forwarded", "child -> from-server", "server released the client's object"}},
	{"pipeline", []string{"pipeline child(a).child(b).child(c).name() -> c"}},
	{"embargo", []string{"embargo: 60 calls"}},
	{"exceptions", []string{
		"exception failed type=failed description=", "exception overloaded type=overloaded description=",
		"exception disconnected type=disconnected description=", "exception unimplemented type=unimplemented description=",
		"exception broken-promise type=failed description=",
	}},
	{"cancel", nil},
	{"unimplemented", []string{"unknown method type=unimplemented", "unknown interface type=unimplemented"}},
	{"release", nil},
}

// TestCppClientGoServer runs every scenario with the C++ reference
// implementation as the client and captp as the server, serving objects
// through capnpc-go's generated code.
func TestCppClientGoServer(t *testing.T) { runCppScenarios(t, startGoServer) }

// TestCppClientGoNativeServer runs them against native objects
// (capnpc-captp's stubs on core.Handler): the reference calls, pipelines
// on and is called back by objects served on the connection's read loop.
func TestCppClientGoNativeServer(t *testing.T) { runCppScenarios(t, startGoNativeServer) }

func runCppScenarios(t *testing.T, start func(*testing.T, string) *goServer) {
	requireCpp(t)
	for _, transport := range transports {
		t.Run(transport, func(t *testing.T) {
			t.Parallel()
			srv := start(t, transport)
			for _, sc := range cppScenarios {
				t.Run(sc.name, func(t *testing.T) {
					ctx := testCtx(t, 30*time.Second)
					lines := runCppClient(t, ctx, srv.addr, sc.name, func(tag string) error {
						return srv.onSync(ctx, tag)
					})
					for _, want := range sc.lines {
						found := false
						for _, l := range lines {
							found = found || strings.HasPrefix(l, want)
						}
						if !found {
							t.Errorf("test_client printed no line starting %q", want)
						}
					}
					// The client has exited: its connection ends, and with it
					// the last reference to the bootstrap object.
					conn := srv.lastConn()
					if conn == nil {
						t.Fatal("the Go server accepted no connection")
					}
					select {
					case <-conn.Done():
					case <-ctx.Done():
						t.Fatal("the Go server's connection did not end after test_client exited")
					}
					if err := srv.live.WaitZero(ctx); err != nil {
						t.Errorf("Go server: %d Test objects live after the client left; want 0", srv.live.Count())
					}
				})
			}
		})
	}
}

// onSync answers test_client's SYNC points by checking the Go server while
// the client's connection is open.
func (s *goServer) onSync(ctx context.Context, tag string) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn := s.lastConn()
	if conn == nil {
		return errors.New("no connection accepted")
	}
	switch tag {
	case "block-started":
		select {
		case <-s.lastObj().BlockStarted():
			return nil
		case <-ctx.Done():
			return errors.New("block() never started on the Go server")
		}
	case "block-cancelled":
		select {
		case <-s.lastObj().BlockCancelled():
		case <-ctx.Done():
			return errors.New("the Go server's block() never saw its context cancelled")
		}
		select {
		case <-conn.Done():
			return fmt.Errorf("the connection ended (%v): cancellation must come from Finish, not a disconnect", conn.Err())
		default:
			return nil
		}
	case "released":
		if err := s.live.Wait(ctx, 1); err != nil {
			return fmt.Errorf("%d Test objects live on the Go server with the client connected; want 1 (bootstrap)", s.live.Count())
		}
		// Only the bootstrap capability is still exported to the client.
		want := core.Stats{Exports: 1}
		if err := waitConnStats(ctx, conn, func(st core.Stats) bool { return st == want }); err != nil {
			return fmt.Errorf("Go server tables: %w; want %v", err, want)
		}
		return nil
	}
	return fmt.Errorf("unknown SYNC tag %q", tag)
}
