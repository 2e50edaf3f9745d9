package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/backup"
	"github.com/walship/walship/pipeline/backup/unpack"
)

// backupRestoreFlags are `walship restore`'s own flags.
type backupRestoreFlags struct {
	backup         string
	targetDir      string
	jobs           int
	tablespaces    mappingList
	walshipBin     string
	noPartial      bool
	noSync         bool
	retryFor       time.Duration
	targetTime     string
	targetName     string
	targetLSN      string
	targetTimeline string
	targetAction   string
}

// mappingList is the repeatable --tablespace-mapping OLD=NEW.
type mappingList map[string]string

func (m mappingList) String() string { return fmt.Sprint(map[string]string(m)) }

func (m mappingList) Set(v string) error {
	old, new, ok := strings.Cut(v, "=")
	if !ok || !filepath.IsAbs(old) || !filepath.IsAbs(new) {
		return fmt.Errorf("%q: want OLDDIR=NEWDIR, both absolute", v)
	}
	old, new = filepath.Clean(old), filepath.Clean(new)
	if _, dup := m[old]; dup {
		return fmt.Errorf("%s is mapped twice", old)
	}
	m[old] = new
	return nil
}

// cmdRestoreBackup is `walship restore`: a base backup from the bucket
// into an empty data directory, with the recovery configuration that
// fetches the archive's WAL.
func cmdRestoreBackup(ctx context.Context, args []string, stdout io.Writer) error {
	c := &config{}
	bf := &backupRestoreFlags{tablespaces: mappingList{}}
	fs := newFlagSet("restore", c, gSink)
	fs.StringVar(&c.Server, "server", "", "server name (required with the barman-cloud layout)")
	addDecryptFlag(fs, &c.cryptConfig)
	fs.StringVar(&bf.backup, "backup", "", "backup to restore: its ID (20261129T210000Z) or latest (the newest complete one)")
	fs.StringVar(&bf.targetDir, "target-dir", "", "data directory to restore into (absent or empty)")
	fs.IntVar(&bf.jobs, "jobs", 4, "chunks downloaded at once")
	fs.Var(bf.tablespaces, "tablespace-mapping", "OLDDIR=NEWDIR: restore the tablespace at OLDDIR on the server into NEWDIR (repeatable; default: the same directory)")
	fs.StringVar(&bf.walshipBin, "walship-bin", "", "walship binary restore_command runs (default: this binary's absolute path)")
	fs.BoolVar(&bf.noPartial, "no-partial", false, "restore_command without --allow-partial: recovery stops at the last WAL archived as whole segments")
	fs.DurationVar(&bf.retryFor, "retry-for", 2*time.Minute, "how long each chunk is retried while the store is unreachable")
	fs.BoolVar(&bf.noSync, "no-sync", false, "do not syncfs the restored directories at the end (PostgreSQL fsyncs its data directory when it starts recovery)")
	fs.StringVar(&bf.targetTime, "target-time", "", "recover to this time (recovery_target_time, e.g. 2026-11-29 21:30:00+00)")
	fs.StringVar(&bf.targetName, "target-name", "", "recover to this restore point (recovery_target_name, made by pg_create_restore_point)")
	fs.StringVar(&bf.targetLSN, "target-lsn", "", "recover to this LSN (recovery_target_lsn)")
	fs.StringVar(&bf.targetTimeline, "target-timeline", "", "recovery_target_timeline: latest (PostgreSQL's default), current or a number")
	fs.StringVar(&bf.targetAction, "target-action", "", "at the target: pause (PostgreSQL's default), promote or shutdown")
	rest, err := parse(fs, args)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprintf(stdout, "Usage: walship restore --backup ID|latest --target-dir DIR [flags]\n\n%s", usageOf(fs))
		return err
	}
	if err != nil {
		return err
	}
	if len(rest) > 0 {
		return fmt.Errorf("%w: unexpected argument %q", errUsage, rest[0])
	}
	if err := bf.validate(c); err != nil {
		return err
	}
	bin := bf.walshipBin
	if bin == "" {
		if bin, err = os.Executable(); err != nil {
			return fmt.Errorf("find this binary for restore_command (give --walship-bin): %w", err)
		}
	}
	ids, err := c.identities()
	if err != nil {
		return err
	}
	sink, layout, err := openRestoreSink(ctx, c, true)
	if err != nil {
		return err
	}
	store, ok := sink.(unpack.Store)
	if !ok {
		return fmt.Errorf("%w: --dest %s cannot be listed", errUsage, c.Dest)
	}
	prefix := layout.BackupPrefix()
	cat, skipped, err := unpack.Find(ctx, store, prefix, bf.backup)
	for _, s := range skipped {
		fmt.Fprintf(os.Stderr, "walship: skipping backup %s\n", s)
	}
	if err != nil {
		return err
	}
	if err := bf.checkTargets(cat); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "restoring backup %s of %s (timeline %d, %s-%s, %d bytes) into %s\n", cat.ID, cat.Server, cat.Timeline, cat.StartLSN, cat.EndLSN, cat.Size, bf.targetDir)
	start := time.Now()
	res, err := unpack.Restore(ctx, unpack.Options{Sink: sink, Identities: ids, Jobs: bf.jobs, Tablespaces: bf.tablespaces, NoSync: bf.noSync, RetryFor: bf.retryFor}, cat, bf.targetDir)
	if err != nil {
		if errors.Is(err, unpack.ErrTarget) {
			return fmt.Errorf("%w: %v", errUsage, err)
		}
		if _, serr := os.Stat(filepath.Join(bf.targetDir, unpack.FailedFile)); serr == nil {
			return fmt.Errorf("%v; %s is NOT usable (no recovery.signal, see %s): remove it and restore again", err, bf.targetDir, unpack.FailedFile)
		}
		return err
	}
	cmd := fetchCommand(bin, c, cat, !bf.noPartial)
	if err := unpack.WriteRecovery(bf.targetDir, cat.ID, bf.settings(cmd, bin)); err != nil {
		return err
	}
	el := time.Since(start).Seconds()
	fmt.Fprintf(stdout, "restored %d files, %d bytes in %.1f s (%.0f MB/s, of which %.1f s syncing to disk); every file matches backup_manifest\n", res.Files, res.Bytes, el, float64(res.Bytes)/1e6/max(el, 1e-3), res.Sync.Seconds())
	for _, f := range res.Dropped {
		fmt.Fprintf(stdout, "left out the backup's %s (it matches backup_manifest; a backup taken on a standby carries standby.signal): the restore recovers from the archive and ends recovery, it does not become a standby\n", f)
	}
	for oid, d := range res.Tablespaces {
		fmt.Fprintf(stdout, "tablespace %s restored into %s\n", oid, d)
	}
	fmt.Fprintf(stdout, "wrote recovery.signal and, in postgresql.auto.conf, restore_command = '%s'\n", cmd)
	fmt.Fprintf(stdout, "start PostgreSQL on %s as the OS user that owns it; it needs the S3 credentials in its environment (or that user's ~/.aws)\n", bf.targetDir)
	return nil
}

