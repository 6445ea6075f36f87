package microvm

import "testing"

func TestExitStatus(t *testing.T) {
	for _, tc := range []struct {
		status, code int
		ok           bool
	}{
		{1, 0, true}, {3, 1, true}, {5, 2, true}, {0, 0, false}, {2, 0, false}, {-1, 0, false},
	} {
		code, ok := ExitStatus(tc.status)
		if code != tc.code || ok != tc.ok {
			t.Errorf("ExitStatus(%d) = %d, %v; want %d, %v", tc.status, code, ok, tc.code, tc.ok)
		}
	}
}

func TestTSCHz(t *testing.T) {
	// 62.5 ms of a 3 GHz TSC.
	hz, err := tscHz(187_500_000, RTCPeriods, RTCRateHz)
	if err != nil || hz != 3_000_000_000 {
		t.Fatalf("tscHz = %d, %v; want 3e9", hz, err)
	}
	if _, err := tscHz(1000, RTCPeriods, RTCRateHz); err == nil {
		t.Error("tscHz accepted 16 kHz")
	}
	if _, err := tscHz(1000, 0, RTCRateHz); err == nil {
		t.Error("tscHz accepted zero periods")
	}
}

func TestMedianHz(t *testing.T) {
	const hz = 2_445_428_000
	period := uint64(hz / RTCRateHz)
	var stamps []uint64
	tsc := uint64(1 << 40)
	for i := range RTCPeriods + 1 {
		stamps = append(stamps, tsc)
		switch i {
		case 10, 30, 31: // two periods seen as one (a missed edge)
			tsc += 2 * period
		case 20: // a late poll: long, then short
			tsc += period + period/3
			stamps = append(stamps, tsc)
			tsc += period - period/3
		default:
			tsc += period
		}
	}
	got, err := medianHz(stamps, RTCRateHz)
	if err != nil {
		t.Fatal(err)
	}
	if diff := int64(got) - hz; diff < -hz/10000 || diff > hz/10000 {
		t.Errorf("medianHz = %d, want %d within 0.01%%", got, hz)
	}
	if _, err := medianHz(stamps[:1], RTCRateHz); err == nil {
		t.Error("medianHz accepted one edge")
	}
	if _, err := medianHz([]uint64{5, 5, 6}, RTCRateHz); err == nil {
		t.Error("medianHz accepted a TSC that stood still")
	}
}

func TestPIT(t *testing.T) {
	for _, tc := range []struct {
		c0, c1 uint16
		want   uint64
	}{
		{60000, 54034, 5966},
		{3000, 62570, 5966}, // wrapped
		{5, 5, 0},
	} {
		if got := pitElapsed(tc.c0, tc.c1); got != tc.want {
			t.Errorf("pitElapsed(%d, %d) = %d, want %d", tc.c0, tc.c1, got, tc.want)
		}
	}
	// Nine windows, three of them garbage (a wrap missed while the host
	// descheduled the guest): the median is one of the good ones.
	hz := uint64(2_445_428_000)
	rates := []uint64{hz, 7 * hz, hz + 10, hz - 10, hz / 9, hz, 3 * hz, hz + 5, hz - 5}
	got, err := medianRate(rates)
	if err != nil || got < hz-10 || got > hz+10 {
		t.Errorf("medianRate = %d, %v; want %d ± 10", got, err, hz)
	}
	if _, err := medianRate(nil); err == nil {
		t.Error("medianRate accepted no windows")
	}
}

func TestCheckSamples(t *testing.T) {
	a := []byte{1, 2, 3, 4}
	if err := checkSamples(a, []byte{4, 3, 2, 1}); err != nil {
		t.Errorf("distinct samples refused: %v", err)
	}
	for _, tc := range [][2][]byte{
		{a, a},
		{{0, 0, 0, 0}, a},
		{a, {0xff, 0xff, 0xff, 0xff}},
		{nil, nil},
	} {
		if err := checkSamples(tc[0], tc[1]); err == nil {
			t.Errorf("checkSamples(%x, %x) accepted", tc[0], tc[1])
		}
	}
}
