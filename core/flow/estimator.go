package flow

import "time"

const (
	// windowGain is how many bandwidth-delay products the adaptive window
	// holds: BBR's cwnd gain. The second one covers the delay of the
	// acknowledgements, so the receiver never idles waiting for data.
	windowGain = 2
	// bwRounds is how many round trips the bandwidth maximum spans.
	bwRounds = 10
	// rttExpiry is how long a minimum RTT stands before it is measured
	// again with the window drained to MinWindow.
	rttExpiry = 10 * time.Second
	// probeTime is the least time the window stays drained when probing.
	probeTime = 200 * time.Millisecond
	// fullRounds is how many round trips without 25% bandwidth growth
	// end the start-up phase.
	fullRounds = 3
)

// probeGains cycle, one per round trip, once start-up is over: BBR's
// ProbeBW. A window-limited sender measures no more than its window
// delivers, so a round with a larger window (1.25) finds out whether the
// path can take more, and the next (0.75) drains the queue that made if
// it could not.
var probeGains = [...]float64{1.25, 0.75, 1, 1, 1, 1, 1, 1}

// estimator is the adaptive window's model of the path: delivery rate and
// minimum round-trip time, measured per acknowledged message. Its fields
// are guarded by the pool's mutex.
type estimator struct {
	delivered   int64         // bytes acknowledged
	deliveredAt time.Duration // when delivered last grew (or the limiter left idle)

	round     int64 // round trips counted so far
	nextRound int64 // delivered value that ends the current round
	bw        [bwRounds]float64

	minRTT   time.Duration
	minRTTAt time.Duration
	probing  bool
	probeEnd time.Duration
	probeMin time.Duration

	filled    bool // start-up is over
	fullBW    float64
	fullCount int
	cycle     int // index into probeGains
}

// bandwidth is the maximum delivery rate over the last bwRounds rounds,
// in bytes per nanosecond.
func (e *estimator) bandwidth() float64 {
	var m float64
	for _, v := range e.bw {
		m = max(m, v)
	}
	return m
}

// onAck takes the acknowledgement of t at now and returns the new window.
func (e *estimator) onAck(t *token, now time.Duration, window int, cfg *Config) int {
	e.delivered += int64(t.size)
	e.deliveredAt = now

	rtt := max(now-t.sent, 1)
	switch {
	case e.probing:
		e.probeMin = min(e.probeMin, rtt)
		if now >= e.probeEnd {
			e.probing = false
			e.minRTT, e.minRTTAt = e.probeMin, now
		}
	case e.minRTT == 0 || rtt <= e.minRTT:
		e.minRTT, e.minRTTAt = rtt, now
	case now-e.minRTTAt > rttExpiry:
		e.probing = true
		e.probeEnd = now + max(probeTime, e.minRTT)
		e.probeMin = rtt
	}

	roundStart := false
	if t.delivered >= e.nextRound {
		e.nextRound = e.delivered
		e.round++
		e.bw[e.round%bwRounds] = 0
		roundStart = true
	}
	if interval := now - t.deliveredAt; interval > 0 {
		rate := float64(e.delivered-t.delivered) / float64(interval)
		slot := &e.bw[e.round%bwRounds]
		*slot = max(*slot, rate)
	}
	bw := e.bandwidth()

	if !e.filled {
		if roundStart {
			if bw >= e.fullBW*1.25 {
				e.fullBW, e.fullCount = bw, 0
			} else if e.fullCount++; e.fullCount >= fullRounds {
				e.filled = true
			}
		}
		if !e.filled {
			// Start-up: grow by what was acknowledged, doubling per round.
			return min(window+t.size, cfg.MaxWindow)
		}
	}
	if roundStart {
		e.cycle = (e.cycle + 1) % len(probeGains)
	}
	target := windowGain * probeGains[e.cycle] * bw * float64(e.minRTT)
	return int(min(max(target, float64(cfg.MinWindow)), float64(cfg.MaxWindow)))
}
