package netstack

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sort"
	"sync"

	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// DefaultSwitchQueue is how many frames a Switch port queues for its peer
// unless SwitchOptions.Queue says otherwise.
const DefaultSwitchQueue = 512

// SwitchOptions configure a Switch. The zero value is valid.
type SwitchOptions struct {
	// Queue bounds the frames waiting to be written to each port; a
	// frame for a port whose queue is full is dropped (and counted), as a
	// hardware switch does: TCP resends. Zero means DefaultSwitchQueue.
	Queue int

	// Logger receives diagnostics; nil discards them.
	Logger *slog.Logger
}

// A Switch is a learning Ethernet switch between byte streams that carry
// frames in QEMU's -netdev stream framing (each frame preceded by its
// length as a 4-byte big-endian number): QEMU guests' network sockets
// (Attach) and host Stacks (NewStack). It joins them on one Ethernet
// segment, the way a bridge on a host joins virtual machines' taps, but in
// the process and without root.
//
// A Switch learns which port each source MAC address is on and sends a
// unicast frame only to its destination's port; broadcasts, multicasts and
// frames for addresses it has not seen go to every other port. Each port
// has a reader goroutine, which never blocks on another port, and a
// writer goroutine draining a bounded queue: a slow or stuck peer loses
// its own frames and slows nobody else. A port whose stream is not QEMU
// framing (a length shorter than an Ethernet header or longer than the
// largest frame) is closed and leaves the switch; the other ports go on.
//
// Frames(from, to) and Stats count what was switched, by port name, so a
// test can tell that two guests talk to each other directly.
type Switch struct {
	queue int
	log   *slog.Logger
	wg    sync.WaitGroup

	mu     sync.Mutex
	closed bool
	ports  []*switchPort           // in attach order; floods go to all
	byName map[string]*switchPort  // live ports
	byMAC  map[[6]byte]*switchPort // learned unicast sources
	stacks map[*Stack]struct{}     // made by NewStack, closed by Close
	pairs  map[[2]string]uint64    // unicast frames switched, by source and destination port name
	stats  map[string]*PortStats   // every port that was ever attached, by name
}

// PortStats count the frames of one Switch port.
type PortStats struct {
	// In counts the well-formed frames the port's peer sent into the
	// switch; Out the frames written to it.
	In, Out uint64
	// Flooded counts the frames from this port that went to every other
	// port (broadcast, multicast or an unknown destination).
	Flooded uint64
	// Dropped counts the frames for this port lost because its queue
	// was full.
	Dropped uint64
	// Malformed is 1 if the port was closed for a frame length that is
	// not QEMU framing.
	Malformed uint64
}

// NewSwitch returns a switch without ports. opts may be nil.
func NewSwitch(opts *SwitchOptions) *Switch {
	var o SwitchOptions
	if opts != nil {
		o = *opts
	}
	if o.Queue <= 0 {
		o.Queue = DefaultSwitchQueue
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return &Switch{
		queue:  o.Queue,
		log:    o.Logger,
		byName: make(map[string]*switchPort),
		byMAC:  make(map[[6]byte]*switchPort),
		stacks: make(map[*Stack]struct{}),
		pairs:  make(map[[2]string]uint64),
		stats:  make(map[string]*PortStats),
	}
}

type switchPort struct {
	name      string
	macs      int // addresses learned on this port; guarded by Switch.mu
	rwc       io.ReadWriteCloser
	out       chan []byte
	done      chan struct{}
	closeOnce sync.Once
}

// Attach adds a port named name on rwc, such as the connection QEMU made
// to a -netdev stream socket. The switch owns rwc: it closes it when the
// stream fails, when the port is malformed, on Close, and when Attach
// fails. rwc.Close must unblock a pending Read and Write (as net.Conn's
// does). Names label the counters and must be unique among live ports; a
// name may be reused once its port has left.
func (s *Switch) Attach(name string, rwc io.ReadWriteCloser) error {
	p := &switchPort{name: name, rwc: rwc, out: make(chan []byte, s.queue), done: make(chan struct{})}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		rwc.Close()
		return fmt.Errorf("netstack: switch: attach %s: switch %w", name, ErrClosed)
	}
	if _, dup := s.byName[name]; dup {
		s.mu.Unlock()
		rwc.Close()
		return fmt.Errorf("netstack: switch: attach %s: a port of that name is already attached", name)
	}
	s.ports = append(s.ports, p)
	s.byName[name] = p
	if s.stats[name] == nil {
		s.stats[name] = &PortStats{}
	}
	s.wg.Add(2)
	s.mu.Unlock()
	go s.readLoop(p)
	go s.writeLoop(p)
	s.log.Debug("netstack: switch: port attached", "port", name)
	return nil
}

