package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"capnproto.org/go/capnp/v3"

	"github.com/captp-go/captp/adapters/unix"
	"github.com/captp-go/captp/core/sturdyref"
	"github.com/captp-go/captp/internal/testcapnp"
)

// Command lines a group refuses, with a message that says what to do;
// checked without QEMU.
func TestHostGroupUsage(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "x.elf")
	if err := os.WriteFile(img, []byte("not booted"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"-image", img, "-image", img, "-listen", "unix:" + dir + "/g.sock"}, exitUsage, "name a directory"},
		{[]string{"-image", "a=" + img, "-image", "b=" + img, "-listen", "unix:" + dir + "/", "-net", "user"}, exitUsage, "-net stream"},
		{[]string{"-image", "a=" + img, "-listen", "unix:" + dir + "/", "-via", "tcp"}, exitUsage, "serial ports"},
		{[]string{"-image", "a=" + img, "-image", "a=" + img, "-listen", "unix:" + dir + "/"}, exitUsage, "two guests named a"},
		{[]string{"-image", "host=" + img, "-listen", "unix:" + dir + "/"}, exitUsage, "two guests named host"},
		{[]string{"-image", "a=" + img, "-listen", "unix:" + dir + "/", "-subnet", "192.168.0.0/24"}, exitUsage, "10.A.B.0/24"},
		{[]string{"-image", "a=" + img, "-listen", "unix:" + dir + "/", "-net", "none", "-forward", "4433"}, exitUsage, "-forward needs"},
		{[]string{"-image", "a b=" + img, "-listen", "unix:" + dir + "/"}, exitUsage, "letters, digits"},
		{[]string{"-image", "a=" + img, "-listen", "unix:" + dir + "/", "-forward", "0"}, exitUsage, "1-65535"},
		{[]string{"-image", "a=/nonexistent.elf", "-listen", "unix:" + dir + "/"}, exitFail, "guest a: guest image"},
	} {
		var out, errOut bytes.Buffer
		code := run(context.Background(), append([]string{"host"}, tc.args...), &out, &errOut)
		if code != tc.code || !strings.Contains(errOut.String(), tc.want) {
			t.Errorf("captp host %q: exit %d, stderr %q; want exit %d and %q", tc.args, code, errOut.String(), tc.code, tc.want)
		}
	}
}

