package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/term"

	"github.com/walship/walship/compress"
	"github.com/walship/walship/internal/backoff"
	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/restore"
	"github.com/walship/walship/sinks"
	filesink "github.com/walship/walship/sinks/file"
	s3sink "github.com/walship/walship/sinks/s3"
)

// Exit statuses of `walship fetch`, as restore_command reports them to
// PostgreSQL: 1 is "not in the archive" (recovery ends, or a standby waits);
// anything above 125 makes PostgreSQL abort recovery instead of ending it
// early on a shortened history.
const (
	exitNotFound = 1
	exitAbort    = 255
)

// exitError carries a specific exit status.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

type restoreFlags struct {
	prefetch     int
	prefetchDir  string
	allowPartial bool
	retryFor     time.Duration
	worker       bool
	cleanup      bool
	deep         bool
	json         bool
	parallel     int
	segmentSize  int64
}

func addRestoreFlags(fs *flag.FlagSet, rf *restoreFlags, verify bool) {
	if verify {
		fs.BoolVar(&rf.deep, "deep", false, "download every segment and check its SHA-256 and WAL pages")
		fs.BoolVar(&rf.json, "json", false, "print the report as JSON")
		fs.IntVar(&rf.parallel, "parallel", 16, "objects checked at once")
		fs.Int64Var(&rf.segmentSize, "segment-size", 0, "WAL segment size in bytes (default: from the archive)")
		return
	}
	fs.IntVar(&rf.prefetch, "prefetch", 8, "segments to download ahead of recovery (0: off)")
	fs.StringVar(&rf.prefetchDir, "prefetch-dir", "", "prefetch directory (default: .walship-prefetch beside the destination, in pg_wal)")
	fs.BoolVar(&rf.allowPartial, "allow-partial", false, "when the whole segment is not archived, serve its .partial, else the WAL its ranges hold from its start, zero-padded")
	fs.DurationVar(&rf.retryFor, "retry-for", 2*time.Minute, "bound of the whole call: transient errors are retried this long, then PostgreSQL is made to abort recovery")
	fs.BoolVar(&rf.cleanup, "cleanup", false, "remove the prefetch directory and stop its prefetcher, for recovery_end_command (exit 0, or 1 on failure)")
	fs.BoolVar(&rf.worker, "prefetch-worker", false, "internal: run as the background prefetcher")
}

// restoreSetup parses the flags shared by fetch, verify and ls.
func restoreSetup(name string, args []string, verify bool, stdout io.Writer) (*config, *restoreFlags, []string, error) {
	c := &config{}
	rf := &restoreFlags{}
	fs := newFlagSet(name, c, gSink|gArchive)
	fs.StringVar(&c.Server, "server", "", "server name (default for fetch: pg-<system identifier> from the data directory's pg_control)")
	addRestoreFlags(fs, rf, verify)
	addDecryptFlag(fs, &c.cryptConfig)
	rest, err := parse(fs, args)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprintf(stdout, "Usage: walship %s [flags]\n\n%s", name, usageOf(fs))
	}
	return c, rf, rest, err
}

// openRestoreSink opens the destination for reading: a file:// archive
// must exist (an unmounted path is an error, never an empty archive).
func openRestoreSink(ctx context.Context, c *config, check bool) (sinks.Sink, sinks.Layout, error) {
	if c.Dest == "" {
		return nil, nil, fmt.Errorf("%w: --dest is required (s3://bucket/prefix or file:///path)", errUsage)
	}
	if c.Server != "" {
		if err := pipeline.ValidServerName(c.Server); err != nil {
			return nil, nil, fmt.Errorf("%w: --server: %v", errUsage, err)
		}
	}
	var sink sinks.Sink
	var prefix string
	if u, err := url.Parse(c.Dest); err == nil && u.Scheme == "file" && (u.Host == "" || u.Host == "localhost") && u.Path != "" {
		s, err := filesink.Open(u.Path)
		if err != nil {
			return nil, nil, err
		}
		sink = s
	} else if sink, prefix, err = openSinkChecked(ctx, c, check); err != nil {
		return nil, nil, err
	}
	layout, err := sinks.NewLayout(c.Layout, prefix, c.Server)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: --%v", errUsage, err)
	}
	return sink, layout, nil
}

