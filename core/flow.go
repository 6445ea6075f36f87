package core

import (
	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/core/flow"
)

// FlowStats returns the connection's flow-control figures: bytes in
// flight to the peer's objects together, and their peak.
func (c *Conn) FlowStats() flow.PoolStats { return c.flow.Stats() }

// FlowLimiterOf returns the flow limiter of the peer object that client
// refers to, or nil if client is not (yet) a capability imported by a
// captp connection or flow control is off. Resolve a promise first.
//
// Capabilities a Conn hands out (in results and parameters) already use
// their object's limiter, and Bootstrap's client has a window of its own.
// A copy made with AddRef or a pipelined promise does not: go-capnp keeps
// the limiter per client value, so set it on such a client with
// SetFlowLimiter to share the object's window.
func FlowLimiterOf(client capnp.Client) *flow.Limiter {
	snap := client.Snapshot()
	defer snap.Release()
	if h, ok := snap.Brand().Value.(*importClient); ok {
		return h.lim
	}
	return nil
}
