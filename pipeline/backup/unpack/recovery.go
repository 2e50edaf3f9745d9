package unpack

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/walship/walship/internal/fsutil"
)

// WriteRecovery makes a restored data directory recover from the archive:
// it appends settings (postgresql.conf lines) to postgresql.auto.conf,
// where they override what the backup's copy holds, and creates
// recovery.signal. Both are fsynced.
func WriteRecovery(dir, id string, settings []string) error {
	path := filepath.Join(dir, "postgresql.auto.conf")
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("recovery settings: %w", err)
	}
	text := fmt.Sprintf("\n# walship restore of backup %s, %s\n%s\n", id, time.Now().UTC().Format(time.RFC3339), strings.Join(settings, "\n"))
	_, err = f.WriteString(text)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("recovery settings %s: %w", path, err)
	}
	if err := fsutil.WriteFile(filepath.Join(dir, "recovery.signal"), nil, 0o600); err != nil {
		return fmt.Errorf("recovery.signal: %w", err)
	}
	return fsutil.SyncDir(dir)
}
