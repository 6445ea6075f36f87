package main

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/captp-go/captp/adapters/unix"
	"github.com/captp-go/captp/internal/testcapnp"
)

// The QEMU command line is what the board and TAMAGO.md need; checked
// without QEMU.
func TestQEMUArgs(t *testing.T) {
	for _, tc := range []struct {
		cfg       guestConfig
		want, not []string
	}{
		{
			cfg: guestConfig{Image: "/img/vat.elf"},
			want: []string{
				"-machine microvm,x-option-roms=on,pit=on,pic=off,rtc=on",
				"-global virtio-mmio.force-legacy=false",
				"-accel tcg -cpu max -m 2G -no-reboot",
				"-serial chardev:con",
				"-chardev socket,id=ser1,path=/s/serial.sock,server=off -device isa-serial,chardev=ser1,iobase=0x2f8,irq=3,index=1",
				"-device isa-debug-exit,iobase=0xf4,iosize=0x04",
				"-kernel /img/vat.elf",
			},
			not: []string{"-netdev", "-nographic"},
		},
		{
			cfg:  guestConfig{Image: "x.elf", Net: netStream, Memory: "3G"},
			want: []string{"-m 3G", "-netdev stream,id=n0,server=off,addr.type=unix,addr.path=/s/net.sock -device virtio-net-device,netdev=n0"},
		},
		{
			cfg:  guestConfig{Image: "x.elf", Net: netStream, MAC: "52:54:00:00:00:02"},
			want: []string{"-device virtio-net-device,netdev=n0,mac=52:54:00:00:00:02"},
		},
		{
			cfg:  guestConfig{Image: "x.elf", Net: netUser, HostFwdPort: 4321},
			want: []string{"-netdev user,id=n0,net=10.0.2.0/24,restrict=on,hostfwd=tcp:127.0.0.1:4321-10.0.2.15:4000 -device virtio-net-device,netdev=n0"},
		},
	} {
		line := strings.Join(tc.cfg.qemuArgs("/s/serial.sock", "/s/net.sock"), " ")
		for _, w := range tc.want {
			if !strings.Contains(line, w) {
				t.Errorf("net %q: command line lacks %q:\n%s", tc.cfg.Net, w, line)
			}
		}
		for _, n := range tc.not {
			if strings.Contains(line, n) {
				t.Errorf("net %q: command line has %q:\n%s", tc.cfg.Net, n, line)
			}
		}
		if !strings.HasSuffix(line, tc.cfg.Image) {
			t.Errorf("the image is not last: %s", line)
		}
	}
}

func TestHostUsage(t *testing.T) {
	var out, errOut bytes.Buffer
	if code := run(context.Background(), []string{"host"}, &out, &errOut); code != exitUsage {
		t.Errorf("captp host without flags: exit %d, want %d; stderr %s", code, exitUsage, errOut.String())
	}
	errOut.Reset()
	if code := run(context.Background(), []string{"host", "-image", "/nonexistent.elf", "-listen", "unix:" + filepath.Join(t.TempDir(), "s")}, &out, &errOut); code != exitFail || !strings.Contains(errOut.String(), "guest image") {
		t.Errorf("captp host with a missing image: exit %d, stderr %s", code, errOut.String())
	}
}

// guestImage returns the TamaGo image the QEMU tests boot, or skips them
// loudly: `make tamago-test` builds it and sets CAPTP_GUEST_IMAGE.
func guestImage(t *testing.T) string {
	t.Helper()
	img := os.Getenv("CAPTP_GUEST_IMAGE")
	if img == "" {
		t.Skip("SKIPPED: QEMU guest tests need a TamaGo image: run `make tamago-test` (needs the tamago-go toolchain, see README) or set CAPTP_GUEST_IMAGE=/path/to/vat.elf")
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("SKIPPED: QEMU guest tests need qemu-system-x86_64: apt-get install qemu-system-x86 (make deps)")
	}
	if _, err := os.Stat(img); err != nil {
		t.Fatalf("CAPTP_GUEST_IMAGE: %v", err)
	}
	return img
}

