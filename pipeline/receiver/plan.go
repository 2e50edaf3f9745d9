package receiver

import (
	"github.com/walship/walship/pipeline"
)

// planInput is everything a (re)starting receiver knows: its spool, the
// slot, and where the server is.
type planInput struct {
	size      pipeline.SegmentSize
	slot      SlotState // RestartLSN 0: unknown (NULL)
	serverTLI uint32    // IDENTIFY_SYSTEM's timeline
	serverPos pipeline.LSN
	spool     listing
}

// plan is what a (re)starting receiver does with its spool and where it
// streams from.
type plan struct {
	tli   uint32       // START_REPLICATION timeline
	start pipeline.LSN // START_REPLICATION position, a segment boundary
	floor pipeline.LSN // the slot's restart_lsn: flush is never reported below it
	// pending are the files the bucket may not hold yet: their holds keep
	// flush below them until each is confirmed.
	pending []spoolFile
	// remove are files known to be in the bucket, or that hold nothing the
	// archive needs (.partial files the next session streams again,
	// temporary files).
	remove []string
	// invalid are complete segments of the wrong size: streaming starts at
	// the first of them, which rewrites it. They are kept until then, so
	// that a crash before it cannot skip them.
	invalid []spoolFile
}

// makePlan decides where streaming starts and what the spool still owes the
// archive. The rules, in the order they apply:
//
//   - The slot's restart_lsn is where flush last was, and flush never passes
//     WAL the bucket does not hold; so complete segments that end at or
//     before it are in the bucket and are removed. With no known restart_lsn
//     nothing is removed.
//   - Every other complete segment, ended-timeline segment and history file
//     is pending, on whatever timeline: flush stays below the oldest of them
//     until its confirmation (or the bucket) says it is archived.
//   - Streaming starts at the later of the slot's segment and the end of the
//     newest complete spool segment, on that one's timeline: segments before
//     it that are not in the spool were removed after being confirmed. A
//     complete segment of the wrong size moves the start back to it.
//   - .partial files are streamed again from their first byte; they are
//     removed, the one at the start included, and rewritten.
func makePlan(in planInput) plan {
	size := in.size
	p := plan{floor: in.slot.RestartLSN}
	restart := in.slot.RestartLSN
	p.tli = in.serverTLI
	if in.slot.Timeline != 0 && in.slot.Timeline < p.tli {
		// The slot still holds WAL of an older timeline: stream it from
		// there; the server ends that timeline and walship follows.
		p.tli = in.slot.Timeline
	}
	switch {
	case restart != 0:
		p.start = size.Start(restart)
	case len(in.spool.complete) == 0:
		p.start = size.Start(in.serverPos)
	}
	later := func(tli uint32, at pipeline.LSN) {
		if at > p.start || at == p.start && tli > p.tli {
			p.tli, p.start = tli, at
		}
	}
	for _, f := range in.spool.complete {
		end := f.seg.EndLSN(size)
		if restart != 0 && end <= restart {
			p.remove = append(p.remove, f.name)
			continue
		}
		if f.size != int64(size) {
			p.invalid = append(p.invalid, f)
			continue
		}
		p.pending = append(p.pending, f)
		later(f.seg.Timeline, end)
	}
	for _, f := range p.invalid {
		if s := f.seg.StartLSN(size); s < p.start || s == p.start && f.seg.Timeline < p.tli {
			p.tli, p.start = f.seg.Timeline, s
		}
	}
	for _, f := range in.spool.ended {
		if restart != 0 && f.end != 0 && f.end <= restart {
			p.remove = append(p.remove, f.name)
			continue
		}
		p.pending = append(p.pending, f)
	}
	p.pending = append(p.pending, in.spool.histories...)
	for _, f := range in.spool.partials {
		p.remove = append(p.remove, f.name)
	}
	p.remove = append(p.remove, in.spool.other...)
	return p
}
