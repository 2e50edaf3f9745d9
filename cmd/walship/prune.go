package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/backup/retention"
	"github.com/walship/walship/sinks"
)

// retentionFlags are the retention settings: prune's policy, and for the
// archiver process (run, archive) how often it prunes and scans.
type retentionFlags struct {
	Keep            int
	KeepWithin      days
	IncompleteAfter days
	PruneEvery      time.Duration
	ScanEvery       time.Duration
	Servers         string
}

// days is a duration flag that also takes days and weeks: 7d, 2w, 36h.
type days time.Duration

func (d *days) String() string { return time.Duration(*d).String() }

func (d *days) Set(s string) error {
	v, err := parseDays(s)
	if err != nil {
		return err
	}
	*d = days(v)
	return nil
}

func parseDays(s string) (time.Duration, error) {
	for suffix, unit := range map[string]time.Duration{"d": 24 * time.Hour, "w": 7 * 24 * time.Hour} {
		if n, ok := strings.CutSuffix(s, suffix); ok {
			f, err := strconv.ParseFloat(n, 64)
			if err != nil || f < 0 {
				return 0, fmt.Errorf("%q: use a duration like 7d, 2w or 36h", s)
			}
			return time.Duration(f * float64(unit)), nil
		}
	}
	v, err := time.ParseDuration(s)
	if err != nil || v < 0 {
		return 0, fmt.Errorf("%q: use a duration like 7d, 2w or 36h", s)
	}
	return v, nil
}

// addPolicyFlags registers the keep policy, shared by prune and the
// archiver's periodic prune.
func addPolicyFlags(fs *flag.FlagSet, r *retentionFlags) {
	r.IncompleteAfter = days(24 * time.Hour)
	fs.IntVar(&r.Keep, "keep", 0, "keep the N newest complete backups")
	fs.Var(&r.KeepWithin, "keep-within", "keep every complete backup that ended within this (e.g. 7d), plus the newest before it")
	fs.Var(&r.IncompleteAfter, "incomplete-after", "delete backups without a catalogue (failed) that started longer ago than this; newer ones may be in progress")
}

// registerRetentionFlags adds the periodic prune and catalogue scan to the
// commands that run archivers (run, archive).
func registerRetentionFlags(fs *flag.FlagSet, c *config, groups flagGroup) {
	if groups&gArchive == 0 || groups&gNATS == 0 || groups&gCommon == 0 {
		return
	}
	r := &c.Retention
	addPolicyFlags(fs, r)
	fs.DurationVar(&r.PruneEvery, "prune-every", 0, "prune backups and WAL this often with --keep/--keep-within (0: never)")
	fs.DurationVar(&r.ScanEvery, "backup-scan-every", 5*time.Minute, "scan the backup catalogue this often for the walship_backup* and walship_recovery_window* metrics (0: never)")
	fs.StringVar(&r.Servers, "backup-servers", "", "servers whose backups are scanned and pruned, comma-separated (default: every walship archive found under --dest)")
}

func (r *retentionFlags) policy() retention.Policy {
	return retention.Policy{Keep: r.Keep, KeepWithin: time.Duration(r.KeepWithin), IncompleteAfter: time.Duration(r.IncompleteAfter)}
}

// retentionWatcher is the archiver process's periodic catalogue scan and
// prune, run beside the archivers; it never ends the process.
func retentionWatcher(c *config, log *slog.Logger, reg prometheus.Registerer) (watcher, error) {
	r := &c.Retention
	if r.PruneEvery < 0 || r.ScanEvery < 0 {
		return nil, fmt.Errorf("%w: --prune-every and --backup-scan-every must not be negative", errUsage)
	}
	if r.PruneEvery > 0 {
		if err := r.policy().Validate(); err != nil {
			return nil, fmt.Errorf("%w: --prune-every: %v", errUsage, err)
		}
	}
	if r.PruneEvery == 0 && r.ScanEvery == 0 {
		return nil, nil
	}
	m := retention.NewMetrics(reg)
	// Discovering the servers lists the whole prefix: done when none is
	// known yet, and otherwise at most hourly.
	var known []string
	var discovered time.Time
	return func(ctx context.Context) error {
		sink, prefix, err := openSinkChecked(ctx, c, false)
		if err != nil {
			log.Error("backup catalogue: cannot open the destination", "error", err)
			<-ctx.Done()
			return nil
		}
		run := &retention.Runner{
			Sink: sink, Policy: r.policy(), PruneEvery: r.PruneEvery, ScanEvery: r.ScanEvery, Retry: 10 * time.Second, Now: time.Now, Log: log, Metrics: m,
			Layout: func(server string) sinks.Layout {
				l, _ := sinks.NewLayout(c.Layout, prefix, server)
				return l
			},
			Servers: func(ctx context.Context) ([]string, error) {
				if len(known) > 0 && time.Since(discovered) < time.Hour {
					return known, nil
				}
				s, err := retentionServers(ctx, c, sink, prefix)
				if err == nil {
					known, discovered = s, time.Now()
				}
				return s, err
			},
		}
		return run.Run(ctx)
	}, nil
}

