package netstack

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/captp-go/captp/internal/testcapnp"
)

// A rawPort is the far end of a switch port that a test drives by hand,
// frame by frame, as QEMU would.
type rawPort struct {
	t    *testing.T
	name string
	c    net.Conn
	mac  [6]byte
}

func attachRaw(t *testing.T, s *Switch, name string, mac byte) *rawPort {
	t.Helper()
	near, far := net.Pipe()
	if err := s.Attach(name, near); err != nil {
		t.Fatalf("attach %s: %v", name, err)
	}
	t.Cleanup(func() { far.Close() })
	return &rawPort{t: t, name: name, c: far, mac: [6]byte{0x02, 0, 0, 0, 0, mac}}
}

// frame returns a 60-byte frame from p to dst carrying tag.
func (p *rawPort) frame(dst [6]byte, tag byte) []byte {
	f := make([]byte, minFrameSize)
	copy(f[0:6], dst[:])
	copy(f[6:12], p.mac[:])
	f[12], f[13] = 0x88, 0xb5 // an experimental EtherType
	f[14] = tag
	return f
}

// send writes f with QEMU's length prefix.
func (p *rawPort) send(f []byte) {
	p.t.Helper()
	buf := binary.BigEndian.AppendUint32(nil, uint32(len(f)))
	p.c.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := p.c.Write(append(buf, f...)); err != nil {
		p.t.Fatalf("%s: send: %v", p.name, err)
	}
}

// recv reads one frame, or returns nil if none comes within wait.
func (p *rawPort) recv(wait time.Duration) []byte {
	p.t.Helper()
	p.c.SetReadDeadline(time.Now().Add(wait))
	var hdr [4]byte
	if _, err := io.ReadFull(p.c, hdr[:]); err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return nil
		}
		p.t.Fatalf("%s: recv: %v", p.name, err)
	}
	f := make([]byte, binary.BigEndian.Uint32(hdr[:]))
	if _, err := io.ReadFull(p.c, f); err != nil {
		p.t.Fatalf("%s: recv: %v", p.name, err)
	}
	return f
}

func (p *rawPort) expect(want []byte) {
	p.t.Helper()
	if got := p.recv(5 * time.Second); !bytes.Equal(got, want) {
		p.t.Fatalf("%s received %x; want %x", p.name, got, want)
	}
}

func (p *rawPort) expectNothing() {
	p.t.Helper()
	if got := p.recv(100 * time.Millisecond); got != nil {
		p.t.Fatalf("%s received %x; want nothing", p.name, got)
	}
}

var broadcast = [6]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}

// Broadcasts and unknown destinations flood; once a source is learned,
// frames to it go only to its port.
func TestSwitchFloodsAndLearns(t *testing.T) {
	s := NewSwitch(&SwitchOptions{Logger: testLogger(t)})
	defer s.Close()
	a, b, c := attachRaw(t, s, "a", 1), attachRaw(t, s, "b", 2), attachRaw(t, s, "c", 3)

	f := a.frame(broadcast, 1)
	a.send(f)
	b.expect(f)
	c.expect(f)
	a.expectNothing() // never back to the sender

	// b is unknown yet: flooded. a is known now: b's answer goes to a only.
	f = a.frame(b.mac, 2)
	a.send(f)
	b.expect(f)
	c.expect(f)
	f = b.frame(a.mac, 3)
	b.send(f)
	a.expect(f)
	c.expectNothing()
	f = a.frame(b.mac, 4)
	a.send(f)
	b.expect(f)
	c.expectNothing()

	if got := s.Frames("a", "b"); got != 1 {
		t.Errorf("Frames(a, b) = %d; want 1 (the flooded one is not a unicast)", got)
	}
	if got := s.Frames("b", "a"); got != 1 {
		t.Errorf("Frames(b, a) = %d; want 1", got)
	}
	st := s.Stats()
	if st["a"].In != 3 || st["a"].Flooded != 2 || st["c"].Out != 2 || st["b"].Out != 3 {
		t.Errorf("stats %+v; want a: 3 in, 2 flooded; b: 3 out; c: 2 out", st)
	}
	if got := s.Pairs(); len(got) != 2 || got[0] != (SwitchPair{"a", "b", 1}) || got[1] != (SwitchPair{"b", "a", 1}) {
		t.Errorf("Pairs() = %v", got)
	}

	// A port that leaves is forgotten: frames to its address flood again.
	b.c.Close()
	waitPortGone(t, s, "b")
	f = a.frame(b.mac, 5)
	a.send(f)
	c.expect(f)
}

// waitPortGone waits until the port named name has left s.
func waitPortGone(t *testing.T, s *Switch, name string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for slicesContains(s.Ports(), name) {
		if time.Now().After(deadline) {
			t.Fatalf("port %s is still on the switch: %v", name, s.Ports())
		}
		time.Sleep(time.Millisecond)
	}
}

