package e2e

import (
	"context"
	"path"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/walship/walship/internal/testenv"
	"github.com/walship/walship/pipeline"
)

// archivedFiles maps every WAL file name in the bucket (without the
// compression extension) to its key.
func (st *stack) archivedFiles() map[string]string {
	out := map[string]string{}
	p := s3.NewListObjectsV2Paginator(st.s3.Client(), &s3.ListObjectsV2Input{
		Bucket: aws.String(st.s3.Bucket), Prefix: aws.String(st.prefix + "/" + st.server + "/wals/"),
	})
	for p.HasMorePages() {
		page, err := p.NextPage(context.Background())
		if err != nil {
			st.t.Fatal(err)
		}
		for _, o := range page.Contents {
			name := path.Base(*o.Key)
			for _, ext := range []string{".zst", ".gz", ".snappy"} {
				name = strings.TrimSuffix(name, ext)
			}
			out[name] = *o.Key
		}
	}
	return out
}

// Promotion of the standby walship streams from: walship follows it to
// timeline 2, archives 00000002.history and the timeline-1 segment that
// holds the switch point as .partial, every archived segment matches the
// promoted server's pg_wal, and point-in-time recovery through the switch
// has every row.
func TestPromotion(t *testing.T) {
	st := newStack(t)
	primary := st.pg
	primary.Exec(`CREATE TABLE ledger (id serial primary key, phase text)`)
	if err := primary.Pgbench(context.Background(), "-i", "-s", "1", "-q"); err != nil {
		t.Fatal(err)
	}
	standby := primary.StartStandby()
	st.pg = standby
	w := startWalship(t, st.env(), st.args("run", "--create-slot")...)
	waitFor(t, 30*time.Second, "streaming from the standby", func() bool { return st.walsenderPID() != "" })
	firstSeg := uint64(segSize.Start(st.slotRestart())) / uint64(segSize)
	backup := standby.BaseBackup()

	ctx, cancel := context.WithCancel(context.Background())
	bench := make(chan error, 1)
	go func() { bench <- primary.Pgbench(ctx, "-c", "2", "-T", "600", "-n") }()
	for i := 0; i < 300; i++ {
		primary.Exec(`INSERT INTO ledger (phase) VALUES ('timeline 1')`)
	}
	primary.Exec(`SELECT pg_switch_wal()`)
	waitFor(t, 30*time.Second, "the standby to replay timeline 1's rows", func() bool {
		return standby.QueryString(`SELECT count(*)::text FROM ledger`) == "300"
	})
	cancel()
	<-bench
	primary.Stop("fast")
	standby.Promote()
	waitFor(t, 30*time.Second, "promotion", func() bool { return standby.QueryString(`SELECT pg_is_in_recovery()::text`) == "false" })

	ctx, cancel = context.WithTimeout(context.Background(), 5*time.Second)
	if err := standby.Pgbench(ctx, "-c", "2", "-T", "600", "-n"); err != nil {
		t.Fatal(err)
	}
	cancel()
	for i := 0; i < 200; i++ {
		standby.Exec(`INSERT INTO ledger (phase) VALUES ('timeline 2')`)
	}
	end := st.switchWAL()
	waitFor(t, 90*time.Second, "walship to archive timeline 2", func() bool {
		return st.replFlush() >= end
	})
	if err := w.stop(t); err != nil {
		t.Fatalf("walship exit: %v", err)
	}

	switchAt, compared := st.checkPromotedArchive(t, standby, firstSeg, end)
	t.Logf("switch at %s; %d segments compared; partial and history archived", switchAt, compared)

	// Point-in-time recovery through the switch, from the archive alone.
	r := standby.Restored(backup, "restore_command = '"+st.restoreCommand("barman-cloud")+"'")
	if err := r.TryStart(120 * time.Second); err != nil {
		t.Fatalf("%v\n%s", err, r.Log())
	}
	waitPromoted(t, r)
	if got := count(r, `SELECT count(*)::text FROM ledger`); got != 500 {
		t.Errorf("recovery through the timeline switch: %d rows, want 500", got)
	}
	if got := r.QueryString(`SELECT count(*)::text FROM ledger WHERE phase = 'timeline 2'`); got != "200" {
		t.Errorf("%s rows from timeline 2, want 200", got)
	}
}

func keysOf(m map[string]string) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

func listInput(bucket, prefix string) *s3.ListObjectsV2Input {
	return &s3.ListObjectsV2Input{Bucket: aws.String(bucket), Prefix: aws.String(prefix)}
}

// checkPromotedArchive compares the archive after one promotion of the
// server walship streams from (promoted, whose pg_wal holds both
// timelines) with its pg_wal: see checkChain. It returns where timeline 2
// began and how many segments it compared.
func (st *stack) checkPromotedArchive(t *testing.T, promoted *testenv.Postgres, firstSeg uint64, end pipeline.LSN) (pipeline.LSN, int) {
	t.Helper()
	hist, err := pipeline.ParseHistory(mustRead(t, filepath.Join(promoted.WALDir(), "00000002.history")))
	if err != nil {
		t.Fatal(err)
	}
	_, switchAt, _ := pipeline.SwitchPoint(hist)
	if end <= switchAt {
		t.Fatalf("the archive was checked to %s, before the switch at %s", end, switchAt)
	}
	return switchAt, st.checkChain(t, []*testenv.Postgres{promoted, promoted}, []pipeline.LSN{switchAt}, firstSeg, end)
}
