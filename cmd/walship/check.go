package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/walship/walship/pipeline/bus"
	"github.com/walship/walship/pipeline/receiver"
	"github.com/walship/walship/sinks"
)

// checkResult is one preflight check.
type checkResult struct {
	Name   string `json:"check"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail"`
	// Warning marks a check that passes with a warning (WARN).
	Warning bool `json:"warning,omitempty"`
}

// cmdCheck runs every preflight check, prints one line each, and fails if
// any failed. Nothing it does changes the system, except a probe object in
// the bucket that it deletes again.
func cmdCheck(ctx context.Context, args []string, stdout io.Writer) error {
	c := &config{}
	fs := newFlagSet("check", c, runGroups&^gEmbedded)
	asJSON := fs.Bool("json", false, "print the results as JSON")
	rest, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(rest) > 0 {
		return fmt.Errorf("%w: unexpected argument %q", errUsage, rest[0])
	}
	if err := c.validate(runGroups); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	var results []checkResult
	add := func(name string, err error, ok string) {
		if err != nil {
			results = append(results, checkResult{Name: name, Detail: err.Error()})
		} else {
			results = append(results, checkResult{Name: name, OK: true, Detail: ok})
		}
	}
	for _, w := range commandLineSecrets(fs, c) {
		results = append(results, checkResult{Name: "secrets", OK: true, Detail: w, Warning: true})
	}
	checkPostgres(ctx, c, add)
	if c.NATS != "" {
		extra, err := c.NATSSec.clientOptions(c.NATS)
		if err != nil {
			return err
		}
		probs, err := bus.Inspect(ctx, c.NATS, bus.DefaultNames(), extra...)
		add("nats", err, "reachable, JetStream enabled")
		if err == nil {
			if len(probs) > 0 {
				add("jetstream resources", errors.New(strings.Join(probs, "; ")), "")
			} else {
				add("jetstream resources", nil, "streams and consumer absent or configured as walship needs")
			}
		}
	}
	if c.Dest != "" {
		ok := "reachable and writable; a second put-if-absent of the probe was refused"
		if c.S3NoCondWrites {
			ok += " (by a HEAD before the PUT: --s3-no-conditional-writes)"
		}
		add("bucket", checkBucket(ctx, c), ok)
	}
	checkEncryption(c, add)
	spool := c.SpoolDir
	if spool == "" {
		spool = filepath.Join(c.DataDir, "spool")
	}
	add("spool", checkSpool(spool), "writable with room: "+spool)

	failed := 0
	for _, r := range results {
		if !r.OK {
			failed++
		}
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		enc.Encode(results)
	} else {
		for _, r := range results {
			status := "OK  "
			if r.Warning {
				status = "WARN"
			}
			if !r.OK {
				status = "FAIL"
			}
			fmt.Fprintf(stdout, "%s %-20s %s\n", status, r.Name, r.Detail)
		}
	}
	if failed > 0 {
		return &exitError{1, fmt.Errorf("%d of %d checks failed", failed, len(results))}
	}
	return nil
}

