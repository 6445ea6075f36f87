//go:build !unix

package core_test

import (
	"net"
	"testing"
)

// socketPair skips: this platform (js/wasm, wasip1) has no socket pairs;
// the same tests run over in-memory pipes here and over sockets on unix.
func socketPair(t *testing.T) (net.Conn, net.Conn) {
	t.Skip("SKIPPED on this platform: no Unix socket pairs (the pipe variant of this test runs)")
	return nil, nil
}
