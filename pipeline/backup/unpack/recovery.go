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

// WriteRecovery makes a restored data directory recover from the archive:
// in postgresql.auto.conf it comments out the recovery and standby
// settings the backup's copy holds (recoveryKey) and appends settings
// (postgresql.conf lines), then creates recovery.signal (and never
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
	fmt.Fprintf(&b, "# walship restore of backup %s, %s\n%s\n", id, time.Now().UTC().Format(time.RFC3339), strings.Join(settings, "\n"))
	if err := fsutil.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		return fmt.Errorf("recovery settings %s: %w", path, err)
	}
	if err := fsutil.WriteFile(filepath.Join(dir, "recovery.signal"), nil, 0o600); err != nil {
		return fmt.Errorf("recovery.signal: %w", err)
	}
	return fsutil.SyncDir(dir)
}
