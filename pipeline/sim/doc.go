// Package sim is walship's deterministic simulation, in the spirit of
// FoundationDB's simulator and TigerBeetle's VOPR. It runs the receiver's
// state machine (receiver.Core: plan, tracker, spool, publish and confirm,
// housekeeping) and the archiver's real decision code (archiver.Handle)
// against simulated neighbours: a PostgreSQL that writes WAL, switches
// WAL (the segment ends early: a promotion right after lands its switch
// point on a segment boundary), promotes and restarts and moves its slot
// the way the server does; a JetStream with
// delays, duplicates, redeliveries, lost acknowledgements, outages and
// crashes that lose its newest messages; an S3 with outages, latency and
// conflicting objects; a file system that forgets, when the receiver
// crashes, what was not fsynced. Time is virtual and all choices come from
// one seeded generator, so a seed replays a run exactly.
//
// Half the seeds run the receiver with a partial interval (ranges of the
// segment being written, pipeline.KindRange), half of those against a
// quiet server whose segments stay open across many cuts.
//
// After every step the world checks the invariants: (a) flush never passes
// the contiguous WAL the bucket holds, whole or in ranges, on the server's
// timeline line, never past a timeline's switch point while the bucket
// lacks that timeline's history file (recovery follows a timeline only
// through it), and never moves back within a receiver's life; (b) no
// spool file (a range's too) is removed before the bucket holds its bytes;
// (c) no key is ever written twice, every object holds exactly the WAL its
// name says, and walship deletes only its range objects of segments the
// bucket holds whole;
// (d) once faults stop, flush reaches the end of the server's WAL within a
// bounded simulated time; and the positions reported to the server are
// ones it can live with (write durable in the spool, flush never below the
// slot).
//
// Base backups and retention (backups.go): a backup actor drives the real
// take code step by step (take.Steps) — started.json, chunks through the
// JetStream and the real archivers, the window, republication, the WAL
// check, the catalogue — and is sometimes killed midway; a prune actor
// runs the real retention Scan, NewPlan and Execute with random --keep,
// --keep-within and --incomplete-after. Their invariants: (e1) every
// catalogue in the bucket names chunks holding exactly the backup's bytes
// and the bucket holds the WAL from its start to its end LSN; (e2) prune
// deletes nothing of a backup the policy keeps (by the simulation's own
// reading of it), a chunk only after its catalogue, no history file, no
// WAL of a segment ending past the floor on any timeline, nothing but
// backups' objects and WAL; (e3) invariant (a) counts from the floor of the WAL prune
// deleted, and a spool file whose bucket copy prune deleted below it may
// go; (e4) a backup chunk's confirmation never moves flush. Once faults
// stop, a backup in progress completes (liveness), unless the slot was
// recreated or the timeline changed under it.
//
// Staging over HTTP (stage.go, --stage http): on even seeds that stage for
// remote archivers, each receiver process serves its held files through
// the real stagehttp.Server and the core's OpenHeld, and archivers fetch
// through the real stagehttp.Client (give-up on the virtual clock, shrunk
// to seconds or minutes) over an in-memory transport. Faults: a host's
// stage unreachable for a while, receivers restarted elsewhere (new URL,
// new run), a host lost with its spool, 5xx, a wrong secret (401), a body
// cut short, and a file confirmed and removed while it is sent. Invariant
// (f): an event with a URL is terminated only after a 404 from a receiver
// that did not hold the file, or after its host was unreachable, without
// one answer, for the give-up bound; and once faults stop, every event with
// a URL ends within a bounded time (liveness).
package sim
