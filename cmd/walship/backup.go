package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/backup/take"
	"github.com/walship/walship/pipeline/bus"
	"github.com/walship/walship/pipeline/receiver"
	"github.com/walship/walship/sinks"
)

// backupGroups are the flags `walship backup` shares with the other
// commands: PostgreSQL, NATS, the destination (it writes the catalogue
// and looks for the WAL), logging.
const backupGroups = gPG | gNATS | gSink | gCommon

// backupFlags are `walship backup`'s own flags.
type backupFlags struct {
	server         string
	label          string
	checkpoint     string
	maxRate        string
	checksums      string
	chunkSize      string
	window         int
	republishAfter time.Duration
	timeout        time.Duration
}

// cmdBackup dispatches `walship backup [take|list] ...`; taking one is
// the default.
func cmdBackup(ctx context.Context, args []string, stdout io.Writer) error {
	if len(args) > 0 {
		switch args[0] {
		case "take":
			return backupTake(ctx, args[1:], stdout)
		case "list":
			return backupList(ctx, args[1:], stdout)
		}
	}
	return backupTake(ctx, args, stdout)
}

// backupTake takes a base backup through the pipeline and prints its ID
// once it is complete: every chunk and the WAL up to its end are in the
// bucket and the catalogue is written.
func backupTake(ctx context.Context, args []string, stdout io.Writer) error {
	c := &config{}
	fs := newFlagSet("backup", c, backupGroups)
	var bf backupFlags
	fs.StringVar(&bf.server, "server", "", "server name the receiver and archivers use (default pg-<system identifier>, as theirs)")
	fs.StringVar(&bf.label, "label", "", "backup label (default 'walship <backup id>')")
	fs.StringVar(&bf.checkpoint, "checkpoint", "fast", "checkpoint at the start: fast (at once) or spread (paced by checkpoint_completion_target)")
	fs.StringVar(&bf.maxRate, "max-rate", "", "throttle the server's sending: kB/s, or with a unit (e.g. 50M, 800k); empty: no limit")
	fs.StringVar(&bf.checksums, "manifest-checksums", "CRC32C", "backup manifest file checksums: NONE, CRC32C, SHA224, SHA256, SHA384 or SHA512")
	fs.StringVar(&bf.chunkSize, "chunk-size", "16MiB", "raw size of each chunk (64KiB to 512MiB)")
	fs.IntVar(&bf.window, "window", 4, "chunks published and not yet confirmed archived, each held in memory")
	fs.DurationVar(&bf.republishAfter, "republish-after", 5*time.Minute, "publish a chunk again when not confirmed archived within this time")
	fs.DurationVar(&bf.timeout, "timeout", 6*time.Hour, "give up (exit non-zero, no catalogue) when the backup is not complete within this time")
	rest, err := parse(fs, args)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprintf(stdout, "Usage: walship backup [take] [flags]\n       walship backup list [flags]\n\n%s", usageOf(fs))
		return err
	}
	if err != nil {
		return err
	}
	if len(rest) > 0 {
		return fmt.Errorf("%w: unexpected argument %q", errUsage, rest[0])
	}
	if err := c.validate(backupGroups); err != nil {
		return err
	}
	if c.NATS == "" {
		return fmt.Errorf("%w: backup needs --nats, the NATS the archivers of 'walship run' or 'walship archive' consume from", errUsage)
	}
	if c.Dest == "" {
		return fmt.Errorf("%w: backup needs --dest, the archivers' destination (with --s3-endpoint if they use one)", errUsage)
	}
	if bf.server != "" {
		if err := validServer(bf.server); err != nil {
			return err
		}
	}
	if bf.window < 1 || bf.window > 256 {
		return fmt.Errorf("%w: --window %d: use 1 to 256 chunks", errUsage, bf.window)
	}
	if bf.timeout <= 0 {
		return fmt.Errorf("%w: --timeout %s: use a positive duration", errUsage, bf.timeout)
	}
	rate, err := parseRate(bf.maxRate)
	if err != nil {
		return err
	}
	chunk, err := parseBytes("--chunk-size", bf.chunkSize)
	if err != nil {
		return err
	}
	if _, err := sinks.NewLayout(c.Layout, "", "x"); err != nil {
		return fmt.Errorf("%w: --%v", errUsage, err)
	}
	if c.AppName == "walship" { // the receiver's default: keep them apart in pg_stat_replication
		c.AppName = "walship-backup"
	}
	pgcfg, err := receiver.ConnConfig(c.PG, c.AppName, "true")
	if err != nil {
		return err
	}
	dest, err := sinks.DestID(c.Dest, c.S3Endpoint)
	if err != nil {
		return fmt.Errorf("%w: --dest: %v", errUsage, err)
	}
	if os.Getenv("GOGC") == "" {
		// The window's chunks are the live heap; staging them in the object
		// store makes as much garbage again. Collecting at 50% growth keeps
		// the RSS near (window+1) chunks, as the archivers do.
		debug.SetGCPercent(50)
	}
	log, _, err := newLogging(c)
	if err != nil {
		return err
	}
	var prefix string // set once the sink is open
	layout := func(server string) sinks.Layout {
		l, _ := sinks.NewLayout(c.Layout, prefix, server)
		return l
	}
	host, _ := os.Hostname()
	tcfg := take.Config{
		Server: bf.server,
		Options: take.Options{Label: bf.label, Checkpoint: bf.checkpoint, MaxRate: rate,
			ManifestChecksums: strings.ToUpper(bf.checksums)},
		ChunkSize: chunk, Window: bf.window, RepublishAfter: bf.republishAfter, Timeout: bf.timeout,
		Dest: dest, LayoutFor: layout, Host: host, Log: log,
		Connect: func(ctx context.Context) (*pgconn.PgConn, error) { return receiver.Connect(ctx, pgcfg) },
	}
	if _, err := take.New(tcfg, nil, nil); err != nil { // the settings, before connecting anywhere
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	sink, prefix, err := openSink(ctx, c)
	if err != nil {
		return err
	}
	extra, err := c.NATSSec.clientOptions(c.NATS)
	if err != nil {
		return err
	}
	opts := bus.DefaultOptions()
	opts.Replicas = c.NATSReplicas
	if c.AckWait > 0 {
		opts.AckWait = c.AckWait
	}
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	b, err := bus.Connect(cctx, c.NATS, opts, log, extra...)
	cancel()
	if err != nil {
		return err
	}
	defer b.Close()
	t, err := take.New(tcfg, b, sink)
	if err != nil {
		return err
	}
	cat, err := t.Run(ctx)
	if err != nil {
		return err
	}
	log.Info("backup complete", "backup", cat.ID, "server", cat.Server, "start_lsn", cat.StartLSN.String(), "end_lsn", cat.EndLSN.String(),
		"size", cat.Size, "stored_size", cat.StoredSize, "codec", cat.Codec, "took", cat.EndTime.Sub(cat.StartTime).Round(time.Millisecond).String())
	fmt.Fprintln(stdout, cat.ID)
	return nil
}

