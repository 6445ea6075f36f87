package main

import (
	"context"
	"fmt"
	"slices"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/core"
	"github.com/captp-go/captp/core/sturdyref"
	"github.com/captp-go/captp/internal/testcapnp"
	"github.com/captp-go/captp/internal/testimpl"
)

// sturdyRef: the provider saves a service under a new service ID and
// prints its capnp URI; the client, holding only the URI, restores it
// (a Bootstrap naming the service), loses the connection, and restores it
// again on a new one.
func (d *demo) sturdyRef(provider, client *demoVat) error {
	sid, err := sturdyref.NewServiceID()
	if err != nil {
		return err
	}
	const service = "ledger"
	if err := provider.restorer.Add(sid, capnp.Client(testimpl.New(service, provider.live).Client())); err != nil {
		return err
	}
	uri := provider.restorer.Ref(sid).String()
	d.say("  %s saved %q: %s", provider.name, service, uri)
	ref, err := sturdyref.Parse(uri)
	if err != nil {
		return fmt.Errorf("parse the URI %s printed: %w", provider.name, err)
	}
	before := d.g.mark()
	rc := sturdyref.NewReconnecting(ref, client.dial, &sturdyref.ReconnectOptions{
		MinBackoff: 5 * time.Millisecond, // the demo's network does not need the default 50ms
		Logger:     d.log.With("vat", client.name),
	})
	defer rc.Close()
	name := func() (string, error) {
		var got string
		err := rc.Do(d.ctx, func(ctx context.Context, c capnp.Client) error {
			var err error
			got, err = callName(ctx, testcapnp.Test(c))
			return err
		})
		return got, err
	}
	got, err := name()
	if err != nil {
		return fmt.Errorf("%s restores the URI: %w", client.name, err)
	}
	if got != service {
		return fmt.Errorf("%s restored the URI and got %q; want %q", client.name, got, service)
	}
	d.say("  %s restored the URI → name() = %q", client.name, got)

	// Drop the connection under the restored capability.
	var dropped *demoLink
	for _, l := range d.g.linksSnapshot() {
		if _, old := before[l]; !old && l.from == client.name && l.to == provider.name {
			dropped = l
		}
	}
	if dropped == nil {
		return fmt.Errorf("no %s → %s connection for the restore", client.name, provider.name)
	}
	dropped.conn.Close()
	<-dropped.conn.Done()
	d.say("  %s's connection to %s dropped", client.name, provider.name)

	if got, err = name(); err != nil {
		return fmt.Errorf("%s restores the URI again: %w", client.name, err)
	}
	if got != service {
		return fmt.Errorf("%s restored the URI again and got %q; want %q", client.name, got, service)
	}
	events := d.g.since(before)
	t := traceOf(events)
	conns := 0
	for _, le := range events {
		if le.link.from == client.name && le.link.to == provider.name {
			conns++
		}
	}
	if restores := t.callsBetween(client.name, provider.name, "restore"); restores != 2 || conns != 2 {
		return fmt.Errorf("%d restores over %d connections; want 2 over 2", restores, conns)
	}
	d.say("  %s redialed and restored the URI → name() = %q", client.name, got)
	t.print(d.w, "    ")
	return nil
}

