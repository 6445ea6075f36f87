package serve

import (
	"net"
	"testing"
)

// The gate keeps the connection underneath reachable through NetConn,
// which adapters/secure uses to find the peer's TLS identity.
func TestGateKeepsNetConn(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	_, rwc := newGate(a)
	n, ok := rwc.(interface{ NetConn() net.Conn })
	if !ok || n.NetConn() != a {
		t.Fatalf("gated stream %T does not lead back to its net.Conn", rwc)
	}
}