// testLogger logs to t (the guest's console included) at Info.
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

func bootGuest(t *testing.T, ctx context.Context, net string) *guest {
	t.Helper()
	start := time.Now()
	g, err := startGuest(ctx, guestConfig{Image: guestImage(t), Net: net}, testLogger(t))
	if err != nil {
		t.Fatalf("startGuest: %v", err)
	}
	t.Logf("boot: QEMU started, guest booted and answered Bootstrap (net %s) in %v", net, time.Since(start))
	t.Cleanup(func() {
		code, err := g.Close()
		if err != nil || code != 0 {
			t.Errorf("guest exit: code %d, %v; want 0 (the vat exits cleanly when its serial connection ends)", code, err)
		}
	})
	return g
}

// prefixEcho is a host-side Test object whose echo marks the data, so a
// test can tell that the guest called back into the host.
type prefixEcho struct {
	testcapnp.Test_Server // only Echo is called
	mu                    sync.Mutex
	calls                 int
}

func (p *prefixEcho) Echo(ctx context.Context, call testcapnp.Test_echo) error {
	p.mu.Lock()
	p.calls++
	p.mu.Unlock()
	d, err := call.Args().Data()
	if err != nil {
		return err
	}
	res, err := call.AllocResults()
	if err != nil {
		return err
	}
	return res.SetData(append([]byte("host:"), d...))
}

func echo(ctx context.Context, c testcapnp.Test, data string) (string, error) {
	f, release := c.Echo(ctx, func(p testcapnp.Test_echo_Params) error { return p.SetData([]byte(data)) })
	defer release()
	r, err := f.Struct()
	if err != nil {
		return "", err
	}
	d, err := r.Data()
	return string(d), err
}

// exerciseGuest runs the host-side suite against a guest's bootstrap
// capability: echo, pipelining, capabilities both ways.
func exerciseGuest(t *testing.T, ctx context.Context, boot testcapnp.Test) {
	t.Helper()
	// Echo, binary-clean.
	payload := string(bytes.Repeat([]byte{0, 1, 0x11, 0x13, 0xff, '\n', '\r'}, 300))
	if got, err := echo(ctx, boot, payload); err != nil || got != payload {
		t.Fatalf("echo: %d bytes, %v; want the %d bytes back", len(got), err, len(payload))
	}

	// Pipelining: child("a").child("b").name() sent without waiting.
	start := time.Now()
	fa, ra := boot.Child(ctx, func(p testcapnp.Test_child_Params) error { return p.SetName("a") })
	defer ra()
	fb, rb := fa.Child().Child(ctx, func(p testcapnp.Test_child_Params) error { return p.SetName("b") })
	defer rb()
	fn, rn := fb.Child().Name(ctx, nil)
	defer rn()
	res, err := fn.Struct()
	if err != nil {
		t.Fatalf("pipelined child().child().name(): %v", err)
	}
	if name, _ := res.Name(); name != "b" {
		t.Errorf("pipelined name = %q, want b", name)
	}
	t.Logf("pipelined chain of 3 calls: %v", time.Since(start))

	// Host to guest: the guest calls back into a host capability.
	host := &prefixEcho{}
	hc := testcapnp.Test_ServerToClient(host)
	defer hc.Release()
	fc, rc := boot.CallBack(ctx, func(p testcapnp.Test_callBack_Params) error {
		if err := p.SetData([]byte("ping")); err != nil {
			return err
		}
		return p.SetCb(hc.AddRef())
	})
	defer rc()
	cres, err := fc.Struct()
	if err != nil {
		t.Fatalf("callBack with a host capability: %v", err)
	}
	if d, _ := cres.Data(); string(d) != "host:ping" {
		t.Errorf("callBack returned %q, want host:ping (the guest's call to the host object)", d)
	}

	// Guest to host and back: the guest holds the host's capability and
	// returns it; calling the returned one reaches the host object.
	fh, rh := boot.Hold(ctx, func(p testcapnp.Test_hold_Params) error { return p.SetCap(hc.AddRef()) })
	if _, err := fh.Struct(); err != nil {
		t.Fatalf("hold: %v", err)
	}
	rh()
	fg, rg := boot.GetHeld(ctx, nil)
	defer rg()
	if got, err := echo(ctx, fg.Cap(), "back"); err != nil || got != "host:back" {
		t.Errorf("echo on the held capability: %q, %v; want host:back", got, err)
	}
	host.mu.Lock()
	calls := host.calls
	host.mu.Unlock()
	if calls != 2 {
		t.Errorf("host object got %d calls, want 2", calls)
	}
	fd, rd := boot.DropHeld(ctx, nil)
	if _, err := fd.Struct(); err != nil {
		t.Errorf("dropHeld: %v", err)
	}
	rd()
}