// codecOrder puts the configured codec first, then the others.
func codecOrder(first string) []compress.Codec {
	out := []compress.Codec{}
	if c, err := compress.ParseCodec(first); err == nil {
		out = append(out, c)
	}
	for _, c := range compress.Codecs() {
		if len(out) == 0 || c != out[0] {
			out = append(out, c)
		}
	}
	return out
}

// pgControlSystemID reads the system identifier from the data directory
// restore_command runs in (its first 8 bytes); "" when there is no
// global/pg_control.
func pgControlSystemID() (string, error) {
	b, err := os.ReadFile(filepath.Join("global", "pg_control"))
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("read global/pg_control: %w", err)
	}
	if len(b) < 8 {
		return "", fmt.Errorf("global/pg_control is %d bytes: not a pg_control file", len(b))
	}
	return strconv.FormatUint(binary.LittleEndian.Uint64(b[:8]), 10), nil
}

// cmdFetch is restore_command. Every way it ends other than serving the
// file (0) or a confirmed "not in this cluster's archive" (1) is an abort
// (255), so that PostgreSQL never ends recovery early by mistake.
func cmdFetch(ctx context.Context, args []string, stdout io.Writer) error {
	err := fetch(ctx, args, stdout)
	var ee *exitError
	if err == nil || errors.As(err, &ee) {
		return err
	}
	return &exitError{exitAbort, err}
}

