package main

import (
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"capnproto.org/go/capnp/v3/std/capnp/persistent"
	rpccp "capnproto.org/go/capnp/v3/std/capnp/rpc"

	"github.com/captp-go/captp/internal/testcapnp"
)

// methodNames names the methods the demo's vats call, by interface and
// method ID, from the generated code's own tables.
var methodNames = func() map[[2]uint64]string {
	m := map[[2]uint64]string{}
	for _, sm := range testcapnp.Test_Methods(nil, nil) {
		m[[2]uint64{sm.Method.InterfaceID, uint64(sm.Method.MethodID)}] = sm.Method.MethodName
	}
	for _, sm := range persistent.Persistent_Methods(nil, nil) {
		m[[2]uint64{sm.Method.InterfaceID, uint64(sm.Method.MethodID)}] = sm.Method.MethodName
	}
	return m
}()

func methodName(iface uint64, method uint16) string {
	if n, ok := methodNames[[2]uint64{iface, uint64(method)}]; ok {
		return n
	}
	return fmt.Sprintf("@%#x.%d", iface, method)
}

// traceOp is one kind of thing a vat did to another in a scene: a call of
// a method, a bootstrap or restore, or a Level 3 message.
type traceOp struct {
	caller, callee string
	op             string
}

// sceneTrace is what the taps saw during a scene.
type sceneTrace struct {
	ops      []traceOp // in order of first appearance
	count    map[traceOp]int
	calls    int // calls, bootstraps and restores, all links
	messages int // RPC messages, all links
}

// level3Kinds are the message kinds the trace shows besides calls: the
// steps of a three-party handoff.
var level3Kinds = map[rpccp.Message_Which]string{
	rpccp.Message_Which_provide:          "provide",
	rpccp.Message_Which_accept:           "accept",
	rpccp.Message_Which_thirdPartyAnswer: "thirdPartyAnswer",
}

// traceOf summarises the events of a scene.
func traceOf(links []linkEvents) sceneTrace {
	t := sceneTrace{count: map[traceOp]int{}}
	first := map[traceOp]time.Time{}
	for _, le := range links {
		for _, ev := range le.events {
			t.messages++
			caller, callee := le.link.from, le.link.to
			if ev.dir == received {
				caller, callee = callee, caller
			}
			var op string
			switch ev.kind {
			case rpccp.Message_Which_call:
				op = methodName(ev.iface, ev.method)
			case rpccp.Message_Which_bootstrap:
				op = "bootstrap"
				if ev.restore {
					op = "restore"
				}
			default:
				name, ok := level3Kinds[ev.kind]
				if !ok {
					continue
				}
				op = "[" + name + "]"
			}
			if ev.kind == rpccp.Message_Which_call || ev.kind == rpccp.Message_Which_bootstrap {
				t.calls++
			}
			k := traceOp{caller, callee, op}
			if t.count[k] == 0 {
				t.ops = append(t.ops, k)
				first[k] = ev.at
			}
			t.count[k]++
		}
	}
	// In the order things first happened, whichever link they were on.
	slices.SortStableFunc(t.ops, func(a, b traceOp) int { return first[a].Compare(first[b]) })
	return t
}

// callsBetween counts the calls (bootstraps and restores included) caller
// made to callee, and how many of them were op ("" for any).
func (t sceneTrace) callsBetween(caller, callee, op string) int {
	n := 0
	for _, k := range t.ops {
		if k.caller == caller && k.callee == callee && !strings.HasPrefix(k.op, "[") && (op == "" || k.op == op) {
			n += t.count[k]
		}
	}
	return n
}

// callsInto counts the calls of op that callee received from anyone.
func (t sceneTrace) callsInto(callee, op string) int {
	n := 0
	for _, k := range t.ops {
		if k.callee == callee && k.op == op {
			n += t.count[k]
		}
	}
	return n
}

// print writes who called whom, one line per pair of vats.
func (t sceneTrace) print(w io.Writer, indent string) {
	type pair struct{ caller, callee string }
	var pairs []pair
	ops := map[pair][]string{}
	for _, k := range t.ops {
		p := pair{k.caller, k.callee}
		if ops[p] == nil {
			pairs = append(pairs, p)
		}
		s := k.op
		if n := t.count[k]; n > 1 {
			s += fmt.Sprintf(" ×%d", n)
		}
		ops[p] = append(ops[p], s)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 1, ' ', 0)
	for _, p := range pairs {
		fmt.Fprintf(tw, "%s%s\t→ %s\t  %s\n", indent, p.caller, p.callee, strings.Join(ops[p], ", "))
	}
	tw.Flush()
}

// printLinks writes every link of the demo with its message counts.
func printLinks(w io.Writer, links []*demoLink) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  link\tvia\tcalls →\tcalls ←\tmessages\tpipelined")
	for _, l := range links {
		ev := l.tap.since(0)
		c := messageCounts(ev)
		out := c[sent][rpccp.Message_Which_call] + c[sent][rpccp.Message_Which_bootstrap]
		in := c[received][rpccp.Message_Which_call] + c[received][rpccp.Message_Which_bootstrap]
		r := analyse(ev, 0)
		fmt.Fprintf(tw, "  %s → %s\t%s\t%d\t%d\t%d\t%d\n", l.from, l.to, l.via, out, in, len(ev), r.pipelined)
	}
	tw.Flush()
}
