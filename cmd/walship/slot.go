package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"path"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/receiver"
	"github.com/walship/walship/sinks"
)

func cmdSlot(ctx context.Context, args []string, stdout io.Writer) error {
	if len(args) == 0 || (args[0] != "create" && args[0] != "drop") {
		return fmt.Errorf("%w: use 'walship slot create' or 'walship slot drop'", errUsage)
	}
	action := args[0]
	groups := gPG | gSlot | gCommon
	if action == "create" {
		groups |= gSink
	}
	c := &config{}
	fs := newFlagSet("slot "+action, c, groups)
	recreate := false
	if action == "create" {
		fs.BoolVar(&recreate, "recreate", false, "replace a slot PostgreSQL invalidated, recording the archive gap in --dest")
		fs.StringVar(&c.Server, "server", "", "server name, for the gap record (default pg-<system identifier>)")
	}
	rest, err := parse(fs, args[1:])
	if err != nil {
		return err
	}
	if len(rest) > 0 {
		return fmt.Errorf("%w: unexpected argument %q", errUsage, rest[0])
	}
	if err := c.validate(gPG); err != nil {
		return err
	}
	cfg, err := receiver.ConnConfig(c.PG, c.AppName, "true")
	if err != nil {
		return err
	}
	conn, err := receiver.Connect(ctx, cfg)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	switch {
	case action == "drop":
		if err := receiver.DropSlot(ctx, conn, c.Slot, c.IfExists); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "replication slot %q dropped\n", c.Slot)
		return nil
	case recreate:
		return recreateSlot(ctx, c, stdout)
	}
	if err := receiver.CreateSlot(ctx, conn, c.Slot, c.IfNotExists); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "replication slot %q ready\n", c.Slot)
	return nil
}

// gapRecord is the marker `slot create --recreate` leaves in the archive.
type gapRecord struct {
	SystemID      string    `json:"system_id"`
	Server        string    `json:"server"`
	Slot          string    `json:"slot"`
	WALStatus     string    `json:"wal_status_before"`
	RecreatedAt   time.Time `json:"recreated_at"`
	ResumesAt     string    `json:"archive_resumes_at"`
	ResumesAtFile string    `json:"archive_resumes_at_segment"`
	Note          string    `json:"note"`
}

// recreateSlot replaces an invalidated slot and records, in the archive,
// that WAL before the new slot's start may be missing. It refuses to touch
// a healthy slot: recreating one would open a gap silently.
func recreateSlot(ctx context.Context, c *config, stdout io.Writer) error {
	if c.Dest == "" {
		return fmt.Errorf("%w: --recreate needs --dest, where the gap is recorded", errUsage)
	}
	sqlCfg, _ := receiver.ConnConfig(c.PG, c.AppName, "")
	sql, err := receiver.Connect(ctx, sqlCfg)
	if err != nil {
		return err
	}
	defer sql.Close(context.Background())
	slot, err := receiver.QuerySlot(ctx, sql, c.Slot)
	if err != nil {
		return err
	}
	if slot.Exists && slot.WALStatus != "lost" && slot.RestartLSN != 0 {
		return fmt.Errorf("replication slot %q is healthy (wal_status = %s): --recreate only replaces an invalidated slot", c.Slot, slot.WALStatus)
	}
	if slot.ActivePID != 0 {
		return fmt.Errorf("replication slot %q is in use by PID %d: stop walship first", c.Slot, slot.ActivePID)
	}
	replCfg, _ := receiver.ConnConfig(c.PG, c.AppName, "true")
	conn, err := receiver.Connect(ctx, replCfg)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	id, err := pglogrepl.IdentifySystem(ctx, conn)
	if err != nil {
		return fmt.Errorf("identify system: %w", err)
	}
	size, err := receiver.SegmentSizeOf(ctx, conn)
	if err != nil {
		return err
	}
	server := c.Server
	if server == "" {
		server = "pg-" + id.SystemID
	}
	sink, prefix, err := openSink(ctx, c)
	if err != nil {
		return err
	}
	layout, err := sinks.NewLayout(c.Layout, prefix, server)
	if err != nil {
		return fmt.Errorf("%w: --%v", errUsage, err)
	}
	if slot.Exists {
		if err := receiver.DropSlot(ctx, conn, c.Slot, true); err != nil {
			return err
		}
	}
	if err := receiver.CreateSlot(ctx, conn, c.Slot, false); err != nil {
		return err
	}
	fresh, err := receiver.QuerySlot(ctx, sql, c.Slot)
	if err != nil {
		return err
	}
	seg := pipeline.SegmentOf(uint32(id.Timeline), fresh.RestartLSN, size)
	rec := gapRecord{
		SystemID: id.SystemID, Server: server, Slot: c.Slot, WALStatus: slot.WALStatus, RecreatedAt: time.Now().UTC(),
		ResumesAt: fresh.RestartLSN.String(), ResumesAtFile: seg.Name(size),
		Note: "PostgreSQL invalidated the slot: WAL between the last archived segment and this position may be missing. Restores need a base backup taken after it.",
	}
	body, _ := json.MarshalIndent(rec, "", "  ")
	key := path.Join(path.Dir(strings.TrimSuffix(layout.WALPrefix(), "/")), "walship-gaps", seg.Name(size)+".json")
	if err := sink.Put(ctx, key, append(body, '\n'), sinks.Metadata{SystemID: id.SystemID, Codec: "none", RawSize: int64(len(body) + 1)}); err != nil {
		return fmt.Errorf("slot recreated, but recording the gap failed: %v: record it by hand", err)
	}
	fmt.Fprintf(stdout, "replication slot %q recreated at %s; the archive has a gap before segment %s, recorded in %s; take a new base backup\n",
		c.Slot, fresh.RestartLSN, seg.Name(size), key)
	return nil
}