func fetch(ctx context.Context, args []string, stdout io.Writer) error {
	c, rf, rest, err := restoreSetup("fetch", args, false, stdout)
	if errors.Is(err, flag.ErrHelp) {
		// restore_command = 'walship fetch -h ...' must not read as success.
		return &exitError{exitAbort, errors.New("fetch -h printed the usage and exits 255, so a restore_command holding -h aborts recovery")}
	}
	if err != nil {
		return err
	}
	if rf.cleanup {
		return fetchCleanup(rf, rest)
	}
	if len(rest) != 2 {
		return fmt.Errorf("%w: usage: walship fetch <wal file> <destination>, as restore_command = 'walship fetch %%f %%p'", errUsage)
	}
	name, dest := rest[0], rest[1]
	sysID, err := pgControlSystemID()
	if err != nil {
		return err
	}
	if c.Server == "" && c.Layout != "wal-g" {
		if sysID == "" {
			return fmt.Errorf("%w: --server is required (no global/pg_control in the working directory to derive it from)", errUsage)
		}
		c.Server = "pg-" + sysID
	}
	var deadline time.Time
	if !rf.worker {
		// --retry-for bounds the whole call, every request included.
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, rf.retryFor)
		defer cancel()
		deadline, _ = ctx.Deadline()
	}
	sink, layout, err := openRestoreSink(ctx, c, false)
	if err != nil {
		return err
	}
	ids, err := c.identities()
	if err != nil {
		return err
	}
	f := &restore.Fetcher{Sink: sink, Layout: layout, Codecs: codecOrder(c.Compression), AllowPartial: rf.allowPartial, SystemID: sysID, Identities: ids}
	pf := &restore.Prefetch{Fetcher: f, Count: rf.prefetch, Dir: rf.prefetchDir,
		Manifest: restore.Manifest{Dest: c.Dest, Layout: c.Layout, Server: c.Server, SystemID: sysID, AllowPartial: rf.allowPartial}}
	if pf.Dir == "" {
		pf.Dir = filepath.Join(filepath.Dir(dest), ".walship-prefetch")
	}
	if rf.worker {
		// Background prefetcher: dest is the segment size.
		var size int64
		fmt.Sscan(dest, &size)
		pf.RecoveryEnded = recoveryEnded()
		return pf.Run(ctx, pipeline.SegmentSize(size))
	}
	restore.RemoveTemp(dest) // left by a fetch that was killed
	prefetch := pipeline.IsSegmentName(name) && rf.prefetch > 0
	if prefetch {
		pf.CleanStale()
		pf.Clean(name)
		if pf.Usable() {
			// Long enough for a segment on a slow link; a prefetcher
			// that is stuck holds no call for long.
			pf.Await(name, min(time.Until(deadline)/2, 20*time.Second))
			pf.Want(name) // first, so the prefetcher's window moves past name before it leaves
			if ok, err := pf.Serve(name, dest); err != nil {
				return err
			} else if ok {
				startPrefetch(pf, name, dest, args)
				return nil
			}
		}
	}
	bo := backoff.New(500*time.Millisecond, 10*time.Second)
	for {
		err := f.Fetch(ctx, name, dest)
		switch {
		case err == nil:
			// A prefetcher of another configuration is left to go idle;
			// otherwise one starts (or follows) from here.
			if prefetch && (pf.Usable() || !pf.Running()) {
				pf.Want(name)
				startPrefetch(pf, name, dest, args)
			}
			return nil
		case errors.Is(err, restore.ErrNotFound):
			return &exitError{exitNotFound, fmt.Errorf("%s is not in the archive", name)}
		case errors.Is(err, restore.ErrCorrupt):
			return &exitError{exitAbort, fmt.Errorf("refusing to restore %s: %v", name, err)}
		case errors.Is(err, restore.ErrCannotDecrypt):
			return &exitError{exitAbort, fmt.Errorf("cannot restore %s: %v; aborting recovery so it does not end early", name, err)}
		case errors.Is(err, restore.ErrWrongArchive):
			return &exitError{exitAbort, fmt.Errorf("refusing to answer for %s: %v; aborting recovery so it does not end early", name, err)}
		case errors.Is(err, s3sink.ErrTLS):
			return &exitError{exitAbort, fmt.Errorf("cannot fetch %s: %v; aborting recovery so it does not end early", name, err)}
		case errors.Is(err, errUsage) || errors.Is(err, s3sink.ErrNoBucket) || ctx.Err() != nil:
			return &exitError{exitAbort, fmt.Errorf("cannot fetch %s within --retry-for %s: %v; aborting recovery so it does not end early", name, rf.retryFor, err)}
		}
		fmt.Fprintf(os.Stderr, "walship: fetch %s: %v; retrying\n", name, err)
		if !bo.Wait(ctx) {
			return &exitError{exitAbort, fmt.Errorf("cannot fetch %s within --retry-for %s: %v; aborting recovery so it does not end early", name, rf.retryFor, err)}
		}
	}
}

// fetchCleanup removes the prefetch directory, for recovery_end_command
// (run in the data directory). It fails with status 1, never above 125:
// PostgreSQL then only warns and starts.
func fetchCleanup(rf *restoreFlags, rest []string) error {
	if len(rest) > 0 {
		return &exitError{1, fmt.Errorf("%w: fetch --cleanup takes no arguments (it runs in the data directory)", errUsage)}
	}
	dir := rf.prefetchDir
	if dir == "" {
		dir = filepath.Join("pg_wal", ".walship-prefetch")
	}
	pf := &restore.Prefetch{Dir: dir}
	if err := pf.Cleanup(5 * time.Second); err != nil {
		return &exitError{1, err}
	}
	return nil
}

// recoveryEnded tells the prefetcher when PostgreSQL has left recovery:
// it removes recovery.signal and standby.signal from the data directory
// (the working directory) when it promotes. Outside a data directory in
// recovery it cannot tell, and returns nil.
func recoveryEnded() func() bool {
	inRecovery := func() bool {
		for _, s := range []string{"recovery.signal", "standby.signal"} {
			if _, err := os.Stat(s); err == nil {
				return true
			}
		}
		return false
	}
	if !inRecovery() {
		return nil
	}
	return func() bool { return !inRecovery() }
}

