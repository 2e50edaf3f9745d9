package main

import "fmt"

// backupList is a placeholder so this branch builds: `walship backup
// list` belongs to the retention work, whose file defines the real
// backupList. Delete this file when merging it.
func backupList(args []string) error {
	return fmt.Errorf("%w: 'walship backup list' is not part of this build", errUsage)
}
