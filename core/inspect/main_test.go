package inspect_test

import (
	"testing"

	"go.uber.org/goleak"
)

// Every test must leave no goroutine behind.
func TestMain(m *testing.M) {
	// runtime.handleEvent is js/wasm's event-loop goroutine, not ours.
	goleak.VerifyTestMain(m, goleak.IgnoreAnyFunction("runtime.handleEvent"))
}