// startPrefetch launches a detached prefetcher, unless one is at work, and
// returns at once: restore_command must not wait for it.
func startPrefetch(pf *restore.Prefetch, name, dest string, args []string) {
	if pf.Running() {
		return
	}
	fi, err := os.Stat(dest)
	if err != nil {
		return
	}
	self, err := os.Executable()
	if err != nil {
		return
	}
	var flags []string
	for i := 0; i < len(args); i++ {
		if args[i] == name || args[i] == dest {
			continue
		}
		flags = append(flags, args[i])
	}
	cmd := exec.Command(self, append(append([]string{"fetch"}, flags...), "--prefetch-dir", pf.Dir, "--prefetch-worker", name, fmt.Sprint(fi.Size()))...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err == nil {
		cmd.Process.Release()
	}
}

func cmdVerify(ctx context.Context, args []string, stdout io.Writer, listOnly bool) error {
	name := "verify"
	if listOnly {
		name = "ls"
	}
	c, rf, rest, err := restoreSetup(name, args, true, stdout)
	if err != nil {
		return err
	}
	if len(rest) > 0 {
		return fmt.Errorf("%w: unexpected argument %q", errUsage, rest[0])
	}
	if c.Server == "" && c.Layout != "wal-g" {
		return fmt.Errorf("%w: --server is required with the barman-cloud layout", errUsage)
	}
	sink, layout, err := openRestoreSink(ctx, c, true)
	if err != nil {
		return err
	}
	ids, err := c.identities()
	if err != nil {
		return err
	}
	opts := restore.VerifyOptions{SegmentSize: pipeline.SegmentSize(rf.segmentSize), Metadata: !listOnly, Deep: rf.deep && !listOnly, Parallel: rf.parallel, Identities: ids}
	if opts.Deep && !rf.json && term.IsTerminal(int(os.Stderr.Fd())) {
		opts.Progress = func(done, total int) {
			fmt.Fprintf(os.Stderr, "\rverifying %d/%d", done, total)
			if done == total {
				fmt.Fprintln(os.Stderr)
			}
		}
	}
	rep, err := restore.Verify(ctx, sink, layout, opts)
	if err != nil {
		return err
	}
	if rf.json {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		enc.Encode(rep)
	} else {
		printReport(stdout, rep, listOnly)
	}
	if !listOnly && !rep.OK() {
		return &exitError{1, fmt.Errorf("the archive under %s has %d problem(s) and %d gap(s)", rep.Prefix, len(rep.Problems), countGaps(rep))}
	}
	return nil
}

func countGaps(r *restore.Report) int {
	n := 0
	for _, t := range r.Timelines {
		n += len(t.Gaps)
	}
	return n
}

func printReport(w io.Writer, r *restore.Report, listOnly bool) {
	fmt.Fprintf(w, "archive %s: %d objects, %d bytes, segment size %d\n", r.Prefix, r.Objects, r.Bytes, r.SegmentSize)
	for _, t := range r.Timelines {
		hist := ""
		if t.History {
			hist = ", history archived"
		}
		fmt.Fprintf(w, "timeline %d: %d segments %s .. %s%s\n", t.Timeline, t.Segments, t.First, t.Last, hist)
		for _, p := range t.Partial {
			fmt.Fprintf(w, "  partial %s\n", p)
		}
		for _, g := range t.Gaps {
			fmt.Fprintf(w, "  GAP %s .. %s (%d segments missing)\n", g.From, g.To, g.Count)
		}
		if e := t.RangeEnd; e != nil {
			fmt.Fprintf(w, "  ends in ranges of %s to %s (%d range objects; fetch --allow-partial serves them)\n", e.Segment, e.End, e.Objects)
		}
	}
	if r.LeftoverRanges > 0 {
		fmt.Fprintf(w, "leftover ranges: %d range objects of segments archived whole (the archiver deletes them)\n", r.LeftoverRanges)
	}
	if listOnly {
		return
	}
	for _, p := range r.Problems {
		fmt.Fprintf(w, "PROBLEM %s: %s\n", p.Key, p.Problem)
	}
	if r.OK() {
		fmt.Fprintf(w, "OK: no gaps, no problems (%d objects verified byte for byte)\n", r.Checked)
	}
}
