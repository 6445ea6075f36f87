package netstack

import (
	"context"
	"net"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/serve"
)

// Serve accepts connections on lis (from Stack.Listen) and serves each
// with core.NewConn until ctx ends or accepting fails, as
// adapters/unix.Serve does.
//
// Every connection gets its own copy of *opts (nil means the zero Options)
// whose BootstrapClient is a new reference (AddRef) to opts.BootstrapClient,
// so each peer's Bootstrap returns the same capability. Serve owns
// opts.BootstrapClient: it releases its reference when it returns, and each
// connection releases its own when it closes.
//
// When ctx ends Serve closes lis, closes every live connection (each
// sends an Abort to its peer), waits until each is done, and returns
// ctx.Err() — never nil. If accepting fails (lis closed by someone else,
// or its Stack closed) Serve also closes every connection, waits, and
// returns the error wrapped. Serve logs to opts.Logger, or discards logs
// if it is nil.
func Serve(ctx context.Context, lis net.Listener, opts *core.Options) error {
	// gVisor reports no temporary accept errors: a reset before Accept is
	// handled inside the stack.
	return serve.Serve(ctx, lis, opts, serve.Config{Name: "netstack", FormatAddr: FormatAddr})
}
