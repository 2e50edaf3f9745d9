package main

import (
	"context"
	"io"
	"os/exec"
	"strings"
	"testing"

	"github.com/walship/walship/pipeline/backup"
)

// Bad flag combinations of `walship restore` are one line and exit 2,
// before anything connects.
func TestRestoreBackupBadFlags(t *testing.T) {
	base := []string{"restore", "--dest", "s3://b/p", "--server", "db1", "--target-dir", t.TempDir()}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"restore", "--dest", "s3://b/p", "--server", "db1", "--target-dir", "/x"}, "--backup is required"},
		{[]string{"restore", "--dest", "s3://b/p", "--server", "db1", "--backup", "latest"}, "--target-dir is required"},
		{append(base, "--backup", "yesterday"), "--backup: backup id"},
		{append(base, "--backup", "latest", "--target-name", "a", "--target-lsn", "0/1"), "at most one of"},
		{append(base, "--backup", "latest", "--target-time", "tomorrow"), "--target-time"},
		{append(base, "--backup", "latest", "--target-lsn", "zz"), "--target-lsn"},
		{append(base, "--backup", "latest", "--target-timeline", "-1"), "--target-timeline"},
		{append(base, "--backup", "latest", "--target-action", "explode", "--target-name", "a"), "--target-action"},
		{append(base, "--backup", "latest", "--target-action", "promote"), "--target-action needs a target"},
		{append(base, "--backup", "latest", "--jobs", "0"), "--jobs"},
		{append(base, "--backup", "latest", "--tablespace-mapping", "rel=/x"), "OLDDIR=NEWDIR"},
		{[]string{"restore", "--dest", "s3://b/p", "--backup", "latest", "--target-dir", "/x"}, "--server is required"},
		{append(base, "--backup", "latest", "--s3-endpoint", "http://user:secret@host"), "carries credentials"},
	} {
		var msg strings.Builder
		code := exitCode(run(context.Background(), tc.args, io.Discard, io.Discard), &msg)
		if code != 2 || !strings.Contains(msg.String(), tc.want) || strings.Count(msg.String(), "\n") != 1 || strings.Contains(msg.String(), "secret") {
			t.Errorf("%v: exit %d, %q; want 2 and one line with %q", tc.args[1:], code, msg.String(), tc.want)
		}
	}
}

// restore_command is walship fetch with the destination flags, shell- and
// conf-quoted, and never a credential.
func TestFetchCommand(t *testing.T) {
	c := &config{Dest: "s3://b/p q", Layout: "barman-cloud", Server: "db1", S3Endpoint: "https://s3.example", S3PathStyle: true,
		S3Timeout: 60e9, cryptConfig: cryptConfig{DecryptIdentity: "/keys/it's.txt"}}
	c.S3Sec.CABundle = "/ca.pem"
	cmd := fetchCommand("/usr/bin/walship", c, backup.Catalog{Codec: "gzip"}, true)
	want := `/usr/bin/walship fetch %f %p --dest 's3://b/p q' --layout barman-cloud --server db1 --s3-endpoint https://s3.example --s3-path-style --s3-ca-bundle /ca.pem --decrypt-identity '/keys/it'\''s.txt' --compression gzip --allow-partial`
	if cmd != want {
		t.Errorf("restore_command:\n%s\nwant\n%s", cmd, want)
	}
	// /bin/sh reads it back into the same words.
	out, err := exec.Command("/bin/sh", "-c", "printf '%s\\n' "+strings.TrimPrefix(cmd, "/usr/bin/walship ")).Output()
	if err != nil || !strings.Contains(string(out), "s3://b/p q\n") || !strings.Contains(string(out), "/keys/it's.txt\n") {
		t.Errorf("sh: %v\n%s", err, out)
	}
	if got := confQuote("a'b"); got != `'a''b'` {
		t.Errorf("confQuote: %s", got)
	}
	bf := &backupRestoreFlags{targetName: "rp", targetAction: "promote"}
	s := strings.Join(bf.settings(cmd, "/usr/bin/walship"), "\n")
	for _, w := range []string{"recovery_target_name = 'rp'", "recovery_target_action = 'promote'", "recovery_end_command = '/usr/bin/walship fetch --cleanup'"} {
		if !strings.Contains(s, w) {
			t.Errorf("settings lack %q:\n%s", w, s)
		}
	}
	if strings.Contains(s, "recovery_target_inclusive") || strings.Contains(s, "recovery_target_timeline") {
		t.Errorf("settings set what PostgreSQL's defaults should decide:\n%s", s)
	}
}
