package retention

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/backup/retention/retentiontest"
	"github.com/walship/walship/sinks"
	"github.com/walship/walship/sinks/file"
)

// bucket builds a barman-cloud bucket on the file sink from WAL file
// names ("000000010000000000000003", "....partial", "2.history=<body>",
// "range:<segment>:<from>-<to>") and one backup.
func bucket(t *testing.T, files []string, tli, endTLI uint32, start, end pipeline.LSN) (*file.Sink, sinks.Layout) {
	t.Helper()
	s, err := file.New(fastDir(t))
	if err != nil {
		t.Fatal(err)
	}
	l := sinks.BarmanCloud{Prefix: "p", Server: "db"}
	put(t, s, l.IdentityKey(), sinks.Identity{SystemID: "7", SegmentSize: uint64(seg16), Server: "db"}.Body())
	for _, f := range files {
		switch {
		case strings.Contains(f, ".history="):
			name, body, _ := strings.Cut(f, "=")
			tl := name[:len(name)-len(".history")]
			put(t, s, l.Key(strings.Repeat("0", 8-len(tl))+tl+".history", ""), []byte(body))
		case strings.HasPrefix(f, "range:"):
			p := strings.Split(f, ":")
			var from, to uint64
			fromTo := strings.Split(p[2], "-")
			from, to = hex(t, fromTo[0]), hex(t, fromTo[1])
			put(t, s, l.RangeKey(p[1], from, to, ".zst"), []byte("r"))
		default:
			put(t, s, l.Key(f, ".zst"), []byte(f))
		}
	}
	now := time.Now().UTC().Truncate(time.Second)
	if _, err := retentiontest.Write(context.Background(), s, l, retentiontest.Spec{Server: "db", SystemID: "7", SegSize: uint64(seg16),
		Timeline: tli, EndTimeline: endTLI, StartLSN: start, EndLSN: end, StartTime: now.Add(-time.Hour), EndTime: now}); err != nil {
		t.Fatal(err)
	}
	return s, l
}

func hex(t *testing.T, s string) uint64 {
	var v uint64
	for _, c := range s {
		v = v*16 + uint64(strings.IndexRune("0123456789ABCDEF", c))
	}
	return v
}

// seg16 is the default WAL segment size, which makes LSNs easy to read.
const seg16 = pipeline.SegmentSize(16 << 20)

func TestWindow(t *testing.T) {
	for _, tc := range []struct {
		name        string
		files       []string
		tli, endTLI uint32
		start, end  pipeline.LSN
		want        Window
	}{
		{name: "to the last segment", files: []string{"000000010000000000000002", "000000010000000000000003", "000000010000000000000004"},
			tli: 1, endTLI: 1, start: 0x2000028, end: 0x3000100, want: Window{EndLSN: 0x5000000, Timeline: 1}},
		{name: "into ranges of the segment being written", files: []string{"000000010000000000000002", "range:000000010000000000000003:00000000-00001000", "range:000000010000000000000003:00001000-00004000"},
			tli: 1, endTLI: 1, start: 0x2000028, end: 0x2000100, want: Window{EndLSN: 0x3004000, Timeline: 1}},
		{name: "cut by a gap", files: []string{"000000010000000000000002", "000000010000000000000003", "000000010000000000000005"},
			tli: 1, endTLI: 1, start: 0x2000028, end: 0x2000100, want: Window{EndLSN: 0x4000000, Timeline: 1, Gap: true, GapAt: "000000010000000000000004"}},
		{name: "across a timeline switch", files: []string{"000000010000000000000002", "000000010000000000000003.partial", "00000002.history=1\t0/3000200\tx\n",
			"000000020000000000000003", "000000020000000000000004"},
			tli: 1, endTLI: 1, start: 0x2000028, end: 0x2000100, want: Window{EndLSN: 0x5000000, Timeline: 2}},
		{name: "a branch before the backup is not followed", files: []string{"000000010000000000000002", "000000010000000000000003", "00000002.history=1\t0/1000200\tx\n",
			"000000020000000000000004"},
			tli: 1, endTLI: 1, start: 0x2000028, end: 0x2000100, want: Window{EndLSN: 0x4000000, Timeline: 1}},
		{name: "the backup's own WAL missing", files: []string{"000000010000000000000002", "000000010000000000000004"},
			tli: 1, endTLI: 1, start: 0x2000028, end: 0x3000100, want: Window{EndLSN: 0x3000000, Timeline: 1, Gap: true, GapAt: "000000010000000000000003", Broken: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, l := bucket(t, tc.files, tc.tli, tc.endTLI, tc.start, tc.end)
			st, err := Scan(context.Background(), s, l, Options{})
			if err != nil {
				t.Fatal(err)
			}
			if len(st.Backups) != 1 || !st.Backups[0].Complete || len(st.HistoryErrors) > 0 {
				t.Fatalf("backups %+v, history errors %v", st.Backups, st.HistoryErrors)
			}
			got := *st.Backups[0].Window
			if got.EndTime.IsZero() {
				t.Error("no end time")
			}
			got.EndTime = time.Time{}
			if got != tc.want {
				t.Errorf("window %+v, want %+v", got, tc.want)
			}
		})
	}
}