// NewStack creates a host Stack with a port named cfg.Name on the switch
// (cfg.Name must be set). Its link is a StreamLink (MTU DefaultStreamMTU
// unless cfg.MTU says otherwise, which must match the guests') over an
// in-process pipe. Closing the stack takes its port off the switch;
// closing the switch closes the stack.
func (s *Switch) NewStack(cfg Config) (*Stack, error) {
	if cfg.Name == "" {
		return nil, errors.New("netstack: switch: new stack: Config.Name must name its port")
	}
	if cfg.Logger == nil {
		cfg.Logger = s.log
	}
	near, far := net.Pipe()
	if err := s.Attach(cfg.Name, near); err != nil {
		far.Close()
		return nil, fmt.Errorf("netstack: switch: new stack: %w", err)
	}
	st, err := New(NewStreamLink(far, &StreamLinkOptions{Logger: cfg.Logger}), cfg)
	if err != nil {
		return nil, err // New closed the link, so the port ends too
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		st.Close()
		return nil, fmt.Errorf("netstack: switch: new stack %s: switch %w", cfg.Name, ErrClosed)
	}
	s.stacks[st] = struct{}{}
	s.mu.Unlock()
	st.mu.Lock()
	st.onClose = func() {
		s.mu.Lock()
		delete(s.stacks, st)
		s.mu.Unlock()
	}
	st.mu.Unlock()
	return st, nil
}

// close ends the port's stream, once; its goroutines then end.
func (p *switchPort) close() {
	p.closeOnce.Do(func() {
		close(p.done)
		p.rwc.Close()
	})
}

// maxPortMACs bounds the source addresses the switch learns on one port:
// a peer sending from ever new addresses (a MAC flood) would otherwise
// grow the table without end. Beyond it the port's frames are still
// switched, but frames for its unlearned addresses are flooded.
const maxPortMACs = 1024

// minSwitchFrame is the shortest frame a port may send: an Ethernet
// header. (StreamLink pads to 60 bytes; QEMU sends at least that.)
const minSwitchFrame = header.EthernetMinimumSize

func (s *Switch) readLoop(p *switchPort) {
	defer s.wg.Done()
	defer s.leave(p)
	r := bufio.NewReaderSize(p.rwc, 64<<10)
	var hdr [4]byte
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			s.logEnd(p, err)
			return
		}
		n := binary.BigEndian.Uint32(hdr[:])
		if n < minSwitchFrame || n > maxStreamFrame {
			s.mu.Lock()
			s.stats[p.name].Malformed++
			s.mu.Unlock()
			s.log.Warn("netstack: switch: frame length is not QEMU stream framing; closing the port",
				"port", p.name, "len", n, "want", fmt.Sprintf("%d-%d", minSwitchFrame, maxStreamFrame))
			return
		}
		f := make([]byte, n)
		if _, err := io.ReadFull(r, f); err != nil {
			s.logEnd(p, err)
			return
		}
		s.forward(p, f)
	}
}

func (s *Switch) logEnd(p *switchPort, err error) {
	select {
	case <-p.done: // closed by us
	default:
		s.log.Debug("netstack: switch: port's stream ended", "port", p.name, "err", err)
	}
}

func (s *Switch) writeLoop(p *switchPort) {
	defer s.wg.Done()
	defer p.close()
	var buf []byte
	for {
		select {
		case f := <-p.out:
			// One write per frame: a stream socket may interleave
			// nothing, but fewer system calls are cheaper.
			buf = append(buf[:0], 0, 0, 0, 0)
			binary.BigEndian.PutUint32(buf, uint32(len(f)))
			buf = append(buf, f...)
			if _, err := p.rwc.Write(buf); err != nil {
				return
			}
		case <-p.done:
			return
		}
	}
}

