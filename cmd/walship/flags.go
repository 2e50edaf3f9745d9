package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"time"
)

// config is every setting a subcommand may take. Each comes from a flag,
// else from WALSHIP_<FLAG> in the environment, else its default.
type config struct {
	PG             string
	Slot           string
	CreateSlot     bool
	AppName        string
	Server         string
	NATS           string
	NATSListen     string
	NATSReplicas   int
	DataDir        string
	SpoolDir       string
	Dest           string
	Layout         string
	S3Endpoint     string
	S3Region       string
	S3PathStyle    bool
	S3SignPayload  bool
	S3Timeout      time.Duration
	S3NoCondWrites bool
	Compression    string
	Level          int
	Workers        int
	StatusInterval time.Duration
	Standby        bool
	Synchronous    bool
	PartialInt     time.Duration
	SafeWALWarn    int64
	RepublishAfter time.Duration
	AckWait        time.Duration
	ConflictRetry  time.Duration
	MetricsAddr    string
	DebugAddr      string
	LogFormat      string
	LogLevel       string
	IfNotExists    bool
	IfExists       bool
	cryptConfig
	NATSSec   natsSecurity   // natssec.go
	S3Sec     s3Security     // s3sec.go
	Retention retentionFlags // prune.go
	Stage     stageFlags     // stage.go
}

type flagGroup int

const (
	gPG flagGroup = 1 << iota
	gReceive
	gNATS
	gSink
	gArchive
	gCommon
	gSlot
	gEmbedded
)

// newFlagSet registers the flags of the given groups on a new set.
func newFlagSet(name string, c *config, groups flagGroup) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	has := func(g flagGroup) bool { return groups&g != 0 }
	if has(gPG) {
		fs.StringVar(&c.PG, "pg", "", "PostgreSQL connection: libpq URL or key=value string (PG* variables and ~/.pgpass apply)")
		fs.StringVar(&c.Slot, "slot", "walship", "physical replication slot")
		fs.StringVar(&c.AppName, "application-name", "walship", "application_name shown in pg_stat_replication")
	}
	if has(gSlot) {
		fs.BoolVar(&c.IfNotExists, "if-not-exists", false, "slot create: succeed when the slot exists")
		fs.BoolVar(&c.IfExists, "if-exists", false, "slot drop: succeed when the slot does not exist")
	}
	if has(gReceive) {
		fs.BoolVar(&c.CreateSlot, "create-slot", false, "create the slot (PHYSICAL RESERVE_WAL) when it does not exist")
		fs.StringVar(&c.Server, "server", "", "server name in subjects and keys (default pg-<system identifier>)")
		fs.StringVar(&c.SpoolDir, "spool-dir", "", "local spool directory (default <data-dir>/spool)")
		fs.DurationVar(&c.StatusInterval, "status-interval", 10*time.Second, "standby status update interval")
		fs.DurationVar(&c.RepublishAfter, "republish-after", 5*time.Minute, "publish a segment again when not confirmed archived within this time")
		fs.BoolVar(&c.Standby, "standby", false, "when another receiver streams the slot, wait and take over when it stops (instead of exiting)")
		fs.Int64Var(&c.SafeWALWarn, "safe-wal-size-warn", 1<<30, "warn (log and walship_slot_safe_wal_size_low) when the slot's safe_wal_size falls under this many bytes")
		fs.BoolVar(&c.Synchronous, "synchronous", false, "fsync and report the write position as soon as caught up, for synchronous_commit = remote_write")
		fs.DurationVar(&c.PartialInt, "partial-interval", 5*time.Second, "upload the WAL of the segment being written this often, once the segment is this old (0: whole segments only)")
	}
	if has(gNATS) {
		fs.StringVar(&c.NATS, "nats", "", "NATS server URL, or a cluster's nodes comma-separated (run: empty starts an embedded JetStream server)")
		fs.IntVar(&c.NATSReplicas, "nats-replicas", 1, "JetStream replicas for walship's streams (1 for one node, 3 in a cluster)")
		addNATSSecurityFlags(fs, &c.NATSSec)
		fs.DurationVar(&c.AckWait, "ack-wait", time.Minute, "how long an archiver may hold a segment event without a progress signal before JetStream delivers it to another")
	}
	if has(gEmbedded) {
		fs.StringVar(&c.NATSListen, "embedded-nats-listen", "127.0.0.1:4222", "listen address of the embedded NATS server (loopback by default)")
		addEmbeddedNATSSecurityFlags(fs, &c.NATSSec)
	}
	if has(gReceive) && !has(gSink) {
		// receive: the destination only names the archive confirmations must come from.
		fs.StringVar(&c.Dest, "dest", "", "the archivers' destination; confirmations naming another are ignored (empty: accept any)")
		fs.StringVar(&c.S3Endpoint, "s3-endpoint", "", "the archivers' S3 endpoint, part of the destination's name")
	}
	if has(gSink) {
		fs.StringVar(&c.Dest, "dest", "", "archive destination: s3://bucket/prefix or file:///path (run: default file://<data-dir>/archive)")
		fs.StringVar(&c.Layout, "layout", "barman-cloud", "key layout: barman-cloud or wal-g")
		fs.StringVar(&c.S3Endpoint, "s3-endpoint", "", "S3 endpoint URL for S3-compatible servers")
		fs.StringVar(&c.S3Region, "s3-region", "", "S3 region (default from the AWS configuration, else us-east-1)")
		fs.BoolVar(&c.S3PathStyle, "s3-path-style", false, "use path-style S3 addressing")
		fs.BoolVar(&c.S3SignPayload, "s3-sign-payload", false, "sign a SHA-256 of each upload's body (default: UNSIGNED-PAYLOAD plus a signed CRC32C checksum)")
		fs.DurationVar(&c.S3Timeout, "s3-timeout", time.Minute, "deadline of each S3 request, its body included (raise it for large segments on slow links)")
		addS3SecurityFlags(fs, &c.S3Sec)
		fs.BoolVar(&c.S3NoCondWrites, "s3-no-conditional-writes", false, "the store ignores If-None-Match: check with a HEAD before each PUT instead (racy between archivers)")
	}
	if has(gArchive) {
		fs.StringVar(&c.Compression, "compression", "zstd", "compression: zstd, gzip, snappy or none")
		fs.IntVar(&c.Level, "compression-level", 0, "compression level (zstd 1-4, gzip 1-9; 0: fastest)")
		fs.IntVar(&c.Workers, "workers", runtime.NumCPU(), "archiver workers")
		fs.DurationVar(&c.ConflictRetry, "conflict-retry", 5*time.Minute, "how often a segment whose key holds other bytes is tried again (the slot holds meanwhile)")
	}
	if has(gArchive) && has(gCommon) {
		addEncryptFlags(fs, &c.cryptConfig)
	}
	if has(gCommon) {
		fs.StringVar(&c.DataDir, "data-dir", defaultDataDir(), "walship's working directory")
		fs.StringVar(&c.MetricsAddr, "metrics-addr", "127.0.0.1:9752", "address serving /metrics, /healthz and /readyz (empty: off)")
		fs.StringVar(&c.LogFormat, "log-format", "text", "log format: text or json")
		fs.StringVar(&c.LogLevel, "log-level", "info", "log level: debug, info, warn or error")
	}
	registerDebugFlags(fs, c, groups)
	registerRetentionFlags(fs, c, groups) // prune.go
	registerStageFlags(fs, c, groups)     // stage.go
	return fs
}

