package archiver

import (
	"context"
	"strings"

	"github.com/walship/walship/compress"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/sinks"
)

// Ranges (pipeline.KindRange) are archived like small segments: the same
// read, verification of what they hold, put-if-absent and confirmation,
// under the layout's RangeKey, outside the WAL prefix. Once the whole
// segment is archived, its ranges are deleted.

// objectKey is where ev's WAL goes in the sink.
func objectKey(layout sinks.Layout, ev *pipeline.SegmentEvent, ext string) string {
	switch ev.Kind {
	case pipeline.KindRange:
		from, to := ev.RangeOffsets()
		return layout.RangeKey(ev.File, from, to, ext)
	case pipeline.KindBackup:
		return backupKey(layout, ev, ext)
	}
	return layout.Key(archiveName(ev), ext)
}

// eventName names ev's WAL in logs and errors: the file, or for a range
// <segment>.<from>-<to>.
func eventName(ev *pipeline.SegmentEvent) string {
	if ev.Kind == pipeline.KindRange {
		return ev.RangeName()
	}
	return ev.File
}

// count adds an archived file or range to the metrics. Ranges have their
// own series: the segment and byte counters count each WAL byte once,
// when its whole file is archived.
func (a *Archiver) count(ev *pipeline.SegmentEvent, res *pipeline.ArchivedEvent) {
	m := a.cfg.Metrics
	if ev.Kind == pipeline.KindBackup {
		a.countBackup(ev, res)
		return
	}
	if ev.Kind == pipeline.KindRange {
		if !res.Existed {
			m.PartialUploads.WithLabelValues(ev.Server).Inc()
			m.PartialBytes.WithLabelValues(ev.Server).Add(float64(res.CompressedSize))
		}
		return
	}
	m.Segments.WithLabelValues(ev.Server).Inc()
	m.RawBytes.WithLabelValues(ev.Server).Add(float64(ev.Size))
	m.CompressedBytes.WithLabelValues(ev.Server).Add(float64(res.CompressedSize))
	if !res.Existed {
		m.Upload.WithLabelValues(ev.Server).Observe(res.UploadSeconds)
	}
}

// deleteRanges removes every object under the range prefix of ev's
// segment, whose whole file the sink now holds durably. It is best effort:
// a failure is logged (rate-limited) and counted, and the leftovers are
// harmless (restore prefers the whole segment; other tools never look
// there). A sink that cannot list or delete keeps its ranges.
// isRangeKey reports whether key is where the layout puts a range of
// segment, with any codec's extension.
func isRangeKey(layout sinks.Layout, segment, key string) bool {
	leaf, ok := strings.CutPrefix(key, layout.RangePrefix(segment))
	if !ok || len(leaf) < 17 {
		return false
	}
	from, to, ok := pipeline.ParseRangeSuffix(leaf[:17])
	if !ok {
		return false
	}
	codec, ok := compress.CodecForExt(leaf[17:])
	return ok && layout.RangeKey(segment, from, to, codec.Ext()) == key
}

func (a *Archiver) deleteRanges(ctx context.Context, ev *pipeline.SegmentEvent) {
	lister, ok1 := a.sink.(sinks.Lister)
	deleter, ok2 := a.sink.(sinks.Deleter)
	if !ok1 || !ok2 {
		a.rl.Warn("ranges-unsupported/"+ev.Server, "the sink cannot list or delete objects; range objects of archived segments are kept",
			"server", ev.Server, "segment", ev.File)
		return
	}
	layout := a.cfg.Layout(ev.Server)
	prefix := layout.RangePrefix(ev.File)
	var keys []string
	err := lister.List(ctx, prefix, func(o sinks.Object) error {
		if isRangeKey(layout, ev.File, o.Key) {
			keys = append(keys, o.Key) // only walship's range objects: never anything else put there
		}
		return nil
	})
	if err != nil {
		a.fail("ranges", "cannot list the range objects of an archived segment; they are left behind, which is harmless", ev.Server, err, "segment", ev.File, "key", prefix)
		return
	}
	deleted := 0
	for _, key := range keys {
		if err := deleter.Delete(ctx, key); err != nil {
			a.fail("ranges", "cannot delete a range object of an archived segment; it is left behind, which is harmless", ev.Server, err, "segment", ev.File, "key", key)
			continue
		}
		deleted++
	}
	a.cfg.Metrics.PartialDeleted.WithLabelValues(ev.Server).Add(float64(deleted))
	if deleted == len(keys) {
		a.rl.Reset("ranges/" + ev.Server)
	}
	if deleted > 0 {
		a.log.Debug("deleted the ranges of an archived segment", "server", ev.Server, "segment", ev.File, "ranges", deleted)
	}
}