func TestGuestSerial(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	g := bootGuest(t, ctx, netNone)
	if g.TCP != nil {
		t.Fatal("a TCP connection without a network")
	}
	boot := testcapnp.Test(g.Bootstrap(ctx))
	defer boot.Release()
	exerciseGuest(t, ctx, boot)
	big := strings.Repeat("serial..", 1<<10)
	start := time.Now()
	if got, err := echo(ctx, boot, big); err != nil || got != big {
		t.Fatalf("8 KiB echo over the serial port: %d bytes, %v", len(got), err)
	}
	t.Logf("8 KiB echo over the serial port: %v", time.Since(start))
}

func TestGuestNetStream(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	g := bootGuest(t, ctx, netStream)
	boot := testcapnp.Test(g.Bootstrap(ctx))
	defer boot.Release()
	exerciseGuest(t, ctx, boot)
	// Bulk over virtio-net: 256 KiB each way.
	big := strings.Repeat("0123456789abcdef", 16<<10)
	start := time.Now()
	if got, err := echo(ctx, boot, big); err != nil || got != big {
		t.Fatalf("256 KiB echo over TCP: %d bytes, %v", len(got), err)
	}
	t.Logf("256 KiB echo over virtio-net: %v", time.Since(start))
}

func TestGuestNetUser(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	g := bootGuest(t, ctx, netUser)
	boot := testcapnp.Test(g.Bootstrap(ctx))
	defer boot.Release()
	if got, err := echo(ctx, boot, "through QEMU's NAT"); err != nil || got != "through QEMU's NAT" {
		t.Fatalf("echo: %q, %v", got, err)
	}
}

// Two guests talk through the host: guest A calls guest B's bootstrap
// capability, which the host passed to A.
func TestTwoGuests(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	img := guestImage(t) // may skip: only on the test's goroutine
	var a, b *guest
	var wg sync.WaitGroup
	var errA, errB error
	wg.Add(2)
	go func() {
		defer wg.Done()
		a, errA = startGuest(ctx, guestConfig{Image: img, Net: netStream}, testLogger(t))
	}()
	go func() { defer wg.Done(); b, errB = startGuest(ctx, guestConfig{Image: img}, testLogger(t)) }()
	wg.Wait()
	for _, g := range []*guest{a, b} {
		if g != nil {
			t.Cleanup(func() {
				if code, err := g.Close(); err != nil || code != 0 {
					t.Errorf("guest exit: code %d, %v", code, err)
				}
			})
		}
	}
	if errA != nil || errB != nil {
		t.Fatalf("starting guests: %v; %v", errA, errB)
	}
	bootA, bootB := testcapnp.Test(a.Bootstrap(ctx)), testcapnp.Test(b.Bootstrap(ctx))
	defer bootA.Release()
	defer bootB.Release()
	// B's child, named so that its answer is recognisable.
	fc, rc := bootB.Child(ctx, func(p testcapnp.Test_child_Params) error { return p.SetName("b-child") })
	defer rc()
	child := fc.Child().AddRef()
	defer child.Release()
	fcb, rcb := bootA.CallBack(ctx, func(p testcapnp.Test_callBack_Params) error {
		if err := p.SetData([]byte("a to b")); err != nil {
			return err
		}
		return p.SetCb(child.AddRef())
	})
	defer rcb()
	res, err := fcb.Struct()
	if err != nil {
		t.Fatalf("A.callBack(B's child): %v", err)
	}
	if d, _ := res.Data(); string(d) != "a to b" {
		t.Errorf("A.callBack(B's child) = %q", d)
	}
	// A holds B's child and hands it back; its name proves it is B's.
	fh, rh := bootA.Hold(ctx, func(p testcapnp.Test_hold_Params) error { return p.SetCap(child.AddRef()) })
	if _, err := fh.Struct(); err != nil {
		t.Fatalf("A.hold: %v", err)
	}
	rh()
	fg, rg := bootA.GetHeld(ctx, nil)
	defer rg()
	fn, rn := fg.Cap().Name(ctx, nil)
	defer rn()
	nres, err := fn.Struct()
	if err != nil {
		t.Fatalf("A.getHeld().name(): %v", err)
	}
	if n, _ := nres.Name(); n != "b-child" {
		t.Errorf("A.getHeld().name() = %q, want b-child", n)
	}
	fd, rd := bootA.DropHeld(ctx, nil)
	fd.Struct()
	rd()
}