// handoff: alice hands bob a capability on carol (alice dialed carol, so
// she knows where carol is). Bob's calls on it may go through alice
// while bob connects to carol; once the capability has resolved, none
// does, and they keep working after alice hangs up on carol, in order.
func (d *demo) handoff(alice, bob, carol *demoVat) error {
	during := d.g.mark()
	ac, carolCap, err := d.capOf(alice.name, carol.name)
	if err != nil {
		return err
	}
	_, bobCap, err := d.capOf(alice.name, bob.name)
	if err != nil {
		return err
	}
	f, release := bobCap.Hold(d.ctx, func(p testcapnp.Test_hold_Params) error { return p.SetCap(carolCap.AddRef()) })
	_, err = f.Struct()
	release()
	if err != nil {
		return fmt.Errorf("alice → bob hold(carol): %w", err)
	}
	d.say("  alice → bob  hold(cap: carol's object); bob calls it")
	held := testcapnp.Test(bob.obj.Held())
	defer held.Release()
	first := len(carol.obj.Log())
	n := uint32(0)
	seq := func(count int) error {
		for range count {
			f, release := held.Seq(d.ctx, func(p testcapnp.Test_seq_Params) error { p.SetN(n); return nil })
			_, err := f.Struct()
			release()
			if err != nil {
				return fmt.Errorf("bob → carol seq(%d): %w", n, err)
			}
			n++
		}
		return nil
	}

	if err := seq(5); err != nil {
		return err
	}
	if err := capnp.Client(held).Resolve(d.ctx); err != nil {
		return fmt.Errorf("bob's capability on carol did not resolve: %w", err)
	}
	t1 := traceOf(d.g.since(during))
	viaAlice := t1.callsBetween("alice", "carol", "seq")
	d.say("  while the handoff completes: bob → carol seq ×5, %d through alice's vine, %d direct",
		viaAlice, t1.callsBetween("bob", "carol", "seq"))
	t1.print(d.w, "    ")

	after := d.g.mark()
	if err := seq(10); err != nil {
		return err
	}
	ac.Close()
	<-ac.Done()
	delete(d.caps, [2]string{alice.name, carol.name})
	if err := seq(5); err != nil {
		return fmt.Errorf("after alice hung up on carol: %w", err)
	}
	t2 := traceOf(d.g.since(after))
	throughAlice := t2.callsBetween("alice", "carol", "") + t2.callsBetween("bob", "alice", "") + t2.callsBetween("alice", "bob", "")
	direct := t2.callsBetween("bob", "carol", "seq")
	if throughAlice != 0 || direct != 15 {
		return fmt.Errorf("after the handoff: %d calls through alice, %d seq calls bob → carol; want 0 and 15", throughAlice, direct)
	}
	log := carol.obj.Log()[first:]
	want := make([]uint32, n)
	for i := range want {
		want[i] = uint32(i)
	}
	if !slices.Equal(log, want) {
		return fmt.Errorf("carol's seq log %v; want %v (E-order across the handoff)", log, want)
	}
	d.say("  afterwards: bob → carol seq ×10, alice hangs up on carol, seq ×5: %d direct, %d through alice", direct, throughAlice)
	t2.print(d.w, "    ")
	d.say("  carol got seq 0…%d in order", n-1)

	f2, release2 := bobCap.DropHeld(d.ctx, nil)
	_, err = f2.Struct()
	release2()
	if err != nil {
		return fmt.Errorf("alice → bob dropHeld: %w", err)
	}
	return nil
}

// guest: the host dials the guest's vat over its virtio-net link (a tap
// on the connection), runs the pipelined chain on it, and passes
// capabilities between the guest and alice, which the host relays (the
// guest's link has no TLS identity, so no Level 3).
func (d *demo) guest(gs guestStart) (err error) {
	g := gs.g
	defer func() {
		code, cerr := g.Close()
		if err == nil && cerr != nil {
			err = fmt.Errorf("guest: %w", cerr)
		} else if err == nil && code != 0 {
			err = fmt.Errorf("guest exited with code %d", code)
		}
	}()
	d.say("  guest booted in %s (QEMU microvm, TCG); host dials it over virtio-net", fmtDuration(gs.took))
	nc, err := g.stack.DialTCP(d.ctx, guestTCPAddr.String())
	if err != nil {
		return fmt.Errorf("host → guest: %w", err)
	}
	conn := d.g.connect("host", "guest", "virtio-net", nc, &core.Options{})
	defer func() { conn.Close(); <-conn.Done() }()
	guestCap := testcapnp.Test(conn.Bootstrap(d.ctx))
	defer guestCap.Release()
	if err := capnp.Client(guestCap).Resolve(d.ctx); err != nil {
		return fmt.Errorf("host → guest bootstrap: %w", err)
	}
	if err := d.pipelineReport("host", "guest", conn, guestCap); err != nil {
		return err
	}

	_, aliceCap, err := d.capOf("host", "alice")
	if err != nil {
		return err
	}
	before := d.g.mark()
	if err := callBack(d.ctx, guestCap, aliceCap, "hi alice"); err != nil {
		return fmt.Errorf("host → guest callBack(alice, …): %w", err)
	}
	if err := callBack(d.ctx, aliceCap, guestCap, "hi guest"); err != nil {
		return fmt.Errorf("host → alice callBack(guest, …): %w", err)
	}
	t := traceOf(d.g.since(before))
	for _, c := range [][2]string{{"guest", "host"}, {"host", "alice"}, {"alice", "host"}, {"host", "guest"}} {
		if t.callsBetween(c[0], c[1], "echo") != 1 {
			return fmt.Errorf("%s → %s: %d echo calls; want 1 (the host relays between the guest and alice)", c[0], c[1], t.callsBetween(c[0], c[1], "echo"))
		}
	}
	d.say("  host → guest  callBack(cb: alice's object) → guest called alice.echo, through the host")
	d.say("  host → alice  callBack(cb: the guest's object) → alice called guest.echo, through the host")
	t.print(d.w, "    ")
	return nil
}
