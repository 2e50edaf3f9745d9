package unpack

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The recovery target settings a restore does not set are overridden with
// no target, before the restore's own settings: PostgreSQL applies them in
// file order and refuses to clear one kind of target once another is set.
func TestWriteRecoveryNeutralTargetsBeforeSettings(t *testing.T) {
	dir := t.TempDir()
	old := "recovery_target_time = '2026-06-01 10:00:00+00'\nwork_mem = '8MB'\n"
	if err := os.WriteFile(filepath.Join(dir, "postgresql.auto.conf"), []byte(old), 0o600); err != nil {
		t.Fatal(err)
	}
	settings := []string{"restore_command = 'walship fetch %f %p'", "recovery_target_lsn = '0/3000000'", "recovery_target_action = 'promote'"}
	if err := WriteRecovery(dir, "20261129T210000Z", settings); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(dir, "postgresql.auto.conf"))
	if err != nil {
		t.Fatal(err)
	}
	var keys []string // the keys in effect, in file order
	last := map[string]string{}
	for _, line := range strings.Split(string(data), "\n") {
		if k := confKey(line); k != "" {
			keys = append(keys, k)
			last[k] = strings.TrimSpace(line[strings.Index(line, "=")+1:])
		}
	}
	want := map[string]string{
		"work_mem": "'8MB'", "restore_command": "'walship fetch %f %p'",
		"recovery_target": "''", "recovery_target_time": "''", "recovery_target_xid": "''", "recovery_target_name": "''",
		"recovery_target_lsn": "'0/3000000'", "recovery_target_action": "'promote'",
		"recovery_target_timeline": "'latest'", "recovery_target_inclusive": "'on'",
	}
	for k, v := range want {
		if last[k] != v {
			t.Errorf("%s = %s, want %s\n%s", k, last[k], v, data)
		}
	}
	seen := map[string]int{}
	for i, k := range keys {
		if seen[k] != 0 {
			t.Errorf("%s set twice\n%s", k, data)
		}
		seen[k] = i + 1
	}
	for _, k := range []string{"recovery_target", "recovery_target_time", "recovery_target_xid", "recovery_target_name"} {
		if seen[k] > seen["recovery_target_lsn"] {
			t.Errorf("%s = '' comes after recovery_target_lsn: PostgreSQL would refuse (multiple recovery targets)\n%s", k, data)
		}
	}
}
