//go:build !race

package netstack

// raceEnabled reports a -race build, under which big transfers shrink.
const raceEnabled = false