var timelineRE = regexp.MustCompile(`^(latest|current|[1-9][0-9]*)$`)

// targetTimeLayouts are the forms of --target-time accepted.
var targetTimeLayouts = []string{time.RFC3339Nano, "2006-01-02 15:04:05.999999999Z07:00", "2006-01-02 15:04:05.999999999Z07", "2006-01-02 15:04:05.999999999-0700"}

func parseTargetTime(s string) (time.Time, bool) {
	for _, l := range targetTimeLayouts {
		if t, err := time.Parse(l, s); err == nil {
			return t, true
		}
	}
	return time.Time{}, false
}

// validate checks the flags before anything connects.
func (bf *backupRestoreFlags) validate(c *config) error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", errUsage, fmt.Sprintf(format, args...))
	}
	if bf.backup == "" {
		return bad("--backup is required: a backup ID (walship backup list) or latest")
	}
	if bf.backup != "latest" {
		if _, err := backup.ParseID(bf.backup); err != nil {
			return bad("--backup: %v, or latest", err)
		}
	}
	if bf.targetDir == "" {
		return bad("--target-dir is required: the (absent or empty) data directory to restore into")
	}
	abs, err := filepath.Abs(bf.targetDir)
	if err != nil {
		return bad("--target-dir %s: %v", bf.targetDir, err)
	}
	bf.targetDir = abs
	if bf.jobs < 1 {
		return bad("--jobs must be at least 1")
	}
	if bf.retryFor <= 0 {
		return bad("--retry-for must be positive")
	}
	if c.Server == "" && c.Layout != "wal-g" {
		return bad("--server is required with the barman-cloud layout")
	}
	if u, err := url.Parse(c.S3Endpoint); err == nil && u.User != nil {
		return bad("--s3-endpoint carries credentials, which restore would write into postgresql.auto.conf: give them in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")
	}
	n := 0
	for _, t := range []string{bf.targetTime, bf.targetName, bf.targetLSN} {
		if t != "" {
			n++
		}
	}
	if n > 1 {
		return bad("give at most one of --target-time, --target-name and --target-lsn (PostgreSQL takes one recovery target)")
	}
	if bf.targetTime != "" {
		if _, ok := parseTargetTime(bf.targetTime); !ok {
			return bad("--target-time %q: want a time with its zone, like 2026-11-29 21:30:00+00 or 2026-11-29T21:30:00Z", bf.targetTime)
		}
	}
	if bf.targetLSN != "" {
		if _, err := pipeline.ParseLSN(bf.targetLSN); err != nil {
			return bad("--target-lsn %q: want an LSN like 0/3000028", bf.targetLSN)
		}
	}
	if strings.ContainsAny(bf.targetName, "\n\r\x00") {
		return bad("--target-name: a restore point name is one line")
	}
	if bf.targetTimeline != "" && !timelineRE.MatchString(bf.targetTimeline) {
		return bad("--target-timeline %q: use latest, current or a timeline number", bf.targetTimeline)
	}
	switch bf.targetAction {
	case "", "pause", "promote", "shutdown":
	default:
		return bad("--target-action %q: use pause, promote or shutdown", bf.targetAction)
	}
	if bf.targetAction != "" && n == 0 {
		return bad("--target-action needs a target (--target-time, --target-name or --target-lsn): without one, recovery replays all WAL and promotes")
	}
	return nil
}

