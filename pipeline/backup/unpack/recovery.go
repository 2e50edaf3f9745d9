package unpack

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/walship/walship/internal/fsutil"
)

// recoveryKey reports whether a postgresql.conf key is one restore sets or
// that would steer this recovery: a backup of a server that was itself
// restored carries its old restore_command and targets in
// postgresql.auto.conf, and a backup taken on a standby carries the
// standby's primary_conninfo and primary_slot_name, with which the
// restored server would stream from the production primary on that
// standby's slot.
func recoveryKey(key string) bool {
	key = strings.ToLower(key)
	return key == "restore_command" || key == "recovery_end_command" || key == "archive_cleanup_command" ||
		key == "recovery_target" || strings.HasPrefix(key, "recovery_target_") ||
		key == "primary_conninfo" || key == "primary_slot_name"
}

// confKey is the parameter name a postgresql.conf line sets ("" for a
// comment or blank line): the name ends at '=', a blank or a quote, since
// PostgreSQL also reads `name value` without '='.
func confKey(line string) string {
	line = strings.TrimLeft(line, " \t")
	end := strings.IndexFunc(line, func(r rune) bool {
		return !(r == '_' || r == '.' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9')
	})
	if end < 0 {
		end = len(line)
	}
	return line[:end]
}

// targetDefaults are the recovery target settings a restore always sets in
// postgresql.auto.conf, with the value each gets when settings do not
// name it: no target, PostgreSQL's default action, timeline and
// inclusiveness.
var targetDefaults = []struct{ key, value string }{
	{"recovery_target", "''"},
	{"recovery_target_time", "''"},
	{"recovery_target_xid", "''"},
	{"recovery_target_name", "''"},
	{"recovery_target_lsn", "''"},
	{"recovery_target_action", "'pause'"},
	{"recovery_target_timeline", "'latest'"},
	{"recovery_target_inclusive", "'on'"},
}

// neutralTargets are the lines that override every recovery target
// setting that settings do not set. The backup's postgresql.conf (or a
// file it includes) may hold the targets of an earlier PITR of the
// server it was taken from, where PostgreSQL ignores them once promoted
// but a restore would stop at them (and promote there). PostgreSQL reads
// postgresql.auto.conf after postgresql.conf and applies only the last
// setting of a key, so these win. They come before settings: PostgreSQL
// applies the settings in file order and refuses ("multiple recovery
// targets specified") to clear one kind of target after another is set.
func neutralTargets(settings []string) []string {
	set := map[string]bool{}
	for _, s := range settings {
		set[strings.ToLower(confKey(s))] = true
	}
	out := []string{"# recovery targets of postgresql.conf or its includes do not apply to this restore:"}
	for _, d := range targetDefaults {
		if !set[d.key] {
			out = append(out, d.key+" = "+d.value)
		}
	}
	return out
}

// WriteRecovery makes a restored data directory recover from the archive:
// in postgresql.auto.conf it comments out the recovery and standby
// settings the backup's copy holds (recoveryKey), sets every recovery
// target setting that settings do not set to no target or PostgreSQL's
// default (neutralTargets: this overrides the backup's postgresql.conf)
// and appends settings (postgresql.conf lines), then creates recovery.signal (and never
// standby.signal: Restore does not write the backup's). Both are written through a temporary file,
// fsynced.
func WriteRecovery(dir, id string, settings []string) error {
	path := filepath.Join(dir, "postgresql.auto.conf")
	old, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("recovery settings: %w", err)
	}
	var b strings.Builder
	for _, line := range strings.SplitAfter(string(old), "\n") {
		if line == "" {
			continue
		}
		if recoveryKey(confKey(line)) {
			b.WriteString("# (walship restore) ")
		}
		b.WriteString(line)
	}
	if !strings.HasSuffix(b.String(), "\n") && b.Len() > 0 {
		b.WriteByte('\n')
	}
	fmt.Fprintf(&b, "# walship restore of backup %s, %s\n", id, time.Now().UTC().Format(time.RFC3339))
	for _, line := range neutralTargets(settings) {
		b.WriteString(line + "\n")
	}
	b.WriteString(strings.Join(settings, "\n") + "\n")
	if err := fsutil.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		return fmt.Errorf("recovery settings %s: %w", path, err)
	}
	if err := fsutil.WriteFile(filepath.Join(dir, "recovery.signal"), nil, 0o600); err != nil {
		return fmt.Errorf("recovery.signal: %w", err)
	}
	return fsutil.SyncDir(dir)
}