// leave closes p and takes it off the switch: out of the flood list and
// the forwarding table.
func (s *Switch) leave(p *switchPort) {
	p.close()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.byName[p.name] == p {
		delete(s.byName, p.name)
	}
	for mac, q := range s.byMAC {
		if q == p {
			delete(s.byMAC, mac)
		}
	}
	// Copy on write: forward may be iterating over the old slice.
	ports := make([]*switchPort, 0, len(s.ports))
	for _, q := range s.ports {
		if q != p {
			ports = append(ports, q)
		}
	}
	s.ports = ports
	s.log.Debug("netstack: switch: port left", "port", p.name)
}

// forward learns f's source address and queues f for its destination's
// port, or for every other port (flooding). f is read-only from here on:
// the ports it floods to share it.
func (s *Switch) forward(src *switchPort, f []byte) {
	var dst, from [6]byte
	copy(dst[:], f[0:6])
	copy(from[:], f[6:12])
	s.mu.Lock()
	st := s.stats[src.name]
	st.In++
	if from[0]&1 == 0 { // a multicast source is bogus: do not learn it
		s.learnLocked(src, from)
	}
	var to []*switchPort
	if q := s.byMAC[dst]; dst[0]&1 == 0 && q != nil {
		if q == src {
			s.mu.Unlock()
			return // the destination is on the port it came from
		}
		to = []*switchPort{q}
		s.pairs[[2]string{src.name, q.name}]++
	} else {
		st.Flooded++
		to = s.ports
	}
	for _, q := range to {
		if q == src {
			continue
		}
		select {
		case q.out <- f:
			s.stats[q.name].Out++ // counted when queued: the writer may yet fail
		default:
			s.stats[q.name].Dropped++
		}
	}
	s.mu.Unlock()
}

// learnLocked records that mac is on port p, unless p has learned
// maxPortMACs addresses already. An address that moved is forgotten on
// its old port either way.
func (s *Switch) learnLocked(p *switchPort, mac [6]byte) {
	q := s.byMAC[mac]
	if q == p {
		return
	}
	if q != nil {
		q.macs--
		delete(s.byMAC, mac)
	}
	if p.macs < maxPortMACs {
		s.byMAC[mac] = p
		p.macs++
	}
}

// Frames returns how many unicast frames the switch has sent from the
// port named from to the port named to (flooded frames not included).
func (s *Switch) Frames(from, to string) uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pairs[[2]string{from, to}]
}

// Stats returns the counters of every port that was ever attached, by
// name (a reused name continues its predecessor's counters).
func (s *Switch) Stats() map[string]PortStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]PortStats, len(s.stats))
	for name, st := range s.stats {
		out[name] = *st
	}
	return out
}

// A SwitchPair counts the unicast frames from one port to another.
type SwitchPair struct {
	From, To string
	Frames   uint64
}

// Pairs returns the unicast frame counts between ports, sorted by source
// and destination name.
func (s *Switch) Pairs() []SwitchPair {
	s.mu.Lock()
	out := make([]SwitchPair, 0, len(s.pairs))
	for k, n := range s.pairs {
		out = append(out, SwitchPair{From: k[0], To: k[1], Frames: n})
	}
	s.mu.Unlock()
	sort.Slice(out, func(i, j int) bool {
		if out[i].From != out[j].From {
			return out[i].From < out[j].From
		}
		return out[i].To < out[j].To
	})
	return out
}

// Ports returns the names of the live ports, in attach order.
func (s *Switch) Ports() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	names := make([]string, len(s.ports))
	for i, p := range s.ports {
		names[i] = p.name
	}
	return names
}

// Close closes the stacks made by NewStack and every port's stream, waits
// until all of the switch's goroutines have ended, and refuses new ports.
// Closing twice is harmless; it always returns nil.
func (s *Switch) Close() error {
	s.mu.Lock()
	s.closed = true
	stacks := make([]*Stack, 0, len(s.stacks))
	for st := range s.stacks {
		stacks = append(stacks, st)
	}
	s.mu.Unlock()
	for _, st := range stacks {
		st.Close()
	}
	s.mu.Lock()
	ports := s.ports
	s.mu.Unlock()
	for _, p := range ports {
		p.close()
	}
	s.wg.Wait()
	return nil
}