// Names, MAC addresses and addresses of a group's guests.
func TestHostGroupPlan(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "level3vat.elf")
	if err := os.WriteFile(img, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	var images hostImages
	for _, v := range []string{"carol=" + img, img, img} {
		if err := images.Set(v); err != nil {
			t.Fatal(err)
		}
	}
	hg := &hostGroup{cfg: hostGroupConfig{
		guest: guestConfig{Net: netStream}, images: images, listen: "unix:" + dir + "/",
		segment: netip.MustParsePrefix("10.1.2.0/24"),
	}}
	if err := hg.check(); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, gg := range hg.guests {
		got = append(got, fmt.Sprintf("%s %s %v %s", gg.name, gg.mac, gg.addr, filepath.Base(gg.sock)))
	}
	want := []string{
		"carol 52:54:00:01:02:02 10.1.2.2 carol.sock",
		"level3vat 52:54:00:01:02:03 10.1.2.3 level3vat.sock",
		"level3vat-2 52:54:00:01:02:04 10.1.2.4 level3vat-2.sock",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("guests:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if hg.host.String() != "10.1.2.1/24" {
		t.Errorf("host at %v; want 10.1.2.1/24", hg.host)
	}
	for _, gg := range hg.guests {
		p, err := addrFromMACString(gg.mac)
		if err != nil || p != gg.addr {
			t.Errorf("%s: MAC %s gives %v (%v) by level3vat's rule; want %v", gg.name, gg.mac, p, err, gg.addr)
		}
	}
}

// captp host with two level3vat guests on one segment, driven from
// outside the process as a user would: a host vat (Alice) reads each
// guest's sturdy ref over its re-served bootstrap socket, dials both over
// the forwarded TLS port, and hands Bob a capability on Carol. Bob picks
// it up from Carol over the segment: once Alice's vine is released she
// relays no more calls, the switch carries frames from Bob's port to
// Carol's, and Carol receives every call in order.
func TestHostCommandGroupHandoff(t *testing.T) {
	img := level3Image(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	g := startGroup(ctx, t, func(dir string) []string {
		return []string{"host", "-image", "carol=" + img, "-image", "bob=" + img, "-listen", "unix:" + dir + "/", "-forward", "4433", "-boot-timeout", "2m"}
	})
	dir, out, hg := g.dir, g.out, g.hg
	stopped := false
	stopHost := func() {
		if stopped {
			return
		}
		stopped = true
		g.stop()
		if code := <-g.done; code != exitOK {
			t.Errorf("captp host exit %d; want 0:\n%s", code, out.String())
		}
	}
	defer stopHost()
	t.Logf("captp host:\n%s", out.String())
	for _, w := range []string{"booting carol (level3vat.elf, mac 52:54:00:00:00:02, at 10.0.0.2)", "carol ready in", "bob ready in", " at 10.0.0.3; bootstrap on unix:" + filepath.Join(dir, "bob.sock")} {
		if !strings.Contains(out.String(), w) {
			t.Errorf("captp host's status lines lack %q", w)
		}
	}

	// The guests' bootstrap objects over their re-served serial sockets:
	// their names are their sturdy refs.
	serial := map[string]testcapnp.Test{}
	refs := map[string]sturdyref.Ref{}
	byHost := map[string]string{}
	for _, name := range []string{"carol", "bob"} {
		c, err := unix.Dial(ctx, "unix:"+filepath.Join(dir, name+".sock"), nil)
		if err != nil {
			t.Fatalf("dial %s's re-served bootstrap: %v", name, err)
		}
		defer func() { c.Close(); <-c.Done() }()
		serial[name] = testcapnp.Test(c.Bootstrap(ctx))
		defer serial[name].Release()
		if refs[name], err = level3Ref(ctx, serial[name]); err != nil {
			t.Fatalf("%s's sturdy ref over its re-served socket: %v", name, err)
		}
		byHost[refs[name].Address.Host] = name
	}
	t.Logf("carol is %s, bob is %s", refs["carol"], refs["bob"])
	if refs["carol"].Address.Host != "10.0.0.2" || refs["bob"].Address.Host != "10.0.0.3" {
		t.Fatalf("guests at %s and %s; want 10.0.0.2 and 10.0.0.3 (from the MAC addresses captp host gave them)", refs["carol"].Address.Host, refs["bob"].Address.Host)
	}

	// Alice dials the guests' TLS service through the forwarded sockets.
	alice, err := newHostVat(testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	alice.raw = func(ctx context.Context, ref sturdyref.Ref) (net.Conn, error) {
		name, ok := byHost[ref.Address.Host]
		if !ok {
			return nil, fmt.Errorf("no guest at %s", ref.Address.Host)
		}
		var d net.Dialer
		return d.DialContext(ctx, "unix", filepath.Join(dir, fmt.Sprintf("%s.%d.sock", name, ref.Address.Port)))
	}
	ac, err := alice.net.Dial(ctx, refs["carol"])
	if err != nil {
		t.Fatalf("Alice dials Carol through the forwarded port: %v", err)
	}
	defer func() { ac.Close(); <-ac.Done() }()
	carolCap := testcapnp.Test(ac.Bootstrap(ctx))
	defer carolCap.Release()
	if err := capnp.Client(carolCap).Resolve(ctx); err != nil {
		t.Fatalf("bootstrap Carol: %v", err)
	}
	ab, err := alice.net.Dial(ctx, refs["bob"])
	if err != nil {
		t.Fatalf("Alice dials Bob through the forwarded port: %v", err)
	}
	defer func() { ab.Close(); <-ab.Done() }()
	relay := testcapnp.Test(ab.Restore(ctx, []byte("relay")))
	defer relay.Release()

	// Alice hands Bob her capability on Carol; Bob calls it through his
	// relay while he picks it up from Carol, until the vine is released.
	hf, hrel := relay.Hold(ctx, func(p testcapnp.Test_hold_Params) error { return p.SetCap(carolCap.AddRef()) })
	if _, err := hf.Struct(); err != nil {
		t.Fatalf("Bob holds Carol's capability: %v", err)
	}
	hrel()
	var futures []testcapnp.Test_seq_Results_Future
	call := func() {
		f, rel := relaySeq(ctx, relay, uint32(len(futures)))
		futures = append(futures, f)
		t.Cleanup(rel)
	}
	vineReleased := func() bool { return ab.Stats().Exports == 0 && ac.Stats().Questions == 0 }
	deadline := time.Now().Add(handoffTimeout)
	for !vineReleased() {
		if time.Now().After(deadline) {
			t.Fatalf("the vine was not released within %v (did Bob reach Carol over the segment?): Alice→Bob %v, Alice→Carol %v; frames bob→carol %d",
				handoffTimeout, ab.Stats(), ac.Stats(), hg.sw.Frames("bob", "carol"))
		}
		call()
		time.Sleep(20 * time.Millisecond)
	}
	for i, f := range futures {
		if _, err := f.Struct(); err != nil {
			t.Fatalf("relay.seq(%d): %v", i, err)
		}
	}
	throughAlice := alice.calls(refs["carol"])
	bobToCarol := hg.sw.Frames("bob", "carol")
	n := len(futures)
	const after = 20
	for range after {
		call()
	}
	for i, f := range futures[n:] {
		if _, err := f.Struct(); err != nil {
			t.Fatalf("relay.seq(%d) after the handoff: %v", n+i, err)
		}
	}
	t.Logf("Bob made %d calls during the handoff and %d after; Alice relayed %d; frames bob→carol %d then %d",
		n, after, throughAlice, bobToCarol, hg.sw.Frames("bob", "carol"))
	if got := alice.calls(refs["carol"]) - throughAlice; got != 0 {
		t.Errorf("Alice sent Carol %d more calls after the handoff; want 0 (Bob calls Carol directly)", got)
	}
	if got := hg.sw.Frames("bob", "carol"); got <= bobToCarol {
		t.Errorf("frames bob→carol: %d before Bob's %d calls after the handoff, %d after; want more (he calls Carol over the segment)", bobToCarol, after, got)
	}
	checkSeqLog(t, ctx, "carol", serial["carol"], len(futures))
	df, drel := relay.DropHeld(ctx, nil)
	if _, err := df.Struct(); err != nil {
		t.Errorf("relay.dropHeld: %v", err)
	}
	drel()

	// Alice leaves; captp host stops the guests and reports.
	ac.Close()
	ab.Close()
	<-ac.Done()
	<-ab.Done()
	stopHost()
	t.Logf("captp host, stopped:\n%s", out.String())
	for _, w := range []string{"guest carol exited with status 0", "guest bob exited with status 0", "bob→carol"} {
		if !strings.Contains(out.String(), w) {
			t.Errorf("captp host's output lacks %q:\n%s", w, out.String())
		}
	}
}

// addrFromMACString is level3vat's rule (boards/microvm/level3vat,
// addrFromMAC): 10.A.B.C for xx:xx:xx:A:B:C.
func addrFromMACString(s string) (netip.Addr, error) {
	mac, err := net.ParseMAC(s)
	if err != nil {
		return netip.Addr{}, err
	}
	return netip.AddrFrom4([4]byte{10, mac[3], mac[4], mac[5]}), nil
}

// A group whose QEMU fails at once (here: false) reports which guest
// failed and why, and leaves no socket or goroutine behind.
func TestHostGroupQEMUFails(t *testing.T) {
	bin, err := exec.LookPath("false")
	if err != nil {
		t.Skip("SKIPPED: no false(1) on PATH")
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "x.elf")
	if err := os.WriteFile(img, []byte("not an image"), 0o644); err != nil {
		t.Fatal(err)
	}
	socks := filepath.Join(dir, "socks")
	var out, errOut bytes.Buffer
	code := run(context.Background(), []string{"host", "-qemu", bin, "-image", "a=" + img, "-image", "b=" + img, "-forward", "4433", "-listen", "unix:" + socks + "/"}, &out, &errOut)
	if code != exitFail || !strings.Contains(errOut.String(), "guest a (") || !strings.Contains(errOut.String(), "guest b (") || !strings.Contains(errOut.String(), "qemu exited with status 1") {
		t.Errorf("exit %d, stderr %q; want exit %d naming both guests and QEMU's status", code, errOut.String(), exitFail)
	}
	if !strings.Contains(out.String(), "booting a (x.elf, mac 52:54:00:00:00:02, at 10.0.0.2)") || !strings.Contains(out.String(), "a failed to boot") {
		t.Errorf("status lines: %s", out.String())
	}
	if _, err := os.Stat(socks); !errors.Is(err, os.ErrNotExist) {
		left, _ := os.ReadDir(socks)
		t.Errorf("the socket directory captp host made is still there (%v): %v; want it removed", err, left)
	}
}

// When one guest's QEMU fails and another's hangs without connecting,
// captp host names both, and the hung QEMU is killed once the boot
// timeout has passed: no process is left running. A shell script stands
// in for QEMU.
func TestHostGroupBootFailureKillsTheOthers(t *testing.T) {
	if _, err := exec.LookPath("sh"); err != nil {
		t.Skip("SKIPPED: no sh(1) on PATH")
	}
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "hung.pid")
	qemu := filepath.Join(dir, "qemu.sh")
	// -kernel IMAGE comes last.
	script := "#!/bin/sh\nfor a; do img=$a; done\ncase $img in *bad.elf) echo 'bad image' >&2; exit 1;; esac\necho $$ > " + pidFile + "\nexec sleep 60\n"
	if err := os.WriteFile(qemu, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"bad.elf", "hung.elf"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte("not an image"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	var out, errOut bytes.Buffer
	code := run(context.Background(), []string{"host", "-qemu", qemu, "-boot-timeout", "1s",
		"-image", "bad=" + filepath.Join(dir, "bad.elf"), "-image", "hung=" + filepath.Join(dir, "hung.elf"),
		"-listen", "unix:" + filepath.Join(dir, "socks") + "/"}, &out, &errOut)
	if code != exitFail || !strings.Contains(errOut.String(), "guest bad (") || !strings.Contains(errOut.String(), "qemu exited with status 1") ||
		!strings.Contains(errOut.String(), "guest hung (") || !strings.Contains(errOut.String(), "deadline exceeded") {
		t.Errorf("exit %d, stderr %q; want exit %d naming the failed guest with QEMU's status and the hung one with its timeout", code, errOut.String(), exitFail)
	}
	b, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatalf("the hung guest's QEMU never ran: %v", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		syscall.Kill(pid, syscall.SIGKILL)
		t.Errorf("the hung guest's QEMU (pid %d) is still running after captp host returned (kill 0: %v)", pid, err)
	}
}

// A group of two ordinary vat.elf guests without a network (-net none):
// each guest's bootstrap capability is re-served on its own socket.
func TestHostCommandGroupSerial(t *testing.T) {
	img := guestImage(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir, err := os.MkdirTemp("", "captp-group")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	out := &syncBuffer{}
	hctx, stop := context.WithCancel(ctx)
	done := make(chan int, 1)
	go func() {
		done <- run(hctx, []string{"host", "-net", "none", "-image", img, "-image", img, "-listen", "unix:" + dir}, out, tWriter{t})
	}()
	for !strings.Contains(out.String(), "served on") {
		select {
		case code := <-done:
			t.Fatalf("captp host exited %d: %s", code, out.String())
		case <-ctx.Done():
			stop()
			<-done
			t.Fatalf("captp host did not come up: %s", out.String())
		case <-time.After(50 * time.Millisecond):
		}
	}
	for _, name := range []string{"vat", "vat-2"} {
		conn, err := unix.Dial(ctx, "unix:"+filepath.Join(dir, name+".sock"), nil)
		if err != nil {
			stop()
			<-done
			t.Fatalf("%s: %v", name, err)
		}
		boot := testcapnp.Test(conn.Bootstrap(ctx))
		if got, err := echo(ctx, boot, "to "+name); err != nil || got != "to "+name {
			t.Errorf("%s: echo %q, %v", name, got, err)
		}
		boot.Release()
		conn.Close()
	}
	stop()
	if code := <-done; code != exitOK {
		t.Errorf("captp host exit %d: %s", code, out.String())
	}
	for _, w := range []string{"serial ports only", "guest vat exited with status 0", "guest vat-2 exited with status 0"} {
		if !strings.Contains(out.String(), w) {
			t.Errorf("captp host output lacks %q: %s", w, out.String())
		}
	}
}

// When one guest of a group exits on its own (here its QEMU is killed),
// captp host says which, stops the others and exits with a failure.
func TestHostCommandGroupStopsWhenAGuestExits(t *testing.T) {
	img := guestImage(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	g := startGroup(ctx, t, func(dir string) []string {
		return []string{"host", "-net", "none", "-image", "a=" + img, "-image", "b=" + img, "-listen", "unix:" + dir + "/"}
	})
	defer g.stop()
	hg, out, done, stop := g.hg, g.out, g.done, g.stop
	// Both QEMU processes run now; hg's guests do not change any more.
	victim, other := hg.guests[0].g.cmd.Process, hg.guests[1].g.cmd.Process
	if err := victim.Kill(); err != nil {
		t.Fatalf("killing guest a's QEMU: %v", err)
	}
	select {
	case code := <-done:
		if code == exitOK {
			t.Errorf("captp host exited %d after a guest died; want a failure", code)
		}
	case <-time.After(30 * time.Second):
		stop()
		<-done
		t.Fatalf("captp host still runs 30 s after guest a's QEMU was killed: %s", out.String())
	}
	if !strings.Contains(out.String(), "guest a exited") || !strings.Contains(out.String(), "stopping the others") {
		t.Errorf("captp host output does not say that guest a exited and the others are stopped: %s", out.String())
	}
	if err := other.Signal(syscall.Signal(0)); err == nil {
		other.Kill()
		t.Errorf("guest b's QEMU (pid %d) still runs after captp host returned", other.Pid)
	}
}

// groupRun is a captp host group started by startGroup.
type groupRun struct {
	dir  string // the socket directory
	out  *syncBuffer
	done chan int // captp host's exit code
	stop context.CancelFunc
	hg   *hostGroup
}

// startGroup runs captp host with args(dir), dir a fresh socket
// directory, and returns once the group is served; it fails the test if
// captp host exits or ctx ends first.
func startGroup(ctx context.Context, t *testing.T, args func(dir string) []string) *groupRun {
	t.Helper()
	// Short: Unix socket paths are limited to 108 bytes.
	dir, err := os.MkdirTemp("", "captp-group")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	groups := make(chan *hostGroup, 1)
	hostGroupReady = func(hg *hostGroup) { groups <- hg }
	t.Cleanup(func() { hostGroupReady = nil })
	hctx, stop := context.WithCancel(ctx)
	g := &groupRun{dir: dir, out: &syncBuffer{}, done: make(chan int, 1), stop: stop}
	go func() { g.done <- run(hctx, args(dir), g.out, tWriter{t}) }()
	select {
	case g.hg = <-groups:
		return g
	case code := <-g.done:
		stop()
		t.Fatalf("captp host exited %d before serving:\n%s", code, g.out.String())
	case <-ctx.Done():
		stop()
		<-g.done
		t.Fatalf("captp host did not come up: %v\n%s", ctx.Err(), g.out.String())
	}
	return nil
}
