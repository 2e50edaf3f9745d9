package retention

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/walship/walship/pipeline/backup"
)

// A start marker under a directory that is not a backup ID (a newer
// walship's backup in progress) also makes prune refuse, naming it.
func TestPruneRefusesMarkerUnderUnknownID(t *testing.T) {
	ctx := context.Background()
	fs, layout := reviewBucket(t, 1, 20)
	base := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
	reviewBackup(t, fs, layout, 3, base, false)
	odd := layout.BackupPrefix() + "20261101T010000.250Z/" + backup.StartedFile
	put(t, fs, odd, []byte(`{"v": 2}`))
	// Other objects that are not a backup's stay ignored.
	put(t, fs, layout.BackupPrefix()+"README.txt", []byte("notes"))
	st, err := Scan(ctx, fs, layout, Options{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = NewPlan(st, Policy{Keep: 1, IncompleteAfter: time.Hour, Now: base.Add(3 * time.Hour)})
	if err == nil || !strings.Contains(err.Error(), odd) {
		t.Fatalf("want a refusal naming %s, got %v", odd, err)
	}
	if len(st.Unreadable) != 1 {
		t.Errorf("unreadable = %v, want only %s", st.Unreadable, odd)
	}
}

// --keep 1 with the newest backup broken keeps it (not counted) and the
// newest restorable one, says which is broken and where its WAL stops,
// and deletes the older ones.
func TestPruneKeepDoesNotCountBroken(t *testing.T) {
	ctx := context.Background()
	fs, layout := reviewBucket(t, 1, 20, 14)
	base := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
	old := reviewBackup(t, fs, layout, 3, base, false)
	good := reviewBackup(t, fs, layout, 8, base.Add(time.Hour), false)
	bad := reviewBackup(t, fs, layout, 14, base.Add(2*time.Hour), false)
	st, err := Scan(ctx, fs, layout, Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []Policy{
		{Keep: 1, IncompleteAfter: time.Hour, Now: base.Add(3 * time.Hour)},
		{KeepWithin: 30 * time.Minute, IncompleteAfter: time.Hour, Now: base.Add(3 * time.Hour)},
	} {
		plan, err := NewPlan(st, p)
		if err != nil {
			t.Fatal(err)
		}
		var kept, deleted []string
		for _, b := range plan.Keep {
			kept = append(kept, b.ID)
		}
		for _, b := range plan.Delete {
			deleted = append(deleted, b.ID)
		}
		if strings.Join(kept, ",") != good+","+bad || strings.Join(deleted, ",") != old {
			t.Errorf("%+v: kept %v, deleted %v; want kept %s,%s, deleted %s", p, kept, deleted, good, bad, old)
		}
		if len(plan.Warnings) != 1 || !strings.Contains(plan.Warnings[0], bad) || !strings.Contains(plan.Warnings[0], "00000001000000000000000E") {
			t.Errorf("warnings %q: want one naming %s and its missing segment", plan.Warnings, bad)
		}
	}
}

// An end time in the future is warned about, and the age of the newest
// backup never goes negative: the bucket's store time of its catalogue
// stands in.
func TestFutureEndTime(t *testing.T) {
	ctx := context.Background()
	fs, layout := reviewBucket(t, 1, 20)
	now := time.Now().UTC().Truncate(time.Second)
	reviewBackup(t, fs, layout, 3, now.Add(-5*time.Hour), false)
	ahead := reviewBackup(t, fs, layout, 8, now.Add(48*time.Hour), false)
	st, err := Scan(ctx, fs, layout, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if f := st.Future(now); len(f) != 1 || f[0].ID != ahead {
		t.Fatalf("future = %v, want %s", f, ahead)
	}
	plan, err := NewPlan(st, Policy{Keep: 5, IncompleteAfter: time.Hour, Now: now})
	if err != nil {
		t.Fatal(err)
	}
	if len(plan.Warnings) != 1 || !strings.Contains(plan.Warnings[0], ahead) || !strings.Contains(plan.Warnings[0], "runs ahead") {
		t.Errorf("warnings %q", plan.Warnings)
	}
	s := st.Summarize()
	if !s.Latest.After(now) {
		t.Fatalf("latest %s: want the future end time", s.Latest)
	}
	// The file sink's store time is the catalogue file's mtime: just now.
	if age := s.Age(now.Add(time.Minute)); age < 0 || age > 2*time.Minute {
		t.Errorf("age %s, want about a minute (since the catalogue was stored)", age)
	}
	s.LatestStored = time.Time{}
	if age := s.Age(now); age != 0 {
		t.Errorf("age %s without a store time, want 0", age)
	}
}