func defaultDataDir() string {
	if d, err := os.UserHomeDir(); err == nil {
		return filepath.Join(d, ".walship")
	}
	return "walship-data"
}

// envName is the environment variable of a flag: --s3-endpoint is
// WALSHIP_S3_ENDPOINT.
func envName(flagName string) string {
	return "WALSHIP_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// errUsage marks a command-line mistake (exit status 2).
var errUsage = errors.New("usage")

// parse parses args, then fills unset flags from the environment, then
// validates.
// Flags and positional arguments may be interleaved, as restore_command
// lines usually are ("walship fetch %f %p --dest ...").
func parse(fs *flag.FlagSet, args []string) ([]string, error) {
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, flag.ErrHelp
			}
			return nil, fmt.Errorf("%w: %v (see 'walship %s -h')", errUsage, err, fs.Name())
		}
		rest := fs.Args()
		if len(rest) == 0 {
			break
		}
		if len(args) > 0 && len(rest) < len(args) && args[len(args)-len(rest)-1] == "--" {
			positional = append(positional, rest...)
			break
		}
		positional = append(positional, rest[0])
		args = rest[1:]
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if set[f.Name] || err != nil {
			return
		}
		if v, ok := os.LookupEnv(envName(f.Name)); ok {
			if e := f.Value.Set(v); e != nil {
				err = fmt.Errorf("%w: %s=%q: %v", errUsage, envName(f.Name), v, e)
			}
		}
	})
	return positional, err
}

var slotNameRE = regexp.MustCompile(`^[a-z0-9_]{1,63}$`)

func (c *config) validate(groups flagGroup) error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", errUsage, fmt.Sprintf(format, args...))
	}
	if groups&gPG != 0 && !slotNameRE.MatchString(c.Slot) {
		return bad("--slot %q: slot names are 1-63 lower-case letters, digits or '_'", c.Slot)
	}
	if groups&gReceive != 0 && c.StatusInterval <= 0 {
		return bad("--status-interval must be positive")
	}
	if groups&gReceive != 0 && c.PartialInt < 0 {
		return bad("--partial-interval %s: use a positive duration, or 0 to upload whole segments only", c.PartialInt)
	}
	if groups&gArchive != 0 && c.Workers < 1 {
		return bad("--workers must be at least 1")
	}
	if groups&gArchive != 0 && groups&gCommon != 0 {
		if _, err := c.recipients(); err != nil {
			return err
		}
	}
	if err := c.Stage.validate(groups); err != nil { // stage.go
		return err
	}
	if groups&gCommon != 0 {
		if c.LogFormat != "text" && c.LogFormat != "json" {
			return bad("--log-format %q: use text or json", c.LogFormat)
		}
	}
	return nil
}

func usageOf(fs *flag.FlagSet) string {
	var b strings.Builder
	fs.SetOutput(&b)
	fs.PrintDefaults()
	fs.SetOutput(io.Discard)
	return b.String()
}
