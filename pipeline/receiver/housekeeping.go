package receiver

import (
	"context"
	"encoding/json"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/walship/walship/pipeline"
)

// housekeeping, every second, queues checks of files whose confirmation is
// late (Core.Tick), refreshes the lag metrics, and every status interval
// records the state where `walship status` reads it.
func (r *Receiver) housekeeping(ctx context.Context) error {
	// The state record goes to NATS from its own goroutine, so an outage
	// never stalls the metrics.
	states := make(chan []byte, 1)
	var wg sync.WaitGroup
	defer wg.Wait()
	if sr, ok := r.pub.(StateRecorder); ok {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-ctx.Done():
					return
				case st := <-states:
					if err := sr.PutState(ctx, r.server, st); err != nil {
						r.rl.Warn("state", "cannot record state", "error", err)
					}
				}
			}
		}()
	}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	lastState := time.Time{}
	for {
		select {
		case <-ctx.Done():
			return nil
		case now := <-tick.C:
			if n := r.core.Tick(now, r.cfg.RepublishAfter); n > 0 {
				r.log.Info("files not confirmed in time; checking whether their events still wait for an archiver", "count", n, "after", r.cfg.RepublishAfter.String())
			}
			pos := r.core.Positions()
			received := pipeline.LSN(r.received.Load())
			r.m.published.Set(float64(pos.Published))
			r.m.archived.Set(float64(pos.Archived))
			r.m.spoolBytes.Set(float64(pos.SpoolBytes))
			r.m.pendingFiles.Set(float64(pos.PendingFiles))
			var lagBytes uint64
			if received > pos.Flush {
				lagBytes = uint64(received - pos.Flush)
			}
			r.m.lagBytes.Set(float64(lagBytes))
			lagSecs := r.core.LagSeconds(now, received)
			r.m.lagSeconds.Set(lagSecs)
			if now.Sub(lastState) >= r.cfg.StatusInterval {
				lastState = now
				st := pipeline.ServerState{V: 1, Server: r.server, SystemID: r.sysID, Slot: r.cfg.Slot, Timeline: r.core.Timeline(),
					ServerLSN: pipeline.LSN(r.serverLSN.Load()), ReceivedLSN: received, WrittenLSN: r.core.Written(),
					PublishedLSN: pos.Published, ArchivedLSN: pos.Archived, FlushLSN: pos.Flush, LagBytes: lagBytes,
					LagSeconds: lagSecs, Connected: r.connected.Load(), Standby: r.standby.Load(), Updated: now.UTC()}
				state, _ := json.Marshal(st)
				select {
				case states <- state:
				default: // the previous one is still on its way; skip this one
				}
			}
		}
	}
}

// gauges are the metric children for one server.
type gauges struct {
	server, received, written, published, archived, flush prometheus.Gauge
	lagBytes, lagSeconds, connected, timeline, spoolBytes prometheus.Gauge
	pendingFiles                                          prometheus.Gauge
	receivedSegs, publishedSegs, archivedSegs             prometheus.Counter
	receivedBytes, publishedBytes                         prometheus.Counter
	republished, rangesCut                                prometheus.Counter
	errors                                                *prometheus.CounterVec
}

func newGauges(m *Metrics, server string) gauges {
	for _, stage := range []string{"receive", "publish", "watch", "slotpoll", "range"} {
		m.Errors.WithLabelValues(server, stage).Add(0)
	}
	for _, reason := range []string{"sha256", "dest", "position", "undecodable"} {
		m.Ignored.WithLabelValues(server, reason).Add(0)
	}
	m.Republished.WithLabelValues(server).Add(0)
	m.RangesCut.WithLabelValues(server).Add(0)
	return gauges{
		server: m.ServerLSN.WithLabelValues(server), received: m.ReceivedLSN.WithLabelValues(server),
		written: m.WrittenLSN.WithLabelValues(server), published: m.PublishedLSN.WithLabelValues(server),
		archived: m.ArchivedLSN.WithLabelValues(server), flush: m.FlushLSN.WithLabelValues(server),
		lagBytes: m.LagBytes.WithLabelValues(server), lagSeconds: m.LagSeconds.WithLabelValues(server),
		connected: m.Connected.WithLabelValues(server), timeline: m.Timeline.WithLabelValues(server),
		spoolBytes: m.SpoolBytes.WithLabelValues(server), pendingFiles: m.PendingFiles.WithLabelValues(server),
		receivedSegs: m.Segments.WithLabelValues(server, "received"), publishedSegs: m.Segments.WithLabelValues(server, "published"),
		archivedSegs:  m.Segments.WithLabelValues(server, "archived"),
		receivedBytes: m.Bytes.WithLabelValues(server, "received"), publishedBytes: m.Bytes.WithLabelValues(server, "published"),
		republished: m.Republished.WithLabelValues(server), rangesCut: m.RangesCut.WithLabelValues(server),
		errors: m.Errors.MustCurryWith(prometheus.Labels{"server": server}),
	}
}
