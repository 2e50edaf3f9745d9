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
// postgresql.auto.conf.
func recoveryKey(key string) bool {
	key = strings.ToLower(key)
	return key == "restore_command" || key == "recovery_end_command" || key == "archive_cleanup_command" ||
		key == "recovery_target" || strings.HasPrefix(key, "recovery_target_")
}

// WriteRecovery makes a restored data directory recover from the archive:
// in postgresql.auto.conf it comments out the recovery settings the
// backup's copy holds and appends settings (postgresql.conf lines), then
// creates recovery.signal. Both are written through a temporary file,
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
		key, _, ok := strings.Cut(line, "=")
		if ok && recoveryKey(strings.TrimSpace(key)) {
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
