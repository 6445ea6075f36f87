package tamago

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

func TestSerialReadWrite(t *testing.T) {
	a, b := newFakeLine()
	sa, sb := NewSerial(a, nil), NewSerial(b, nil)
	defer sa.Close()
	defer sb.Close()
	// Every byte value, including the software flow-control ones.
	msg := make([]byte, 512)
	for i := range msg {
		msg[i] = byte(i)
	}
	if n, err := sa.Write(msg); n != len(msg) || err != nil {
		t.Fatalf("Write: %d, %v", n, err)
	}
	// A buffer exactly the size of what waits is filled (tamago's own
	// UART.Read reports one byte too few in this case).
	got := make([]byte, len(msg))
	if n, err := sb.Read(got); n != len(msg) || err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("Read: %d, %v", n, err)
	}
	// A short buffer takes what fits; the rest waits.
	sa.Write([]byte("hello"))
	small := make([]byte, 3)
	if n, _ := sb.Read(small); string(small[:n]) != "hel" {
		t.Fatalf("Read into 3 bytes: %q", small[:n])
	}
	if n, _ := sb.Read(small); string(small[:n]) != "lo" {
		t.Fatalf("second Read: %q", small[:n])
	}
	if n, err := sb.Read(nil); n != 0 || err != nil {
		t.Fatalf("Read(nil) = %d, %v", n, err)
	}
}

// Close unblocks a Read that is waiting for the line; later calls fail.
func TestSerialClose(t *testing.T) {
	a, _ := newFakeLine()
	s := NewSerial(a, nil)
	errc := make(chan error, 1)
	go func() {
		_, err := s.Read(make([]byte, 10))
		errc <- err
	}()
	time.Sleep(20 * time.Millisecond)
	s.Close()
	select {
	case err := <-errc:
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("Read after Close: %v, want ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not unblock Read")
	}
	if _, err := s.Write([]byte("x")); !errors.Is(err, ErrClosed) {
		t.Errorf("Write after Close: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// An idle reader backs off: it polls the UART a bounded number of times,
// not continuously.
func TestSerialIdleBackoff(t *testing.T) {
	a, b := newFakeLine()
	s := NewSerial(a, &SerialOptions{Spins: 8, MinSleep: time.Millisecond, MaxSleep: 10 * time.Millisecond})
	defer s.Close()
	go func() {
		time.Sleep(200 * time.Millisecond)
		b.Tx('!')
	}()
	buf := make([]byte, 1)
	start := time.Now()
	if n, err := s.Read(buf); n != 1 || err != nil || buf[0] != '!' {
		t.Fatalf("Read: %d, %v, %q", n, err, buf)
	}
	waited := time.Since(start)
	// 8 spins, then sleeps of 1, 2, 4, 8, 10, 10, ... ms over ~200ms:
	// about 30 polls. A busy loop would make millions.
	polls := a.rxCalls.Load()
	if polls > 100 {
		t.Errorf("%d polls of an idle line in %v: busy-waiting", polls, waited)
	}
	if waited > 400*time.Millisecond {
		t.Errorf("the byte arrived after 200ms but Read returned after %v (MaxSleep is 10ms)", waited)
	}
}

// A captp connection runs over two Serials on a fake line: bootstrap,
// echo and pipelining.
func TestSerialCapTP(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	a, b := newFakeLine()
	var live testimpl.Live
	server := core.NewConn(NewSerial(a, nil), &core.Options{BootstrapClient: capnp.Client(testimpl.New("guest", &live).Client())})
	defer server.Close()
	client := core.NewConn(NewSerial(b, nil), nil)
	defer client.Close()

	boot := testcapnp.Test(client.Bootstrap(ctx))
	defer boot.Release()
	f, release := boot.Echo(ctx, func(p testcapnp.Test_echo_Params) error { return p.SetData(bytes.Repeat([]byte{0x13, 0x11, 0}, 1000)) })
	res, err := f.Struct()
	if err != nil {
		t.Fatalf("echo: %v", err)
	}
	if d, _ := res.Data(); len(d) != 3000 {
		t.Errorf("echo returned %d bytes", len(d))
	}
	release()
	fc, rc := boot.Child(ctx, func(p testcapnp.Test_child_Params) error { return p.SetName("c") })
	defer rc()
	fn, rn := fc.Child().Name(ctx, nil)
	defer rn()
	nres, err := fn.Struct()
	if err != nil {
		t.Fatalf("pipelined name: %v", err)
	}
	if n, _ := nres.Name(); n != "c" {
		t.Errorf("name = %q", n)
	}
}
