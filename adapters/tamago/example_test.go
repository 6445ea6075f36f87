package tamago_test

import (
	"context"
	"fmt"
	"sync"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/adapters/tamago"
	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// wire is a serial cable for the example: two UARTs whose Tx feeds the
// other's Rx. On TamaGo, boards/microvm.COM2 (tamago's uart.UART) takes
// its place.
type wire struct {
	mu  sync.Mutex
	buf []byte
}

type uart struct{ in, out *wire }

func (u uart) Tx(c byte) {
	u.out.mu.Lock()
	u.out.buf = append(u.out.buf, c)
	u.out.mu.Unlock()
}

func (u uart) Rx() (byte, bool) {
	u.in.mu.Lock()
	defer u.in.mu.Unlock()
	if len(u.in.buf) == 0 {
		return 0, false
	}
	c := u.in.buf[0]
	u.in.buf = u.in.buf[1:]
	return c, true
}

// A vat serves a capability over a serial port, and its peer calls it.
func ExampleNewSerial() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	w1, w2 := &wire{}, &wire{}

	// The guest's side: the serial port carries one CapTP connection.
	guest := core.NewConn(tamago.NewSerial(uart{in: w1, out: w2}, nil), &core.Options{
		BootstrapClient: capnp.Client(testimpl.New("guest", nil).Client()),
	})
	defer guest.Close()

	// The host's side (captp host uses QEMU's serial socket instead).
	host := core.NewConn(tamago.NewSerial(uart{in: w2, out: w1}, nil), nil)
	defer host.Close()
	boot := testcapnp.Test(host.Bootstrap(ctx))
	defer boot.Release()
	f, release := boot.Name(ctx, nil)
	defer release()
	res, err := f.Struct()
	if err != nil {
		fmt.Println(err)
		return
	}
	name, _ := res.Name()
	fmt.Println("the guest's bootstrap capability is", name)
	// Output: the guest's bootstrap capability is guest
}
