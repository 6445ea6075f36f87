package tamago

import (
	"context"
	"io"
	"os"
	"runtime/pprof"
	"testing"
	"time"

	"github.com/captp-go/captp/adapters/netstack"
)

var _ netstack.Stopper = (*Link)(nil)

// A stack closes while its virtio-net link is delivering traffic. gVisor's
// Stack.Wait holds the stack's lock while it waits for the link, and a
// packet the link is delivering needs that lock: unless Close stops the
// link first (netstack.Stopper), the two wait for each other (seen in CI
// at the end of TestLinkCapTP).
func TestLinkStackCloseUnderTraffic(t *testing.T) {
	for i := range 20 {
		na, nb := cable(t)
		guest := newTestStack(t, na, "10.0.2.15/24")
		host := newTestStack(t, nb, "10.0.2.1/24")
		lis, err := guest.Listen("*:4000")
		if err != nil {
			t.Fatal(err)
		}
		go func() {
			for {
				c, err := lis.Accept()
				if err != nil {
					return
				}
				go func() { io.Copy(io.Discard, c); c.Close() }()
			}
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		c, err := host.DialTCP(ctx, "10.0.2.15:4000")
		if err != nil {
			cancel()
			t.Fatal(err)
		}
		sent := make(chan struct{})
		go func() {
			defer close(sent)
			buf := make([]byte, 32<<10)
			for {
				if _, err := c.Write(buf); err != nil {
					return
				}
			}
		}()
		time.Sleep(time.Duration(i%5) * time.Millisecond)
		closed := make(chan struct{})
		go func() { guest.Close(); close(closed) }()
		select {
		case <-closed:
		case <-ctx.Done():
			pprof.Lookup("goroutine").WriteTo(os.Stderr, 2) // who waits for whom
			t.Fatalf("round %d: the guest stack's Close did not return while traffic arrived (deadlock)", i)
		}
		c.Close()
		host.Close()
		<-sent
		lis.Close()
		cancel()
	}
}
