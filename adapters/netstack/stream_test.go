package netstack

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/captp-go/captp/internal/testcapnp"
)

// socketpair returns the two ends of a connected Unix stream socket, as
// QEMU's -netdev stream uses.
func socketpair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int, name string) net.Conn {
		f := os.NewFile(uintptr(fd), name)
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	return conn(fds[0], "host"), conn(fds[1], "guest")
}

// TestStreamLink connects two stacks through StreamLinks on a socketpair,
// as a host process and a QEMU guest would be, and runs captp over it.
func TestStreamLink(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	ctx := testContext(t)
	hc, gc := socketpair(t)
	hostLink := NewStreamLink(hc, &StreamLinkOptions{Logger: testLogger(t)})
	guestLink := NewStreamLink(gc, &StreamLinkOptions{Logger: testLogger(t)})
	host, err := New(hostLink, Config{Name: "host", Addrs: []netip.Prefix{netip.MustParsePrefix("10.0.2.2/24")}, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer host.Close()
	guest, err := New(guestLink, Config{Name: "guest", Addrs: []netip.Prefix{netip.MustParsePrefix("10.0.2.15/24")}, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer guest.Close()
	stop := serveVat(t, guest, "guest", nil)

	conn, err := host.Dial(ctx, "10.0.2.15:4000", nil)
	if err != nil {
		t.Fatal(err)
	}
	boot := testcapnp.Test(conn.Bootstrap(ctx))
	if got := callName(ctx, t, boot); got != "guest" {
		t.Errorf("guest's name = %q", got)
	}
	// Payloads larger than the MTU cross in many frames.
	payload := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB
	for range 4 {
		f, release := boot.Echo(ctx, func(p testcapnp.Test_echo_Params) error { return p.SetData(payload) })
		res, err := f.Struct()
		if err != nil {
			t.Fatal(err)
		}
		if got, _ := res.Data(); !bytes.Equal(got, payload) {
			t.Fatalf("echo of %d bytes returned %d different bytes", len(payload), len(got))
		}
		release()
	}
	boot.Release()
	conn.Close()
	stop()

	// The guest goes away: the host's link goes down and says why.
	guest.Close()
	select {
	case <-hostLink.Done():
	case <-ctx.Done():
		t.Fatal("host link still up after the guest closed its end")
	}
	if err := hostLink.Err(); err == nil || errors.Is(err, ErrClosed) {
		t.Errorf("host link error %v, want a read error", err)
	}
	if err := guestLink.Err(); !errors.Is(err, ErrClosed) {
		t.Errorf("guest link error %v, want ErrClosed", err)
	}
	host.Close()
}

// TestStreamLinkFraming checks the bytes on the wire against QEMU's
// -netdev stream format (net/stream.c: a 4-byte big-endian length, then
// the Ethernet frame), with a hand-made guest: it sends an ARP request and
// expects the ARP reply, padded to the Ethernet minimum.
func TestStreamLinkFraming(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	hc, guest := socketpair(t)
	defer guest.Close()
	hostMAC := net.HardwareAddr{0x02, 0, 0, 0, 0, 0x02}
	guestMAC := net.HardwareAddr{0x52, 0x54, 0, 0x12, 0x34, 0x56} // QEMU's default
	host, err := New(NewStreamLink(hc, nil), Config{
		MAC: hostMAC, Addrs: []netip.Prefix{netip.MustParsePrefix("10.0.2.2/24")},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer host.Close()

	req := make([]byte, header.EthernetMinimumSize+header.ARPSize)
	header.Ethernet(req).Encode(&header.EthernetFields{
		SrcAddr: linkAddr(guestMAC), DstAddr: header.EthernetBroadcastAddress, Type: header.ARPProtocolNumber,
	})
	arp := header.ARP(req[header.EthernetMinimumSize:])
	arp.SetIPv4OverEthernet()
	arp.SetOp(header.ARPRequest)
	copy(arp.HardwareAddressSender(), guestMAC)
	copy(arp.ProtocolAddressSender(), []byte{10, 0, 2, 15})
	copy(arp.ProtocolAddressTarget(), []byte{10, 0, 2, 2})
	frame := binary.BigEndian.AppendUint32(nil, uint32(len(req)))
	if _, err := guest.Write(append(frame, req...)); err != nil {
		t.Fatal(err)
	}

	guest.SetReadDeadline(time.Now().Add(testTimeout))
	var lenBuf [4]byte
	if _, err := io.ReadFull(guest, lenBuf[:]); err != nil {
		t.Fatal(err)
	}
	n := binary.BigEndian.Uint32(lenBuf[:])
	if n != minFrameSize {
		t.Errorf("ARP reply frame is %d bytes, want %d (padded)", n, minFrameSize)
	}
	reply := make([]byte, n)
	if _, err := io.ReadFull(guest, reply); err != nil {
		t.Fatal(err)
	}
	eth := header.Ethernet(reply)
	if eth.Type() != header.ARPProtocolNumber || eth.DestinationAddress() != linkAddr(guestMAC) || eth.SourceAddress() != linkAddr(hostMAC) {
		t.Fatalf("reply: type %#x %v → %v, want ARP %v → %v", eth.Type(), eth.SourceAddress(), eth.DestinationAddress(), hostMAC, guestMAC)
	}
	rarp := header.ARP(reply[header.EthernetMinimumSize:])
	if !rarp.IsValid() || rarp.Op() != header.ARPReply ||
		!bytes.Equal(rarp.HardwareAddressSender(), hostMAC) ||
		!bytes.Equal(rarp.ProtocolAddressSender(), []byte{10, 0, 2, 2}) {
		t.Errorf("not the ARP reply for 10.0.2.2 at %v: % x", hostMAC, reply)
	}

	// A length no Ethernet frame has: the link goes down.
	if _, err := guest.Write([]byte{0xff, 0xff, 0xff, 0xff}); err != nil {
		t.Fatal(err)
	}
	link := host.GVisor().GetLinkEndpointByName("netstack")
	if link == nil {
		t.Fatal("no NIC named netstack")
	}
	sl := link.(*StreamLink)
	<-sl.Done()
	if err := sl.Err(); err == nil || !bytes.Contains([]byte(err.Error()), []byte("frame length")) {
		t.Errorf("link error %v, want a frame length error", err)
	}
}

func linkAddr(mac net.HardwareAddr) tcpipLinkAddress { return tcpipLinkAddress(mac) }

// TestStreamLinkBackpressure shows that a StreamLink never drops a frame
// because the other end is slow: WritePackets blocks until the stream has
// taken every frame, then reports them all written.
func TestStreamLinkBackpressure(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	hc, guest := socketpair(t)
	defer guest.Close()
	link := NewStreamLink(hc, nil)
	defer link.Close()

	const frames, size = 256, 64 << 10 // 16 MiB: far more than a socket buffer
	var pkts stack.PacketBufferList
	for i := range frames {
		b := bytes.Repeat([]byte{byte(i)}, size)
		pkts.PushBack(stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(b)}))
	}
	defer pkts.DecRef()
	type result struct {
		n   int
		err any
	}
	wrote := make(chan result, 1)
	go func() {
		n, err := link.WritePackets(pkts)
		wrote <- result{n, err}
	}()

	// Nobody reads: the write must wait, not drop. (A correct link never
	// returns here, so the timer cannot make the test flaky.)
	select {
	case r := <-wrote:
		t.Fatalf("WritePackets returned %d, %v while nobody read", r.n, r.err)
	case <-time.After(100 * time.Millisecond):
	}

	guest.SetReadDeadline(time.Now().Add(testTimeout))
	r := io.Reader(guest)
	var lenBuf [4]byte
	got := make([]byte, size)
	for i := range frames {
		if _, err := io.ReadFull(r, lenBuf[:]); err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		if n := binary.BigEndian.Uint32(lenBuf[:]); n != size {
			t.Fatalf("frame %d is %d bytes, want %d", i, n, size)
		}
		if _, err := io.ReadFull(r, got); err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		if got[0] != byte(i) || got[size-1] != byte(i) {
			t.Fatalf("frame %d holds frame %d's bytes", i, got[0])
		}
	}
	res := <-wrote
	if res.n != frames || res.err != nil {
		t.Errorf("WritePackets = %d, %v; want %d, nil", res.n, res.err, frames)
	}

	// Closing the link wakes a writer blocked on a stream nobody reads.
	var more stack.PacketBufferList
	more.PushBack(stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(make([]byte, 8<<20))}))
	defer more.DecRef()
	go func() {
		n, err := link.WritePackets(more)
		wrote <- result{n, err}
	}()
	link.Close()
	if res := <-wrote; res.n != 0 || res.err == nil {
		t.Errorf("WritePackets on a closed link = %d, %v; want an error", res.n, res.err)
	}
	link.Wait()
}

type tcpipLinkAddress = tcpip.LinkAddress

// TestNewFailureClosesLink checks that New, failing after the link's
// reader started, stops it and closes the stream.
func TestNewFailureClosesLink(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	hc, guest := socketpair(t)
	defer guest.Close()
	link := NewStreamLink(hc, nil)
	a := netip.MustParsePrefix("10.0.2.2/24")
	if _, err := New(link, Config{Addrs: []netip.Prefix{a, a}}); err == nil {
		t.Fatal("New accepted one address twice")
	} else {
		t.Log(err)
	}
	<-link.Done()
	if err := link.Err(); !errors.Is(err, ErrClosed) {
		t.Errorf("link error %v, want ErrClosed", err)
	}
	guest.SetReadDeadline(time.Now().Add(testTimeout))
	if _, err := io.ReadAll(guest); err != nil {
		t.Errorf("the stream was not closed: %v", err)
	}
}
