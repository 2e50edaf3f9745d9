package receiver

import (
	"cmp"

	"github.com/walship/walship/pipeline"
)

// planInput is everything a (re)starting receiver knows: its spool, the
// slot, and where the server is.
type planInput struct {
	size      pipeline.SegmentSize
	slot      SlotState // RestartLSN 0: unknown (NULL); Timeline 0: unknown (before PostgreSQL 15)
	serverTLI uint32    // IDENTIFY_SYSTEM's timeline
	serverPos pipeline.LSN
	// serverHistory is the server's timeline history (TIMELINE_HISTORY of
	// serverTLI; empty on timeline 1): which timeline owns each position.
	serverHistory []pipeline.HistoryEntry
	spool         listing // with sum and valid filled in
}

// plan is what a (re)starting receiver does with its spool and where it
// streams from.
type plan struct {
	tli   uint32       // START_REPLICATION timeline
	start pipeline.LSN // START_REPLICATION position, a segment boundary
	floor pipeline.LSN // the slot's restart_lsn: flush is never reported below it
	// pending are the whole files of the spool: each may not be in the
	// bucket yet, and holds flush below its WAL until its confirmation or
	// the bucket says it is archived.
	pending []spoolFile
	// remove are files that hold nothing the archive can use: .partial
	// files the next session writes again, temporary files, orphaned
	// checksums, and damaged files whose WAL the server no longer has.
	remove []string
	// damaged are files whose bytes are not what walship received (wrong
	// size or checksum). Those whose WAL the server still has are written
	// again: streaming starts at the first of them.
	damaged []spoolFile
	// done are markers of archived segments still ahead of the slot.
	done []spoolFile
	// histories are the timelines whose history file this run must hold
	// flush for and archive itself, by their switch points: timelines up
	// to tli that began at or after the slot, whose end-of-timeline this
	// run never sees (see needHistories).
	histories []timelineSwitch
}

// timelineSwitch is where timeline tli began.
type timelineSwitch struct {
	tli uint32
	at  pipeline.LSN
}

// ownerOf is the timeline that wrote position x on the server's line.
func ownerOf(hist []pipeline.HistoryEntry, serverTLI uint32, x pipeline.LSN) uint32 {
	for _, e := range hist {
		if x < e.Switch {
			return e.Parent
		}
	}
	return serverTLI
}