// checkTargets refuses a target PostgreSQL could not reach from the
// backup: recovery must replay at least to the backup's end.
func (bf *backupRestoreFlags) checkTargets(cat backup.Catalog) error {
	ts, err := unpack.TablespaceDirs(cat, bf.tablespaces)
	if err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	for _, d := range ts {
		if d == bf.targetDir || strings.HasPrefix(d, bf.targetDir+string(filepath.Separator)) {
			return fmt.Errorf("%w: tablespace directory %s lies inside --target-dir %s: map it elsewhere with --tablespace-mapping", errUsage, d, bf.targetDir)
		}
	}
	if bf.targetLSN != "" {
		if l, _ := pipeline.ParseLSN(bf.targetLSN); l < cat.EndLSN {
			return fmt.Errorf("%w: --target-lsn %s is before backup %s ends (%s): choose an older backup or a later target", errUsage, l, cat.ID, cat.EndLSN)
		}
	}
	if bf.targetTime != "" {
		if t, _ := parseTargetTime(bf.targetTime); !cat.EndTime.IsZero() && t.Before(cat.EndTime) {
			return fmt.Errorf("%w: --target-time %s is before backup %s ends (%s): choose an older backup or a later target", errUsage, bf.targetTime, cat.ID, cat.EndTime.UTC().Format(time.RFC3339))
		}
	}
	return nil
}

// settings are the postgresql.auto.conf lines of the recovery.
func (bf *backupRestoreFlags) settings(cmd, bin string) []string {
	out := []string{
		"restore_command = " + confQuote(cmd),
		"recovery_end_command = " + confQuote(pgPercent(shellQuote(bin))+" fetch --cleanup"),
	}
	add := func(k, v string) {
		if v != "" {
			out = append(out, k+" = "+confQuote(v))
		}
	}
	add("recovery_target_time", bf.targetTime)
	add("recovery_target_name", bf.targetName)
	add("recovery_target_lsn", bf.targetLSN)
	add("recovery_target_timeline", bf.targetTimeline)
	add("recovery_target_action", bf.targetAction)
	return out
}

// fetchCommand is the restore_command: walship fetch with the destination
// flags this restore was given. It never holds a secret: S3 credentials
// come from the environment or files, the age identity is a file.
func fetchCommand(bin string, c *config, cat backup.Catalog, allowPartial bool) string {
	args := []string{bin, "fetch", "%f", "%p", "--dest", c.Dest, "--layout", c.Layout}
	add := func(a ...string) { args = append(args, a...) }
	if c.Server != "" {
		add("--server", c.Server)
	}
	if c.S3Endpoint != "" {
		add("--s3-endpoint", c.S3Endpoint)
	}
	if c.S3Region != "" {
		add("--s3-region", c.S3Region)
	}
	if c.S3PathStyle {
		add("--s3-path-style")
	}
	if c.S3SignPayload {
		add("--s3-sign-payload")
	}
	if c.S3Timeout != time.Minute {
		add("--s3-timeout", c.S3Timeout.String())
	}
	if c.S3Sec.CABundle != "" {
		add("--s3-ca-bundle", absPath(c.S3Sec.CABundle))
	}
	if c.DecryptIdentity != "" {
		add("--decrypt-identity", absPath(c.DecryptIdentity))
	}
	if cat.Codec != "" && cat.Codec != "zstd" {
		add("--compression", cat.Codec)
	}
	if allowPartial {
		add("--allow-partial")
	}
	for i, a := range args {
		if a != "%f" && a != "%p" {
			args[i] = pgPercent(shellQuote(a))
		}
	}
	return strings.Join(args, " ")
}

var shellSafe = regexp.MustCompile(`^[A-Za-z0-9_/.:=@%+,-]+$`)

// shellQuote quotes a word for /bin/sh, which runs restore_command.
func shellQuote(s string) string {
	if shellSafe.MatchString(s) {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// pgPercent writes every '%' of a literal word as '%%': PostgreSQL expands
// %f, %p, %r and %% anywhere in restore_command and recovery_end_command.
func pgPercent(s string) string { return strings.ReplaceAll(s, "%", "%%") }

// confQuote quotes a postgresql.conf string value: PostgreSQL's parser
// unescapes backslashes inside quotes, so they are doubled too.
func confQuote(s string) string {
	s = strings.ReplaceAll(s, `\`, `\\`)
	return "'" + strings.ReplaceAll(s, "'", "''") + "'"
}
