//go:build race

package bench

// raceEnabled: the race detector slows RPC down about tenfold, so the
// harness test runs fewer transports under it.
const raceEnabled = true
