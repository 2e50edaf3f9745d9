package main

import (
	"strings"
	"testing"
	"time"

	"github.com/walship/walship/pipeline/backup"
)

// pgExpand expands restore_command as PostgreSQL 15 does
// (BuildRestoreCommand): %f, %p, %r and %% are replaced, any other % is
// kept.
func pgExpand(cmd, f, p string) string {
	var b strings.Builder
	for i := 0; i < len(cmd); i++ {
		if cmd[i] == '%' && i+1 < len(cmd) {
			switch cmd[i+1] {
			case 'f':
				b.WriteString(f)
				i++
				continue
			case 'p':
				b.WriteString(p)
				i++
				continue
			case 'r':
				b.WriteString("000000010000000000000001")
				i++
				continue
			case '%':
				b.WriteByte('%')
				i++
				continue
			}
		}
		b.WriteByte(cmd[i])
	}
	return b.String()
}

// REVIEW FINDING 9
// restore_command is built with shellQuote, whose "safe" set includes '%',
// and nothing doubles a '%' in the destination, the server name or a file
// path. PostgreSQL expands %f, %p, %r and %% anywhere in restore_command,
// so an identity file such as /srv/keys%prod/age.txt (or a CA bundle,
// or the --walship-bin path, with a '%') reaches walship fetch altered: fetch
// cannot read the identity and recovery aborts at the first WAL file
// (fetch exits 255, the restore is unusable until the file is moved). Every literal '%' must be written as '%%'.
func TestReviewRestoreCommandPercent(t *testing.T) {
	c := &config{Dest: "s3://bucket/pg", Layout: "barman-cloud", Server: "db", S3Timeout: time.Minute}
	c.DecryptIdentity = "/srv/keys%prod/age.txt"
	cmd := fetchCommand("/usr/bin/walship", c, backup.Catalog{Codec: "zstd"}, true)
	got := pgExpand(cmd, "000000010000000000000003", "pg_wal/RECOVERYXLOG")
	if !strings.Contains(got, "/srv/keys%prod/age.txt") {
		t.Fatalf("restore_command %q runs as %q: the identity path is altered by PostgreSQL's %% expansion", cmd, got)
	}
}
