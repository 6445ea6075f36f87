package unix

import (
	"log/slog"
	"testing"
)

// testLogger logs through the test's output, shown with -v or on failure.
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug})).
		With("test", t.Name())
}