// makePlan decides where streaming starts and what the spool still owes the
// archive. The bucket is the truth; the spool and the slot only hint:
//
//   - Every whole WAL file in the spool is pending, whatever the slot says:
//     a file leaves the spool only on its confirmation or when the bucket is
//     found to hold it (the archivers look there first for a file published
//     again). The slot may have been recreated or advanced by someone else.
//   - Streaming starts at the slot's segment (the server keeps everything
//     from there) and skips forward over segments the spool holds whole, on
//     the timeline that owns them on the server's line; it stops at the
//     first one missing or damaged, which the server sends again. So a
//     segment lost from the spool is never taken for archived.
//   - A damaged file is written again when the server still has its WAL;
//     when it does not (it lies wholly before the slot), it is removed: its
//     bytes are useless and its WAL is either archived already or lost.
//   - .partial files are streamed again from their first byte.
func makePlan(in planInput) plan {
	size := in.size
	restart := in.slot.RestartLSN
	p := plan{floor: restart}
	owner := func(x pipeline.LSN) uint32 { return ownerOf(in.serverHistory, in.serverTLI, x) }

	// The first segment the server still has.
	var base pipeline.LSN
	switch {
	case restart != 0:
		base = size.Start(restart)
	case len(in.spool.complete) > 0:
		// No reserved position: begin at the spool's oldest segment.
		base = in.spool.complete[0].seg.StartLSN(size)
		for _, f := range in.spool.complete {
			base = min(base, f.seg.StartLSN(size))
		}
	default:
		base = size.Start(in.serverPos)
	}

	// Sort the spool's files.
	whole := map[pipeline.Segment]bool{}
	var last pipeline.LSN // end of the newest whole segment
	keep := func(f spoolFile) {
		if f.valid {
			p.pending = append(p.pending, f)
			return
		}
		p.damaged = append(p.damaged, f)
		// A damaged file the server can no longer send is only in the way.
		if f.kind != pipeline.KindHistory && f.seg.EndLSN(size) <= base {
			p.remove = append(p.remove, f.name)
		}
	}
	for _, f := range in.spool.complete {
		keep(f)
		if f.valid {
			whole[f.seg] = true
			last = max(last, f.seg.EndLSN(size))
		}
	}
	for _, f := range in.spool.done {
		// Archived: its file left the spool after its confirmation.
		if restart != 0 && f.seg.EndLSN(size) <= restart {
			p.remove = append(p.remove, f.name) // the slot passed it: no longer needed
			continue
		}
		whole[f.seg] = true
		last = max(last, f.seg.EndLSN(size))
		p.done = append(p.done, f)
	}
	for _, f := range in.spool.ended {
		keep(f)
	}
	for _, f := range in.spool.histories {
		keep(f)
	}

	// Walk forward from base over segments the spool holds whole.
	start := base
	for start < last {
		seg := pipeline.SegmentOf(owner(start+pipeline.LSN(size)-1), start, size)
		if !whole[seg] {
			break
		}
		start += pipeline.LSN(size)
	}
	// A damaged ended segment the server still has is written again too.
	for _, f := range p.damaged {
		if f.kind == pipeline.KindPartial && f.seg.EndLSN(size) > base {
			start = min(start, f.seg.StartLSN(size))
		}
	}
	p.start = start
	// On the timeline that owns start: when a switch lies ahead, the server
	// ends that timeline there and walship follows it (history file and
	// .partial included), as it would have live.
	p.tli = owner(start)
	if len(in.serverHistory) == 0 && in.serverTLI > 1 && in.slot.Timeline != 0 && start == base {
		p.tli = min(in.slot.Timeline, in.serverTLI) // no history to tell: trust the slot
	}

	p.histories = needHistories(in.serverHistory, in.serverTLI, p.tli, cmp.Or(restart, base))

	for _, f := range in.spool.partials {
		p.remove = append(p.remove, f.name)
	}
	p.remove = append(p.remove, in.spool.other...)
	return p
}

// needHistories lists the timelines on the server's line, up to tli (the
// one streaming starts on), that began at or after from (the slot's
// restart_lsn, or where the plan's WAL begins when the slot has none).
//
// The server ends a timeline - and EndTimeline stores and queues the next
// one's history - only for a timeline walship streams. A plan that starts
// on tli streams none of tli's ancestors: when the slot stands exactly on
// a switch point that is a segment boundary (a promotion right after an
// XLOG_SWITCH), or the spool's whole segments carry the start over one,
// nothing else would archive those histories, yet flush would move over
// the new timeline's WAL, and recovery_target_timeline = latest could not
// find that timeline in the bucket. Such a history is queued at start-up
// instead, holding flush at its switch's segment start as EndTimeline's
// does. A timeline that began before the slot needs nothing: flush passed
// its switch, which its history held (and a receiver that streams from
// below a switch point sees the server end the timeline there).
//
// Queuing the history is preferred to starting on the parent timeline at
// the switch point so that the server ends it: that start point is an edge
// of START_REPLICATION (the server answers with the next timeline and no
// COPY at all), and it does not cover the whole segments the spool carries
// the start over. A history queued again that the bucket holds already is
// confirmed by the archivers' put-if-absent check of the same bytes, so
// flush waits for one small upload, never for ever.
func needHistories(hist []pipeline.HistoryEntry, serverTLI, tli uint32, from pipeline.LSN) []timelineSwitch {
	var need []timelineSwitch
	for i, e := range hist {
		child := serverTLI
		if i+1 < len(hist) {
			child = hist[i+1].Parent
		}
		if child > tli {
			break // ended by the server while this run streams: EndTimeline
		}
		if child > 1 && e.Switch >= from {
			need = append(need, timelineSwitch{tli: child, at: e.Switch})
		}
	}
	return need
}
