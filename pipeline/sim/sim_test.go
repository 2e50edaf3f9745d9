package sim

import (
	"flag"
	"fmt"
	"os"
	"runtime"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

var (
	flagSeeds = flag.Int("sim.seeds", 0, "seeds to simulate (default 500, 150 under -race, or $WALSHIP_SIM_SEEDS)")
	flagFirst = flag.Uint64("sim.first", 1, "first seed (or $WALSHIP_SIM_FIRST)")
	flagSeed  = flag.Uint64("sim.seed", 0, "replay this one seed, printing every step")
	flagSteps = flag.Int("sim.steps", 400, "steps with faults per seed")
	flagSkip  = flag.String("sim.skip", "", "comma-separated actions (faults) never to take, e.g. range-litter")
)

func skip() map[string]bool {
	m := map[string]bool{}
	for _, a := range strings.Split(*flagSkip, ",") {
		if a != "" {
			m[a] = true
		}
	}
	return m
}

// TestMain trades memory for speed: the simulation allocates segment-sized
// buffers freely, and collecting garbage less often runs more seeds.
func TestMain(m *testing.M) {
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(400)
	}
	flag.Parse()
	os.Exit(m.Run())
}

func envInt(name string, def uint64) uint64 {
	if v, err := strconv.ParseUint(os.Getenv(name), 10, 64); err == nil {
		return v
	}
	return def
}

// TestSimulation runs many seeds of the deterministic simulation (see the
// package doc). A failure names the seed and the command that replays it.
func TestSimulation(t *testing.T) {
	if *flagSeed != 0 {
		var log strings.Builder
		res := Run(Options{Seed: *flagSeed, Steps: *flagSteps, Log: &log, Skip: skip()})
		t.Logf("seed %d step log:\n%s", *flagSeed, log.String())
		if res.Err != nil {
			t.Fatalf("seed %d: %v", res.Seed, res.Err)
		}
		t.Logf("seed %d: %d steps, %s simulated, faults %v, counts %v", res.Seed, res.Steps, res.SimTime, res.Faults, res.Counts)
		return
	}
	n := uint64(*flagSeeds)
	if n == 0 {
		def := uint64(500)
		if raceEnabled {
			def = 150
		}
		n = envInt("WALSHIP_SIM_SEEDS", def)
	}
	first := *flagFirst
	if first == 1 {
		first = envInt("WALSHIP_SIM_FIRST", 1)
	}
	began := time.Now()
	results := make([]Result, n)
	var wg sync.WaitGroup
	next := make(chan uint64)
	for i := 0; i < runtime.GOMAXPROCS(0); i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				results[i] = Run(Options{Seed: first + i, Steps: *flagSteps, Skip: skip()})
			}
		}()
	}
	for i := uint64(0); i < n; i++ {
		next <- i
	}
	close(next)
	wg.Wait()
	faults, counts := map[string]int{}, map[string]int{}
	steps, failed := 0, 0
	var simTime time.Duration
	for _, r := range results {
		steps += r.Steps
		simTime += r.SimTime
		for k, v := range r.Faults {
			faults[k] += v
		}
		for k, v := range r.Counts {
			counts[k] += v
		}
		if r.Err != nil {
			failed++
			if failed <= 5 || testing.Verbose() && os.Getenv("WALSHIP_SIM_ALL") != "" {
				t.Errorf("seed %d: %v\nreplay: go test ./pipeline/sim -run 'TestSimulation$' -sim.seed=%d%s -v", r.Seed, r.Err, r.Seed, skipFlag())
			}
		}
	}
	total := 0
	for _, v := range faults {
		total += v
	}
	t.Logf("%d seeds (%d..%d) in %s: %d failed; %d steps, %.1f faults per seed, %s simulated",
		n, first, first+n-1, time.Since(began).Round(time.Millisecond), failed, steps, float64(total)/float64(n), simTime.Round(time.Second))
	t.Logf("faults: %s", summary(faults))
	t.Logf("events: %s", summary(counts))
}

// TestSimulationIsDeterministic: one seed, one run.
func TestSimulationIsDeterministic(t *testing.T) {
	for _, seed := range []uint64{3, 17, 99} {
		a, b := Run(Options{Seed: seed}), Run(Options{Seed: seed})
		if a.Digest != b.Digest || a.Steps != b.Steps || a.SimTime != b.SimTime {
			t.Errorf("seed %d ran differently twice: %d/%d steps, digests %x/%x", seed, a.Steps, b.Steps, a.Digest, b.Digest)
		}
	}
}

func skipFlag() string {
	if *flagSkip == "" {
		return ""
	}
	return " -sim.skip=" + *flagSkip
}

func summary(m map[string]int) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var parts []string
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s %d", k, m[k]))
	}
	return strings.Join(parts, ", ")
}