// Another tool's catalogue that does not parse stops a prune, naming it.
func TestForeignUnreadableRefuses(t *testing.T) {
	s, _ := bucket(t, []string{"000000010000000000000002"}, 1, 1, 0x2000028, 0x2000100)
	put(t, s, "p/db/base/20261101T000000/backup.info", []byte("status=DONE\n"))
	st, err := Scan(context.Background(), s, sinks.BarmanCloud{Prefix: "p", Server: "db"}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = NewPlan(st, Policy{Keep: 1, IncompleteAfter: time.Hour, Now: time.Now()})
	if err == nil || !strings.Contains(err.Error(), "p/db/base/20261101T000000/backup.info") {
		t.Fatalf("plan: %v, want a refusal naming the backup.info", err)
	}
}

func TestParseForeign(t *testing.T) {
	if f, err := parseWalGSentinel([]byte(`{"LSN": 50331688, "Timeline": 2, "FinishLSN": 50332000}`)); err != nil || f.StartLSN != 50331688 || f.Timeline != 2 {
		t.Errorf("wal-g numeric: %+v %v", f, err)
	}
	if f, err := parseWalGSentinel([]byte(`{"LSN": "0/3000028"}`)); err != nil || f.StartLSN != 0x3000028 {
		t.Errorf("wal-g string: %+v %v", f, err)
	}
	if _, err := parseWalGSentinel([]byte(`{"Timeline": 2}`)); err == nil {
		t.Error("wal-g sentinel without LSN accepted")
	}
	if f, err := parseBarmanInfo([]byte("begin_wal=000000020000000000000005\nstatus=DONE\n"), seg16); err != nil || f.StartLSN != 0x5000000 || f.Timeline != 2 {
		t.Errorf("barman begin_wal: %+v %v", f, err)
	}
	if f, err := parseBarmanInfo([]byte("begin_xlog=0/5000028\ntimeline=1\n"), seg16); err != nil || f.StartLSN != 0x5000028 {
		t.Errorf("barman begin_xlog: %+v %v", f, err)
	}
	if f, err := parseBarmanInfo([]byte("status=FAILED\n"), testSeg); err != nil || f.StartLSN != 0 {
		t.Errorf("barman failed: %+v %v", f, err)
	}
}

func TestPolicyValidate(t *testing.T) {
	if err := (Policy{IncompleteAfter: time.Hour}).Validate(); err == nil || !strings.Contains(err.Error(), "--keep") {
		t.Errorf("no rule: %v", err)
	}
	if err := (Policy{Keep: 1, IncompleteAfter: time.Hour}).Validate(); err != nil {
		t.Error(err)
	}
}