func slicesContains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// A frame length that is not QEMU framing closes that port only.
func TestSwitchMalformedFrameDropsPort(t *testing.T) {
	for _, n := range []uint32{0, 3, maxStreamFrame + 1, 0xffffffff} {
		s := NewSwitch(&SwitchOptions{Logger: testLogger(t)})
		a, b, c := attachRaw(t, s, "a", 1), attachRaw(t, s, "b", 2), attachRaw(t, s, "c", 3)
		bad := binary.BigEndian.AppendUint32(nil, n)
		go b.c.Write(append(bad, 1, 2, 3))
		b.c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadAll(b.c); err != nil {
			t.Errorf("length %d: the malformed port's stream was not closed: %v", n, err)
		}
		if got := s.Stats()["b"].Malformed; got != 1 {
			t.Errorf("length %d: Malformed = %d; want 1", n, got)
		}
		f := a.frame(c.mac, 9)
		a.send(f)
		c.expect(f)
		waitPortGone(t, s, "b")
		if got := s.Ports(); strings.Join(got, ",") != "a,c" {
			t.Errorf("length %d: live ports %v; want a, c", n, got)
		}
		s.Close()
	}
}

// A peer that does not read loses its own frames; the others get theirs
// and the sender is never blocked.
func TestSwitchQueueBound(t *testing.T) {
	s := NewSwitch(&SwitchOptions{Queue: 2, Logger: testLogger(t)})
	defer s.Close()
	a, _, c := attachRaw(t, s, "a", 1), attachRaw(t, s, "stuck", 2), attachRaw(t, s, "c", 3)
	const n = 10
	for i := range n {
		f := a.frame(broadcast, byte(i))
		a.send(f)
		c.expect(f)
	}
	st := s.Stats()["stuck"]
	if st.Out+st.Dropped != n || st.Out > 3 {
		t.Errorf("the stuck port: %d queued, %d dropped; want at most 3 (its writer's frame and a queue of 2) of %d queued, the rest dropped", st.Out, st.Dropped, n)
	}
	if got := s.Stats()["c"].Dropped; got != 0 {
		t.Errorf("the reading port dropped %d frames; want 0", got)
	}
}

// Two host stacks on a switch talk captp; frames go from port to port;
// Close closes the stacks, refuses new ports and ends every goroutine.
func TestSwitchStacks(t *testing.T) {
	ctx := testContext(t)
	s := NewSwitch(&SwitchOptions{Logger: testLogger(t)})
	a, err := s.NewStack(Config{Name: "a", Addrs: []netip.Prefix{netip.MustParsePrefix("10.0.9.1/24")}})
	if err != nil {
		t.Fatal(err)
	}
	b, err := s.NewStack(Config{Name: "b", Addrs: []netip.Prefix{netip.MustParsePrefix("10.0.9.2/24")}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.NewStack(Config{Name: "b"}); err == nil {
		t.Error("a second port named b was attached")
	}
	if _, err := s.NewStack(Config{}); err == nil {
		t.Error("a stack without a name was attached")
	}
	stop := serveVat(t, b, "bob", nil)
	conn, err := a.Dial(ctx, "10.0.9.2:4000", nil)
	if err != nil {
		t.Fatal(err)
	}
	boot := testcapnp.Test(conn.Bootstrap(ctx))
	if got := callName(ctx, t, boot); got != "bob" {
		t.Errorf("name() over the switch = %q; want bob", got)
	}
	boot.Release()
	if s.Frames("a", "b") == 0 || s.Frames("b", "a") == 0 {
		t.Errorf("unicast frames a→b %d, b→a %d; want some each way", s.Frames("a", "b"), s.Frames("b", "a"))
	}

	// A stack that closes leaves the switch.
	a.Close()
	waitPortGone(t, s, "a")
	if err := stop(); err != nil && !errors.Is(err, net.ErrClosed) && !strings.Contains(err.Error(), "context canceled") {
		t.Logf("serve: %v", err)
	}

	// Close closes b (its Listen fails) and ends every goroutine.
	s.Close()
	if _, err := b.Listen("*:4001"); !errors.Is(err, ErrClosed) {
		t.Errorf("listen on a stack of a closed switch: %v; want ErrClosed", err)
	}
	near, far := net.Pipe()
	if err := s.Attach("late", near); !errors.Is(err, ErrClosed) {
		t.Errorf("attach after Close: %v; want ErrClosed", err)
	}
	if _, err := far.Read(make([]byte, 1)); err == nil {
		t.Error("Attach after Close did not close the stream")
	}
	s.Close()
	goleak.VerifyNone(t)
}

// A port sending from ever new source addresses (a MAC flood) fills only
// its own share of the forwarding table; the switch goes on learning the
// other ports' addresses.
func TestSwitchMACTableBound(t *testing.T) {
	s := NewSwitch(&SwitchOptions{Logger: testLogger(t)})
	defer s.Close()
	a, c := attachRaw(t, s, "a", 1), attachRaw(t, s, "c", 3)
	const n = maxPortMACs + 100
	for i := range n {
		f := a.frame(broadcast, 0)
		copy(f[6:12], []byte{0x02, 0xff, 0, 0, byte(i >> 8), byte(i)})
		a.send(f)
	}
	c.send(c.frame(broadcast, 0))
	deadline := time.Now().Add(5 * time.Second)
	for st := s.Stats(); st["a"].In != n || st["c"].In != 1; st = s.Stats() {
		if time.Now().After(deadline) {
			t.Fatalf("frames in: a %d (want %d), c %d (want 1)", st["a"].In, n, st["c"].In)
		}
		time.Sleep(time.Millisecond)
	}
	s.mu.Lock()
	learned, onC := len(s.byMAC), s.byMAC[c.mac]
	s.mu.Unlock()
	if learned != maxPortMACs+1 || onC == nil || onC.name != "c" {
		t.Fatalf("%d addresses learned, c's on %v; want %d, c's on port c", learned, onC, maxPortMACs+1)
	}
}