func checkPostgres(ctx context.Context, c *config, add func(string, error, string)) {
	cfg, err := receiver.ConnConfig(c.PG, c.AppName, "true")
	if err != nil {
		add("postgres replication", err, "")
		return
	}
	conn, err := receiver.Connect(ctx, cfg)
	if err != nil {
		add("postgres replication", err, "")
		return
	}
	defer conn.Close(context.Background())
	add("postgres replication", nil, fmt.Sprintf("connected as %s with REPLICATION", cfg.User))

	sqlCfg, _ := receiver.ConnConfig(c.PG, c.AppName+"-check", "")
	sql, err := receiver.Connect(ctx, sqlCfg)
	if err != nil {
		add("postgres sql", err, "")
		return
	}
	defer sql.Close(context.Background())
	q := func(query string, args ...string) (string, error) {
		params := make([][]byte, len(args))
		for i, a := range args {
			params[i] = []byte(a)
		}
		res := sql.ExecParams(ctx, query, params, nil, nil, nil).Read()
		if res.Err != nil {
			return "", res.Err
		}
		if len(res.Rows) == 0 || res.Rows[0][0] == nil {
			return "", nil
		}
		return string(res.Rows[0][0]), nil
	}
	level, err := q(`SELECT current_setting('wal_level')`)
	if err == nil && level != "replica" && level != "logical" {
		err = fmt.Errorf("wal_level = %s: set wal_level = replica in postgresql.conf and restart PostgreSQL", level)
	}
	add("wal_level", err, "wal_level = "+level)

	slot, serr := receiver.QuerySlot(ctx, sql, c.Slot)
	free, err := q(`SELECT current_setting('max_wal_senders')::int - (SELECT count(*) FROM pg_stat_replication)`)
	if n, _ := strconv.Atoi(free); err == nil && n < 1 && !(slot.Exists && slot.ActivePID != 0) {
		err = fmt.Errorf("all max_wal_senders are in use: raise max_wal_senders and restart PostgreSQL")
	}
	add("max_wal_senders", err, free+" free")
	if serr != nil {
		add("slot", serr, "")
		return
	}
	if !slot.Exists {
		free, err := q(`SELECT current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_replication_slots)`)
		if n, _ := strconv.Atoi(free); err == nil && n < 1 {
			err = fmt.Errorf("no free replication slot: raise max_replication_slots and restart PostgreSQL")
		}
		add("max_replication_slots", err, free+" free")
		if c.CreateSlot {
			add("slot", nil, fmt.Sprintf("%q does not exist; --create-slot will create it", c.Slot))
		} else {
			add("slot", fmt.Errorf("replication slot %q does not exist: create it with 'walship slot create --slot %s', or pass --create-slot", c.Slot, c.Slot), "")
		}
		return
	}
	switch {
	case !slot.Physical:
		err = fmt.Errorf("replication slot %q is a logical slot; walship needs a physical slot: choose another --slot", c.Slot)
	case slot.WALStatus == "lost":
		err = fmt.Errorf("replication slot %q was invalidated (wal_status = lost): the archive has a gap; take a new base backup and recreate the slot", c.Slot)
	}
	detail := fmt.Sprintf("%q physical, wal_status %s, restart_lsn %s", c.Slot, slot.WALStatus, slot.RestartLSN)
	if slot.ActivePID != 0 {
		detail += fmt.Sprintf(", streamed by PID %d", slot.ActivePID)
	}
	add("slot", err, detail)
}

// checkBucket writes a probe object with put-if-absent beside the archive,
// writes it again and requires the second write to be refused (a store
// that ignores If-None-Match would overwrite archived WAL silently), and
// deletes it.
func checkBucket(ctx context.Context, c *config) error {
	sink, prefix, err := openSink(ctx, c)
	if err != nil {
		return err
	}
	server := c.Server
	if server == "" {
		server = "check"
	}
	layout, err := sinks.NewLayout(c.Layout, prefix, server)
	if err != nil {
		return err
	}
	nonce := make([]byte, 8)
	rand.Read(nonce)
	key := path.Join(path.Dir(layout.IdentityKey()), ".walship-check-"+hex.EncodeToString(nonce))
	body := []byte("walship check probe\n")
	if err := sink.Put(ctx, key, body, sinks.Metadata{Codec: "none"}); err != nil {
		return fmt.Errorf("cannot write to the destination: %v: grant s3:PutObject on the prefix", err)
	}
	second := sink.Put(ctx, key, body, sinks.Metadata{Codec: "none"})
	if d, ok := sink.(sinks.Deleter); ok {
		if err := d.Delete(ctx, key); err != nil {
			return fmt.Errorf("wrote a probe but cannot delete %s: %v", key, err)
		}
	}
	switch {
	case second == nil:
		return fmt.Errorf("the store overwrote %s although the upload said If-None-Match: *: it does not honour conditional writes, so archived WAL could be overwritten silently; upgrade it, or pass --s3-no-conditional-writes to check with a HEAD before each PUT", key)
	case !errors.Is(second, sinks.ErrExists):
		return fmt.Errorf("writing the probe %s a second time: %v", key, second)
	}
	return nil
}

// checkSpool confirms the spool directory is writable and has room for at
// least a few 16 MB segments.
func checkSpool(dir string) error {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return fmt.Errorf("cannot create %s: %v: fix --spool-dir or its permissions", dir, err)
	}
	f, err := os.CreateTemp(dir, ".walship-check-*")
	if err != nil {
		return fmt.Errorf("cannot write in %s: %v: fix --spool-dir or its permissions", dir, err)
	}
	f.Close()
	os.Remove(f.Name())
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err == nil {
		free := st.Bavail * uint64(st.Bsize)
		if free < 256<<20 {
			return fmt.Errorf("only %d MB free in %s: the spool needs room for the segments waiting to be archived", free>>20, dir)
		}
	}
	return nil
}
