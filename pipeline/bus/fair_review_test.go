package bus

// Adversarial review of the per-server consumers (fair.go): each test here
// describes a way the change freezes a server, crashes the pool, or breaks
// an operator-facing promise. See FINDINGS-fair.md.

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/pipeline"
)

// nextNoPanic calls Next and turns a panic into a test failure, so that
// one finding does not take the other tests of the binary down with it.
func nextNoPanic(t *testing.T, b *Bus, ctx context.Context, expires time.Duration) (d *Delivery, err error) {
	t.Helper()
	defer func() {
		if r := recover(); r != nil {
			t.Fatalf("Next panicked (an archiver process would crash): %v", r)
		}
	}()
	return b.Next(ctx, expires)
}

// A consumer that stops answering (deleted by an operator or a rolling
// upgrade, or in a cluster: its leader lost, "no responders" / 409
// leadership change) makes fetchFrom forget the server, which removes it
// from p.order while round is still iterating over the old length: the
// next index is out of range and the archiver process panics (`walship
// run` takes the receiver down with it). Even without the panic, round
// skips the server that slid into the removed slot.
func TestRoundSurvivesLostConsumer(t *testing.T) {
	n := testenv.StartNATS(t)
	b := connect(t, n)
	ctx := context.Background()
	publishFor(t, b, "a", 0, 3)
	publishFor(t, b, "b", 0, 3)
	take(t, b)
	take(t, b)
	p := &b.pool
	if len(p.order) != 2 {
		t.Fatalf("consumers: %v, want a and b", p.order)
	}
	// The server round will ask first loses its consumer.
	first := p.order[p.next%len(p.order)]
	if err := b.js.DeleteConsumer(ctx, "WALSHIP_SEGMENTS", DefaultNames().ServerConsumer(first)); err != nil {
		t.Fatal(err)
	}
	// The pool must carry on: the other server's events come, and the lost
	// consumer is recreated at the next scan, so every event still comes.
	got := map[string]int{}
	deadline := time.Now().Add(15 * time.Second)
	for got["a"]+got["b"] < 4 && time.Now().Before(deadline) {
		d, err := nextNoPanic(t, b, ctx, 2*time.Second)
		if err != nil || d == nil {
			continue
		}
		s, _ := decode(t, d)
		got[s]++
		if err := d.Ack(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if got["a"] != 2 || got["b"] != 2 {
		t.Errorf("events after %s lost its consumer: %v, want the remaining 2 of each", first, got)
	}
}

func decode(t *testing.T, d *Delivery) (string, string) {
	t.Helper()
	var ev pipeline.SegmentEvent
	if err := json.Unmarshal(d.Data(), &ev); err != nil {
		t.Fatal(err)
	}
	return ev.Server, ev.File
}

var _ = fmt.Sprint

// startAccountsNATS runs nats-server with deploy/nats/accounts.conf as
// shipped (the sample per-role permissions), without TLS.
func startAccountsNATS(t *testing.T) string {
	t.Helper()
	accounts, err := os.ReadFile(filepath.Join("..", "..", "deploy", "nats", "accounts.conf"))
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("WALSHIP_RECEIVER_PASSWORD", "rcv-pw")
	t.Setenv("WALSHIP_ARCHIVER_PASSWORD", "arc-pw")
	t.Setenv("WALSHIP_STATUS_PASSWORD", "sts-pw")
	c := testenv.StartNATSProcWith(t, "include accounts.conf\n", map[string]string{"accounts.conf": string(accounts)})
	return c.Nodes[0].URL()
}

// `walship check` with the status role, which README ("status / check"
// row) and accounts.conf give for it: Inspect now lists the segment
// stream's consumers ($JS.API.CONSUMER.LIST.WALSHIP_SEGMENTS), which the
// STATUS role may not do (nor may the receiver), and a failed listing
// fails the whole NATS check, after the request's full timeout. Before the
// change Inspect looked the single consumer up and ignored a failure.
func TestCheckWithStatusRole(t *testing.T) {
	url := startAccountsNATS(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// The archiver sets the resources up and makes a server's consumer.
	arch, err := Connect(ctx, url, DefaultOptions(), slog.New(slog.DiscardHandler), nats.UserInfo("walship-archiver", "arc-pw"))
	if err != nil {
		t.Fatal(err)
	}
	defer arch.Close()
	recv, err := Connect(ctx, url, DefaultOptions(), slog.New(slog.DiscardHandler), nats.UserInfo("walship-receiver", "rcv-pw"))
	if err != nil {
		t.Fatal(err)
	}
	defer recv.Close()
	publishFor(t, recv, "db1", 0, 2)
	d, err := arch.Next(ctx, 5*time.Second)
	if err != nil || d == nil {
		t.Fatalf("archiver role: next %v %v", d, err)
	}
	if err := d.Ack(ctx); err != nil {
		t.Fatalf("archiver role: ack: %v", err)
	}
	for _, role := range []struct{ user, pw string }{{"walship-status", "sts-pw"}, {"walship-receiver", "rcv-pw"}} {
		start := time.Now()
		ictx, icancel := context.WithTimeout(context.Background(), 8*time.Second)
		probs, err := Inspect(ictx, url, DefaultNames(), nats.UserInfo(role.user, role.pw))
		icancel()
		if err != nil {
			t.Errorf("walship check as %s: %v (after %s); want it to pass as before the change", role.user, err, time.Since(start).Round(time.Millisecond))
		} else if len(probs) > 0 {
			t.Errorf("walship check as %s: %v", role.user, probs)
		}
	}
}

// The README promises that a quiet pool costs about two requests a second
// per archiver process whatever the number of servers: a stream info every
// scanEvery and one long poll at a time (the first version of the fair pool
// asked every quiet server every 250 ms, 45 requests a second with 20).
func TestIdleCostManyServers(t *testing.T) {
	for _, servers := range []int{20, 100} {
		t.Run(fmt.Sprint(servers), func(t *testing.T) {
			b := connect(t, testenv.StartNATS(t))
			for i := 0; i < servers; i++ {
				publishFor(t, b, fmt.Sprintf("s%03d", i), 0, 1)
			}
			for i := 0; i < servers; i++ {
				take(t, b)
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			const workers = 4
			for w := 0; w < workers; w++ {
				go func() {
					defer func() { done <- struct{}{} }()
					for ctx.Err() == nil {
						if d, _ := b.Next(ctx, 5*time.Second); d != nil {
							d.Ack(context.Background())
						}
					}
				}()
			}
			time.Sleep(500 * time.Millisecond)
			before := b.nc.Stats().OutMsgs
			window := 3 * scanEvery
			time.Sleep(window)
			rate := float64(b.nc.Stats().OutMsgs-before) / window.Seconds()
			cancel()
			for w := 0; w < workers; w++ {
				<-done
			}
			t.Logf("%d quiet servers, %d workers: %.1f requests/s from one archiver process", servers, workers, rate)
			if rate > 10 {
				t.Errorf("%d quiet servers: %.1f requests/s from one archiver process; the README promises a few (the single consumer: %.1f)", servers, rate, float64(workers)/5)
			}
		})
	}
}

// A server whose consumer cannot be created (here: the account's
// JetStream consumer limit, as hosted NATS and operator-mode accounts set;
// the per-server consumers are never deleted, so a pool that has seen
// more servers over time than the limit allows hits it) is frozen for good
// while nothing says so: scan only logs a rate-limited warning, round
// finds the other servers fine, and Consuming (the archivers' /readyz)
// stays nil. Before the change one consumer served every server.
func TestUncreatableConsumerIsNotReady(t *testing.T) {
	c := testenv.StartNATSProcWith(t, `accounts {
  A {
    jetstream: { max_mem: 64MB, max_file: 1GB, max_consumers: 2 }
    users: [ { user: a, password: a } ]
  }
}
`, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	b, err := Connect(ctx, c.Nodes[0].URL(), DefaultOptions(), slog.New(slog.DiscardHandler), nats.UserInfo("a", "a"))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	for _, s := range []string{"db1", "db2", "db3"} {
		publishFor(t, b, s, 0, 1)
	}
	got := map[string]bool{}
	deadline := time.Now().Add(3*scanEvery + 2*time.Second)
	for len(got) < 3 && time.Now().Before(deadline) {
		d, err := b.Next(ctx, time.Second)
		if err != nil || d == nil {
			continue
		}
		s, _ := decode(t, d)
		got[s] = true
		d.Ack(ctx)
	}
	if len(got) < 3 {
		if err := b.Consuming(); err == nil {
			t.Errorf("only %v of 3 servers' events came (a server's consumer cannot be created), yet Consuming (/readyz) is nil: the server is frozen for good and nothing but a rate-limited warning says so", got)
		}
	}
}

// The realistic trigger of TestRoundSurvivesLostConsumer: in an R3
// cluster a consumer's leader dies; until its successor is elected, a
// fetch from it gets "no responders", fetchFrom forgets the server in the
// middle of round, and the archiver process panics (every archiver
// process of the pool at the same moment, since they all ask every
// server).
func TestRoundSurvivesConsumerLeaderLoss(t *testing.T) {
	c := testenv.StartNATSCluster(t, 3)
	opts := DefaultOptions()
	opts.Replicas = 3
	ctx, cancel := context.WithTimeout(context.Background(), 28*time.Second)
	defer cancel()
	b, err := Connect(ctx, c.URLs(), opts, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	publishFor(t, b, "a", 0, 3)
	publishFor(t, b, "b", 0, 3)
	take(t, b)
	take(t, b)
	p := &b.pool
	first := p.order[p.next%len(p.order)]
	leader, err := c.ConsumerLeader(ctx, "WALSHIP_SEGMENTS", DefaultNames().ServerConsumer(first))
	if err != nil {
		t.Fatal(err)
	}
	leader.Kill()
	killed := time.Now()
	got := 0
	for got < 4 && ctx.Err() == nil {
		d, err := nextNoPanic(t, b, ctx, 2*time.Second)
		if err != nil || d == nil {
			continue
		}
		got++
		d.Ack(ctx)
	}
	if got < 4 {
		t.Errorf("%d of the 4 remaining events came in the %s after %s (the consumer leader of %s) died", got, time.Since(killed).Round(time.Second), leader.Name, first)
	}
}

// round asks every server whose idle mark has passed, one after the other,
// without looking at ctx or at Next's deadline; FetchNoWait takes no
// context, and while NATS is unreachable (or the link black-holed) each
// one only gives up after nats.go's local 1 s. So a Next that starts a
// round during an outage holds the pool's lock for about one second per
// server: a shutdown (ctx cancelled) or Next's own expires waits 15 s
// here, 200 s with 200 servers (longer than systemd's stop timeout).
func TestNextHonoursCtxDuringOutage(t *testing.T) {
	n := testenv.StartNATS(t)
	b := connect(t, n)
	const servers = 15
	for i := 0; i < servers; i++ {
		publishFor(t, b, fmt.Sprintf("s%02d", i), 0, 1)
	}
	for i := 0; i < servers; i++ {
		take(t, b)
	}
	time.Sleep(time.Second) // the idle marks pass
	n.Stop()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan time.Time, 1)
	start := time.Now()
	go func() {
		b.Next(ctx, 2*time.Second)
		done <- time.Now()
	}()
	time.Sleep(300 * time.Millisecond)
	cancel()
	select {
	case <-done:
		return
	case <-time.After(3 * time.Second):
	}
	select {
	case end := <-done:
		t.Errorf("Next(expires 2s) returned %s after it started and %s after its ctx was cancelled, holding the pool's lock", end.Sub(start).Round(100*time.Millisecond), end.Sub(start.Add(300*time.Millisecond)).Round(100*time.Millisecond))
	case <-time.After(20 * time.Second):
		t.Errorf("Next(expires 2s) still running 23 s after its ctx was cancelled")
	}
}

// A quiet server's new event does not wait behind a busy server's queue:
// while events come the pool reads the servers' counts every busyScan, so
// the quiet server's event is taken within about that time, however many
// events the busy server has waiting. (Each event here takes 20 ms of
// "archiving", as real ones take longer.)
func TestQuietServerBehindOneBusyEvent(t *testing.T) {
	b := connect(t, testenv.StartNATS(t))
	const servers = 20
	for i := 0; i < servers; i++ {
		publishFor(t, b, fmt.Sprintf("s%02d", i), 0, 1)
	}
	for i := 0; i < servers; i++ {
		take(t, b)
	}
	publishFor(t, b, "s00", 1, 400) // s00 floods the queue
	for i := 0; i < 3; i++ {
		take(t, b)
	}
	quiet := "s05" // its last fetch found nothing
	publishFor(t, b, quiet, 1, 1)
	published := time.Now()
	busy := 0
	for {
		s, _ := take(t, b)
		if s == quiet {
			break
		}
		time.Sleep(20 * time.Millisecond)
		busy++
		if busy == 400 {
			t.Fatalf("%s's event never came", quiet)
		}
	}
	waited := time.Since(published)
	t.Logf("%d of s00's events came before %s's, %s after it was published", busy, quiet, waited.Round(time.Millisecond))
	if waited > busyScan+500*time.Millisecond {
		t.Errorf("the quiet server %s's segment waited %s (%d of the busy server's events); want about busyScan (%s)", quiet, waited.Round(time.Millisecond), busy, busyScan)
	}
}

// --ack-wait no longer reaches existing consumers: scan looks a server's
// consumer up when it exists and creates it only when it does not, so the
// AckWait of whichever archiver first saw the server stays for good.
// Before the change every process's setup ran CreateOrUpdateConsumer, so
// the README's cluster advice (restart every process with --ack-wait 30s)
// took effect; now it is silently ignored for every known server, and an
// event lost in flight after a node's loss holds flush for the old 1 min.
func TestAckWaitChangeReachesConsumers(t *testing.T) {
	n := testenv.StartNATS(t)
	ctx := context.Background()
	first := connect(t, n) // --ack-wait 1m (the default)
	publishFor(t, first, "db1", 0, 2)
	take(t, first)
	first.Close()
	opts := DefaultOptions()
	opts.AckWait = 30 * time.Second // restarted with the README's cluster advice
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	b, err := Connect(cctx, n.URL(), opts, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	take(t, b)
	c, err := b.js.Consumer(ctx, "WALSHIP_SEGMENTS", DefaultNames().ServerConsumer("db1"))
	if err != nil {
		t.Fatal(err)
	}
	if got := c.CachedInfo().Config.AckWait; got != opts.AckWait {
		t.Errorf("after every archiver restarted with --ack-wait %s, db1's consumer has AckWait %s", opts.AckWait, got)
	}
}