// retentionServers are --backup-servers, else the servers whose archives
// lie under the destination: with barman-cloud, every
// <prefix>/<server>/walship.identity.json (one listing of the prefix);
// with wal-g, the prefix's one archive.
func retentionServers(ctx context.Context, c *config, sink sinks.Sink, prefix string) ([]string, error) {
	if c.Retention.Servers != "" {
		return strings.Split(c.Retention.Servers, ","), nil
	}
	if c.Layout == "wal-g" {
		l, _ := sinks.NewLayout(c.Layout, prefix, "")
		id, err := sinks.ReadIdentity(ctx, sink, l)
		if errors.Is(err, sinks.ErrNoIdentity) {
			return nil, nil
		}
		return []string{id.Server}, err
	}
	lister, ok := sink.(sinks.Lister)
	if !ok {
		return nil, errors.New("the destination cannot be listed; give --backup-servers")
	}
	root := ""
	if prefix != "" {
		root = strings.Trim(prefix, "/") + "/"
	}
	var out []string
	err := lister.List(ctx, root, func(o sinks.Object) error {
		rest := strings.TrimPrefix(o.Key, root)
		if server, leaf, ok := strings.Cut(rest, "/"); ok && leaf == "walship.identity.json" && pipeline.ValidServerName(server) == nil {
			out = append(out, server)
		}
		return nil
	})
	return out, err
}

// retentionSetup parses the flags of prune and backup list.
func retentionSetup(name string, args []string, stdout io.Writer, extra func(fs *flag.FlagSet)) (*config, error) {
	c := &config{}
	fs := newFlagSet(name, c, gSink)
	fs.StringVar(&c.Server, "server", "", "server name (required with the barman-cloud layout)")
	addDecryptFlag(fs, &c.cryptConfig)
	extra(fs)
	rest, err := parse(fs, args)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprintf(stdout, "Usage: walship %s [flags]\n\n%s", name, usageOf(fs))
		return nil, err
	}
	if err != nil {
		return nil, err
	}
	if len(rest) > 0 {
		return nil, fmt.Errorf("%w: unexpected argument %q", errUsage, rest[0])
	}
	if c.Server == "" && c.Layout != "wal-g" {
		return nil, fmt.Errorf("%w: --server is required with the barman-cloud layout", errUsage)
	}
	return c, nil
}

// scanServer opens the destination and scans one server's backups.
func scanServer(ctx context.Context, c *config) (sinks.Sink, *retention.State, error) {
	sink, layout, err := openRestoreSink(ctx, c, true)
	if err != nil {
		return nil, nil, err
	}
	ids, err := c.identities()
	if err != nil {
		return nil, nil, err
	}
	st, err := retention.Scan(ctx, sink, layout, retention.Options{Identities: ids})
	if err != nil {
		return nil, nil, err
	}
	return sink, st, nil
}

// cmdPrune deletes the backups outside the policy and the WAL no kept
// backup needs.
func cmdPrune(ctx context.Context, args []string, stdout io.Writer) error {
	var r retentionFlags
	var dryRun, asJSON bool
	c, err := retentionSetup("prune", args, stdout, func(fs *flag.FlagSet) {
		addPolicyFlags(fs, &r)
		fs.BoolVar(&dryRun, "dry-run", false, "print what would be deleted, delete nothing")
		fs.BoolVar(&asJSON, "json", false, "print the plan and result as JSON")
	})
	if err != nil {
		return err
	}
	pol := r.policy()
	pol.Now = time.Now()
	if err := pol.Validate(); err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	sink, st, err := scanServer(ctx, c)
	if err != nil {
		return err
	}
	plan, err := retention.NewPlan(st, pol)
	if err != nil {
		return err
	}
	if !dryRun {
		if _, ok := sink.(sinks.Deleter); !ok {
			return errors.New("this destination cannot delete objects: prune needs s3:// or file://")
		}
	}
	for _, w := range plan.Warnings {
		fmt.Fprintf(os.Stderr, "walship: warning: %s\n", w)
	}
	var res retention.Result
	if !dryRun {
		res, err = retention.Execute(ctx, sink, st, plan)
	}
	if asJSON {
		printPruneJSON(stdout, st, plan, res, dryRun)
	} else {
		printPrune(stdout, st, plan, res, dryRun)
	}
	if err != nil {
		return fmt.Errorf("prune stopped after deleting %d objects: %w", res.Objects, err)
	}
	return nil
}

