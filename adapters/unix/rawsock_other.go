//go:build !linux

package unix

import "net"

// newSocketConn gives c vectored writes; only Linux has socketConn's raw
// system calls.
func newSocketConn(c net.Conn) net.Conn { return vectorConn{c} }
