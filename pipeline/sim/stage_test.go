package sim

import "testing"

// TestSimulationStageHTTP runs seeds that stage over HTTP, checks that the
// stage was exercised (fetches, 404s, give-ups), and that each of a few
// replays the same way twice.
func TestSimulationStageHTTP(t *testing.T) {
	n := 60
	if raceEnabled || testing.Short() {
		n = 16
	}
	counts := map[string]int{}
	replayed := 0
	for seed := uint64(2); seed < uint64(2*n+2); seed += 2 {
		a := Run(Options{Seed: seed})
		if a.Err != nil {
			t.Errorf("seed %d: %v\nreplay: go test ./pipeline/sim -run 'TestSimulation$' -sim.seed=%d -v", seed, a.Err, seed)
			continue
		}
		if a.Counts["http fetches"] == 0 {
			continue // not an HTTP-staging seed
		}
		for k, v := range a.Counts {
			counts[k] += v
		}
		if replayed < 3 {
			replayed++
			b := Run(Options{Seed: seed})
			if a.Digest != b.Digest || a.Steps != b.Steps || a.SimTime != b.SimTime {
				t.Errorf("seed %d ran differently twice: %d/%d steps, digests %x/%x", seed, a.Steps, b.Steps, a.Digest, b.Digest)
			}
		}
	}
	if replayed == 0 {
		t.Fatalf("no seed staged over HTTP")
	}
	for _, c := range []string{"http 200", "http events ack", "http events nak", "http terms: gone"} {
		if counts[c] == 0 {
			t.Errorf("no %q in %d seeds: the stage is not exercised (%v)", c, n, summary(counts))
		}
	}
	t.Logf("http counts: fetches %d, 200 %d, 404 %d, 503 %d, 401 %d, refused %d, timeouts %d, 5xx injected %d, cut short %d; events acked %d, naked %d, termed %d (gone %d, not held %d)",
		counts["http fetches"], counts["http 200"], counts["http 404"], counts["http 503"], counts["http 401"], counts["http refused"],
		counts["http timeouts"], counts["http 5xx injected"], counts["http cut short"], counts["http events ack"], counts["http events nak"],
		counts["http events term"], counts["http terms: gone"], counts["http terms: not held"])
}
