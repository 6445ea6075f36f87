package core_test

import (
	"testing"

	"go.uber.org/goleak"
)

// Every test must leave no goroutine behind: connections, promise
// watchers and forwarded calls all end when their connection does.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
