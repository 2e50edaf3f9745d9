package main

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/backup/retention/retentiontest"
	"github.com/walship/walship/sinks"
	filesink "github.com/walship/walship/sinks/file"
)

func TestParseDays(t *testing.T) {
	for in, want := range map[string]time.Duration{"7d": 7 * 24 * time.Hour, "0.5d": 12 * time.Hour, "2w": 14 * 24 * time.Hour, "36h": 36 * time.Hour} {
		if got, err := parseDays(in); err != nil || got != want {
			t.Errorf("%s: %v %v, want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"7x", "-1d", "d", ""} {
		if _, err := parseDays(in); err == nil {
			t.Errorf("%q accepted", in)
		}
	}
}

// prune and backup list on a file destination: bad input is one usage
// line; --dry-run deletes nothing; prune deletes the old backup.
func TestPruneCommand(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s, err := filesink.New(dir)
	if err != nil {
		t.Fatal(err)
	}
	l := sinks.BarmanCloud{Server: "db"}
	if err := s.Put(ctx, l.IdentityKey(), sinks.Identity{SystemID: "7", SegmentSize: 1 << 20, Server: "db"}.Body(), sinks.Metadata{}); err != nil {
		t.Fatal(err)
	}
	for no := uint64(1); no <= 6; no++ {
		name := pipeline.Segment{Timeline: 1, No: no}.Name(1 << 20)
		if err := s.Put(ctx, l.Key(name, ".zst"), []byte(name), sinks.Metadata{}); err != nil {
			t.Fatal(err)
		}
	}
	now := time.Now().UTC().Truncate(time.Second)
	var ids []string
	for i, start := range []pipeline.LSN{0x200028, 0x400028} {
		end := now.Add(-time.Duration(2-i) * time.Hour)
		id, err := retentiontest.Write(ctx, s, l, retentiontest.Spec{Server: "db", SystemID: "7", SegSize: 1 << 20, Timeline: 1,
			StartLSN: start, EndLSN: start + 0x100, StartTime: end.Add(-time.Minute), EndTime: end})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	dest := []string{"--dest", "file://" + dir, "--server", "db"}
	var out bytes.Buffer
	if err := cmdPrune(ctx, dest, &out); !errors.Is(err, errUsage) || !strings.Contains(err.Error(), "--keep") {
		t.Errorf("prune without a policy: %v", err)
	}
	out.Reset()
	if err := cmdPrune(ctx, append(dest, "--keep", "1", "--dry-run"), &out); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "would delete backup "+ids[0]) || !strings.Contains(out.String(), "would delete 3 objects") {
		t.Errorf("dry run:\n%s", out.String())
	}
	if _, err := s.Head(ctx, l.Key("000000010000000000000001", ".zst")); err != nil {
		t.Fatalf("dry run deleted WAL: %v", err)
	}
	out.Reset()
	if err := cmdPrune(ctx, append(dest, "--keep", "1"), &out); err != nil {
		t.Fatal(err)
	}
	for no, want := range map[uint64]bool{1: false, 3: false, 4: true, 6: true} {
		_, err := s.Head(ctx, l.Key(pipeline.Segment{Timeline: 1, No: no}.Name(1<<20), ".zst"))
		if (err == nil) != want {
			t.Errorf("segment %d present %v after prune --keep 1, want %v\n%s", no, err == nil, want, out.String())
		}
	}
	out.Reset()
	if err := backupList(ctx, append(dest, "--json"), &out); err != nil || !strings.Contains(out.String(), ids[1]) || strings.Contains(out.String(), ids[0]) {
		t.Errorf("backup list --json: %v\n%s", err, out.String())
	}
	// A backup without a catalogue is listed only with --all, as such.
	inc, err := retentiontest.Write(ctx, s, l, retentiontest.Spec{Server: "db", SystemID: "7", SegSize: 1 << 20, Timeline: 1,
		StartLSN: 0x500028, StartTime: now.Add(-time.Hour), Incomplete: true})
	if err != nil {
		t.Fatal(err)
	}
	out.Reset()
	if err := backupList(ctx, dest, &out); err != nil || strings.Contains(out.String(), inc) || !strings.Contains(out.String(), ids[1]) {
		t.Errorf("backup list: %v\n%s", err, out.String())
	}
	out.Reset()
	if err := backupList(ctx, append(dest, "--all"), &out); err != nil || !strings.Contains(out.String(), inc) || !strings.Contains(out.String(), "INCOMPLETE") {
		t.Errorf("backup list --all: %v\n%s", err, out.String())
	}
	t.Logf("backup list --all:\n%s", out.String())
}