// captp host end to end: boot, re-serve on a Unix socket, call from a host
// program, stop with the context; with each network and connection.
func TestHostCommand(t *testing.T) {
	img := guestImage(t)
	for _, tc := range []struct{ net, via string }{
		{"stream", ""}, // via tcp
		{"none", ""},   // via serial
		{"user", "serial"},
	} {
		t.Run(tc.net+"/"+tc.via, func(t *testing.T) {
			args := []string{"host", "-image", img, "-net", tc.net}
			if tc.via != "" {
				args = append(args, "-via", tc.via)
			}
			runHostCommand(t, args)
		})
	}
}

func runHostCommand(t *testing.T, args []string) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	sock := filepath.Join(t.TempDir(), "guest.sock")
	out := &syncBuffer{}
	hctx, stop := context.WithCancel(ctx)
	done := make(chan int, 1)
	go func() {
		done <- run(hctx, append(args, "-listen", "unix:"+sock), out, tWriter{t})
	}()
	deadline := time.Now().Add(time.Minute)
	for !strings.Contains(out.String(), "served on") {
		if time.Now().After(deadline) {
			stop()
			t.Fatalf("captp host did not come up: %s (exit %d)", out.String(), <-done)
		}
		select {
		case code := <-done:
			t.Fatalf("captp host exited %d: %s", code, out.String())
		case <-time.After(50 * time.Millisecond):
		}
	}
	conn, err := unix.Dial(ctx, "unix:"+sock, nil)
	if err != nil {
		stop()
		<-done
		t.Fatal(err)
	}
	boot := testcapnp.Test(conn.Bootstrap(ctx))
	exerciseGuest(t, ctx, boot)
	boot.Release()
	conn.Close()
	stop()
	if code := <-done; code != exitOK {
		t.Errorf("captp host exit %d: %s", code, out.String())
	}
	if !strings.Contains(out.String(), "guest exited with status 0") {
		t.Errorf("captp host output: %s", out.String())
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// A QEMU that fails at once (here: false) is reported with its status,
// and nothing is left running.
func TestStartGuestQEMUFails(t *testing.T) {
	bin, err := exec.LookPath("false")
	if err != nil {
		t.Skip("SKIPPED: no false(1) on PATH")
	}
	img := filepath.Join(t.TempDir(), "vat.elf")
	if err := os.WriteFile(img, []byte("not an image"), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err = startGuest(ctx, guestConfig{QEMU: bin, Image: img, Net: netStream}, slog.New(slog.DiscardHandler))
	if err == nil || !strings.Contains(err.Error(), "qemu exited with status 1") {
		t.Fatalf("startGuest with a failing QEMU: %v", err)
	}
	if _, err := startGuest(ctx, guestConfig{QEMU: bin, Image: img, Net: "bogus"}, slog.New(slog.DiscardHandler)); err == nil {
		t.Fatal("startGuest accepted network mode bogus")
	}
}
