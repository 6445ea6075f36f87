package core

import (
	"log/slog"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/core/flow"
)

// Options configures a Conn. The zero value (or a nil *Options) is valid:
// no bootstrap capability, default limits, logs discarded.
type Options struct {
	// BootstrapClient is the capability offered to the peer's Bootstrap
	// message. The Conn takes ownership and releases it when it closes.
	BootstrapClient capnp.Client

	// Vat, shared by the connections of one vat, enables three-party
	// handoff (Level 3) on this connection: see Network. Nil: a
	// capability hosted elsewhere is proxied, and Provide and Accept are
	// answered Unimplemented.
	Vat *Vat

	// Restorer answers a peer's Bootstrap that names a service ID (the
	// secret part of a sturdy ref; see Restorer and Conn.Restore). Nil:
	// such Bootstraps are refused. With a Restorer and no
	// BootstrapClient, a plain Bootstrap asks it for the empty ID.
	Restorer Restorer

	// Logger receives diagnostics (protocol violations, aborts). Nil
	// discards them.
	Logger *slog.Logger

	// Limits bound what a peer can make this side hold. Zero fields take
	// the defaults in DefaultLimits.
	Limits Limits

	// AbortTimeout bounds how long Close waits to flush the final Abort
	// message to a peer that does not read. Zero means one second.
	AbortTimeout time.Duration
}

// Limits bound the resources one connection may consume. A peer that
// exceeds a limit gets an Abort naming the limit, and the connection closes.
type Limits struct {
	// MaxMessageSize is the largest inbound frame in bytes, header included.
	MaxMessageSize uint64
	// MaxSegments is the largest segment count of an inbound frame.
	MaxSegments int
	// TraversalLimit bounds the words read while decoding one message
	// (amplification attacks through shared pointers).
	TraversalLimit uint64
	// NestingLimit bounds pointer nesting depth while decoding.
	NestingLimit int
	// MaxAnswers bounds calls from the peer that are in progress at once
	// (beyond it calls are answered overloaded); a peer that leaves more
	// than 4×MaxAnswers calls unfinished (no Finish) is aborted.
	MaxAnswers int
	// MaxExports bounds capabilities exported to the peer at once.
	MaxExports int
	// MaxImports bounds capabilities imported from the peer at once.
	MaxImports int
	// MaxQueuedBytes bounds outbound bytes waiting to be written: beyond
	// it new calls wait (respecting their context) and the connection
	// stops reading the peer, which is the backpressure to a peer that
	// does not read its replies. The default, 8 MiB, keeps a server
	// flooded by such a peer (200,000 calls in `captp bench`) at about
	// 35–40 MB of RSS, garbage included; calls and Returns in flight use
	// a small fraction of it.
	MaxQueuedBytes int
	// MaxInboundBytes bounds the bytes of the peer's calls held here:
	// calls delivered or queued whose arguments have not been released
	// yet (a handler releases them when it returns). A call that would go
	// beyond it is answered overloaded at once, so the receiving side of
	// a stream or a flood holds a bounded amount whatever the sender
	// does. One call is always accepted when nothing else is held.
	MaxInboundBytes int
	// Flow is the flow control of our calls to the peer's objects: each
	// imported capability gets a window of bytes in flight (calls sent
	// whose Return has not arrived), adaptive by default, and all of them
	// together at most Flow.ConnWindow. A caller that fills a window waits
	// (respecting its context), so a slow receiver slows the sender; see
	// package flow. Unlike the other limits it bounds this side, not the
	// peer. Zero fields take flow.Defaults.
	Flow flow.Config
}

// DefaultLimits are used for every zero field of Options.Limits.
var DefaultLimits = Limits{
	MaxMessageSize:  64 << 20,
	MaxSegments:     512,
	TraversalLimit:  64 << 20 / 8 * 2,
	NestingLimit:    64,
	MaxAnswers:      4096, // 4× this unfinished is ~30 MB at worst
	MaxExports:      65536,
	MaxImports:      65536,
	MaxQueuedBytes:  8 << 20,
	MaxInboundBytes: 64 << 20,
}

// withDefaults returns l with every zero field set from DefaultLimits.
func (l Limits) withDefaults() Limits {
	d := DefaultLimits
	if l.MaxMessageSize == 0 {
		l.MaxMessageSize = d.MaxMessageSize
	}
	if l.MaxSegments == 0 {
		l.MaxSegments = d.MaxSegments
	}
	if l.TraversalLimit == 0 {
		l.TraversalLimit = d.TraversalLimit
	}
	if l.NestingLimit == 0 {
		l.NestingLimit = d.NestingLimit
	}
	if l.MaxAnswers == 0 {
		l.MaxAnswers = d.MaxAnswers
	}
	if l.MaxExports == 0 {
		l.MaxExports = d.MaxExports
	}
	if l.MaxImports == 0 {
		l.MaxImports = d.MaxImports
	}
	if l.MaxQueuedBytes == 0 {
		l.MaxQueuedBytes = d.MaxQueuedBytes
	}
	if l.MaxInboundBytes == 0 {
		l.MaxInboundBytes = d.MaxInboundBytes
	}
	l.Flow = l.Flow.WithDefaults()
	return l
}