func printPrune(w io.Writer, st *retention.State, plan *retention.Plan, res retention.Result, dryRun bool) {
	verb := "deleted"
	if dryRun {
		verb = "would delete"
	}
	for _, b := range plan.Keep {
		fmt.Fprintf(w, "keep backup %s (ended %s, starts at %s)\n", b.ID, b.EndTime().UTC().Format(time.RFC3339), b.Catalog.StartLSN)
	}
	for _, b := range plan.LeaveIncomplete {
		fmt.Fprintf(w, "keep incomplete backup %s (started %s: may be in progress)\n", b.ID, b.StartedAt.UTC().Format(time.RFC3339))
	}
	for _, f := range st.Foreign {
		fmt.Fprintf(w, "keep %s backup %s (its WAL from %s)\n", f.Tool, f.Key, f.StartLSN)
	}
	var bytes int64
	for _, b := range plan.Delete {
		fmt.Fprintf(w, "%s backup %s (ended %s, %d objects, %d bytes)\n", verb, b.ID, b.EndTime().UTC().Format(time.RFC3339), len(b.Objects), b.Bytes)
		bytes += b.Bytes
	}
	for _, b := range plan.DeleteIncomplete {
		fmt.Fprintf(w, "%s incomplete backup %s (started %s, %d objects, %d bytes)\n", verb, b.ID, b.StartedAt.UTC().Format(time.RFC3339), len(b.Objects), b.Bytes)
		bytes += b.Bytes
	}
	if plan.Note != "" {
		fmt.Fprintf(w, "WAL: %s\n", plan.Note)
	} else {
		var walBytes int64
		for _, o := range plan.WAL {
			walBytes += o.Size
		}
		bytes += walBytes
		first, last := "", ""
		if n := len(plan.WAL); n > 0 {
			first, last = path.Base(plan.WAL[0].Key), path.Base(plan.WAL[n-1].Key)
		}
		fmt.Fprintf(w, "WAL: %s %d objects, %d bytes, below %s (%s)", verb, len(plan.WAL), walBytes, plan.Floor, plan.FloorReason)
		if first != "" {
			fmt.Fprintf(w, ": %s .. %s", first, last)
		}
		fmt.Fprintln(w)
	}
	if dryRun {
		fmt.Fprintf(w, "dry run: would delete %d backups, %d incomplete backups, %d WAL objects, %d bytes; nothing deleted\n",
			len(plan.Delete), len(plan.DeleteIncomplete), len(plan.WAL), bytes)
		return
	}
	for _, id := range res.Completed {
		fmt.Fprintf(w, "incomplete backup %s completed during the prune: left alone (only its start marker deleted)\n", id)
	}
	fmt.Fprintf(w, "deleted %d backups, %d incomplete backups, %d WAL objects: %d objects, %d bytes\n", res.Backups, res.Incomplete, res.WAL, res.Objects, res.Bytes)
}

func printPruneJSON(w io.Writer, st *retention.State, plan *retention.Plan, res retention.Result, dryRun bool) {
	ids := func(bs []*retention.Backup) []string {
		out := []string{}
		for _, b := range bs {
			out = append(out, b.ID)
		}
		return out
	}
	wal := []string{}
	for _, o := range plan.WAL {
		wal = append(wal, o.Key)
	}
	out := map[string]any{
		"dry_run": dryRun, "keep": ids(plan.Keep), "delete": ids(plan.Delete),
		"delete_incomplete": ids(plan.DeleteIncomplete), "leave_incomplete": ids(plan.LeaveIncomplete),
		"floor": plan.Floor, "floor_reason": plan.FloorReason, "wal": wal, "note": plan.Note, "foreign": st.Foreign,
		"warnings": append([]string{}, plan.Warnings...),
	}
	if !dryRun {
		out["result"] = res
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(out)
}
