// Package fsutil holds the file-system durability helper the spool, the
// file sink and restore share.
package fsutil

import (
	"fmt"
	"os"
)

// SyncDir fsyncs a directory, so a rename or a new file in it survives a
// crash.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open directory %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync directory %s: %w", dir, err)
	}
	return nil
}