func validServer(s string) error {
	if err := pipeline.ValidServerName(s); err != nil {
		return fmt.Errorf("%w: --server: %v", errUsage, err)
	}
	return nil
}

// parseRate reads --max-rate: kB/s as a plain number, or with a k, M or G
// unit (per second).
func parseRate(s string) (int, error) {
	if s == "" || s == "0" {
		return 0, nil
	}
	n, err := parseBytes("--max-rate", s)
	if err != nil {
		return 0, err
	}
	if _, plain := strconv.Atoi(s); plain == nil {
		n *= 1024 // a plain number is kB/s, as pg_basebackup --max-rate
	}
	kb := n / 1024
	if kb < 32 || kb > 1048576 {
		return 0, fmt.Errorf("%w: --max-rate %s: PostgreSQL throttles from 32 kB/s to 1 GB/s", errUsage, s)
	}
	return kb, nil
}

// parseBytes reads a size: a number of bytes, or with a unit k/K/KiB,
// M/MiB, G/GiB (powers of 1024).
func parseBytes(flagName, s string) (int, error) {
	units := []struct {
		suffix string
		mult   int
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"kB", 1 << 10}, {"MB", 1 << 20}, {"GB", 1 << 30},
		{"k", 1 << 10}, {"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}}
	num, mult := s, 1
	for _, u := range units {
		if v, ok := strings.CutSuffix(s, u.suffix); ok {
			num, mult = v, u.mult
			break
		}
	}
	n, err := strconv.Atoi(strings.TrimSpace(num))
	if err != nil || n <= 0 || n > (1<<40)/mult {
		return 0, fmt.Errorf("%w: %s %q: use a positive size such as 16MiB", errUsage, flagName, s)
	}
	return n * mult, nil
}
