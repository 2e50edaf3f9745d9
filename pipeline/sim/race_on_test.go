//go:build race

package sim

// raceEnabled: the race detector makes each seed about ten times slower.
const raceEnabled = true
