package core

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"testing"

	"capnproto.org/go/capnp/v3"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"
)

// simNetwork is a vat's Network in the simulation: the vats are connected
// by the sim's links, a handoff's values are "vat|nonce" texts, and the
// network declines one introduction in four (so both handoff and
// proxying are exercised). It runs in the simulation's one goroutine.
type simNetwork struct {
	s   *sim
	vat int
	v   *Vat
}

func (n *simNetwork) end(c *Conn) (simConnEnd, bool) {
	e, ok := n.s.peerOf[c]
	return e, ok && e.me == n.vat && !isDone(c)
}

func simText(s string) capnp.Ptr {
	_, seg, _ := capnp.NewMessage(capnp.SingleSegment(nil))
	t, _ := capnp.NewText(seg, s)
	return t.ToPtr()
}

func simSplit(p capnp.Ptr) (vat int, nonce string, err error) {
	a, b, ok := strings.Cut(p.Text(), "|")
	if !ok {
		return 0, "", fmt.Errorf("malformed %q", p.Text())
	}
	vat, err = strconv.Atoi(a)
	return vat, b, err
}

func (n *simNetwork) Introduce(host, recipient *Conn) (capnp.Ptr, capnp.Ptr, bool, error) {
	h, hok := n.end(host)
	r, rok := n.end(recipient)
	if !hok || !rok || n.s.rng.Intn(4) == 0 {
		return capnp.Ptr{}, capnp.Ptr{}, false, nil
	}
	n.s.nonce++
	nonce := strconv.Itoa(n.s.nonce)
	n.s.handoffs = append(n.s.handoffs, simHandoff{provider: n.vat, host: h.peer, recipient: r.peer, nonce: nonce})
	n.s.logf("vat %d introduces vat %d to vat %d's capability (nonce %s)", n.vat, r.peer, h.peer, nonce)
	return simText(fmt.Sprintf("%d|%s", h.peer, nonce)), simText(fmt.Sprintf("%d|%s", r.peer, nonce)), true, nil
}

func (n *simNetwork) Connect(ctx context.Context, via *Conn, toContact capnp.Ptr) (*Conn, capnp.Ptr, error) {
	host, nonce, err := simSplit(toContact)
	if err != nil {
		return nil, capnp.Ptr{}, err
	}
	e, ok := n.s.peerOf[via]
	if !ok || host == n.vat || host < 0 || host >= len(n.s.vats) {
		return nil, capnp.Ptr{}, errors.New("no such host")
	}
	c := n.s.link(n.vat, host).conn(n.vat)
	if isDone(c) {
		return nil, capnp.Ptr{}, errors.New("link to the host is down")
	}
	return c, simText(fmt.Sprintf("%d|%s", e.peer, nonce)), nil
}

func (n *simNetwork) Expect(provider *Conn, toAwait capnp.Ptr) (string, error) {
	r, nonce, err := simSplit(toAwait)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%d>%d|%s", n.s.peerOf[provider].peer, r, nonce), nil
}

func (n *simNetwork) Complete(recipient *Conn, completion capnp.Ptr) (string, error) {
	p, nonce, err := simSplit(completion)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%d>%d|%s", p, n.s.peerOf[recipient].peer, nonce), nil
}

// Seed 7382 (5 vats, 600 steps) found that a capability handed off in a
// Return must be embargoed like one in a Resolve when calls were
// pipelined on the question: those went through the introducer, and the
// recipient's direct calls overtook them.
func TestSimLevel3Seed7382ReturnEmbargo(t *testing.T) {
	cfg := simConfig{Seed: 7382, Vats: 5, Steps: 600, Level3: true}
	if f := runSim(cfg); f != nil {
		reportSimFailure(t, cfg, f)
	}
}

// Seed 500332 (4 vats, 600 steps, thieves) found that an Accept matched
// to a provision whose target was already released put that released
// reference into its results: a call pipelined on the Accept then
// AddRef'd it, a panic in the host's reader.
func TestSimLevel3Seed500332ReleasedProvision(t *testing.T) {
	cfg := simConfig{Seed: 500332, Vats: 4, Steps: 600, Level3: true, Thieves: true}
	if f := runSim(cfg); f != nil {
		reportSimFailure(t, cfg, f)
	}
}

// simHandoff is one introduction: provider told host to expect recipient.
type simHandoff struct {
	provider, host, recipient int
	nonce                     string
}

// steal has a vat other than the recipient (or, at times, the recipient
// again) present a handoff's completion to its host.
func (s *sim) steal() {
	if len(s.handoffs) == 0 {
		return
	}
	h := s.handoffs[s.thiefRng.Intn(len(s.handoffs))]
	thief := s.thiefRng.Intn(len(s.vats))
	if thief == h.host {
		return
	}
	c := s.link(thief, h.host).conn(thief)
	if isDone(c) {
		return
	}
	completion := fmt.Sprintf("%d|%s", h.provider, h.nonce)
	s.logf("vat %d presents completion %q (meant for vat %d) to vat %d", thief, completion, h.recipient, h.host)
	got := c.requestCap(context.Background(), "accept", nil, func(m rpccp.Message, qid uint32) error {
		acc, err := m.NewAccept()
		if err != nil {
			return err
		}
		acc.SetQuestionId(qid)
		return acc.SetProvision(simText(completion))
	})
	hd := s.addHandle(s.vats[thief], got, fmt.Sprintf("accepted with completion %q (meant for vat %d)", completion, h.recipient))
	if thief != h.recipient {
		s.stolen = append(s.stolen, simStolen{thief, hd})
	}
}

// simStolen is what a thief got, and which vat holds it.
type simStolen struct {
	vat int
	h   *simHandle
}

// checkStolen fails the run if a thief's Accept got a capability (one the
// thief still holds; a dropped one cannot be inspected).
func (s *sim) checkStolen() {
	for _, st := range s.stolen {
		if !slices.Contains(s.vats[st.vat].handles, st.h) {
			continue
		}
		snap := st.h.client.Snapshot()
		_, broken := snap.Brand().Value.(error)
		snap.Release()
		if !broken {
			s.failf("a thief's Accept (vat %d, h%d: %s) got a capability", st.vat, st.h.id, st.h.desc)
		}
	}
}
