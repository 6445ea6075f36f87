//go:build unix

package core_test

import (
	"net"
	"testing"

	"github.com/captp-go/captp/internal/testsock"
)

// socketPair returns the two ends of a connected Unix socket pair.
func socketPair(t *testing.T) (net.Conn, net.Conn) { return testsock.Pair(t) }
