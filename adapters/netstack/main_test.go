package netstack

import (
	"log/slog"
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the run if any goroutine outlives the tests: every
// Stack, Network and StreamLink must stop gVisor's goroutines and its own.
// Nothing is ignored.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// testLogger logs through the test's output, shown with -v or on failure.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelInfo})).
		With("test", t.Name())
}
