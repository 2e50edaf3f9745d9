package e2e

import (
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/walship/walship/internal/testenv"
)

// failsWith runs walship, expects a non-zero exit, and checks that the last
// line of its output is one "walship: ..." line holding every phrase.
func failsWith(t *testing.T, env []string, args []string, phrases ...string) string {
	t.Helper()
	out, err := runWalship(t, env, args...)
	if err == nil {
		t.Fatalf("walship %v succeeded; want a failure\n%s", args[0], out)
	}
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() == 0 {
		t.Fatalf("walship: %v, want a non-zero exit", err)
	}
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	last := lines[len(lines)-1]
	if !strings.HasPrefix(last, "walship: ") {
		t.Fatalf("last line is not walship's error line: %q (exit: %v)\n%s", last, err, out)
	}
	for _, p := range phrases {
		if !strings.Contains(last, p) {
			t.Errorf("error line %q lacks %q", last, p)
		}
	}
	if strings.Contains(last, "panic") || strings.Contains(out, "goroutine ") {
		t.Errorf("walship panicked:\n%s", out)
	}
	return out
}

func TestBadInput(t *testing.T) {
	st := newStack(t, "wal_level = logical")
	env := st.env()
	slots := func() string {
		return st.pg.QueryString(`SELECT coalesce(string_agg(slot_name, ','), '') FROM pg_replication_slots`)
	}
	// args builds a run command line with one flag replaced.
	args := func(replace ...string) []string {
		a := st.args("run", "--log-level", "error")
		for i := 0; i+1 < len(replace); i += 2 {
			for j := range a {
				if a[j] == replace[i] {
					a[j+1] = replace[i+1]
				}
			}
		}
		return a
	}

	t.Run("PostgreSQLUnreachable", func(t *testing.T) {
		port := strconv.Itoa(testenv.FreePort(t))
		failsWith(t, env, args("--pg", "postgres://postgres@127.0.0.1:"+port+"/postgres"),
			"cannot reach PostgreSQL at 127.0.0.1:"+port, "check --pg")
	})
	t.Run("WrongPassword", func(t *testing.T) {
		st.pg.Exec(`CREATE ROLE pwuser LOGIN REPLICATION PASSWORD 'right-secret-1'`)
		out := failsWith(t, env, args("--pg", "postgres://pwuser:wrong-secret-2@127.0.0.1:"+strconv.Itoa(st.pg.Port)+"/postgres"),
			`password authentication failed for user "pwuser"`, ".pgpass")
		if strings.Contains(out, "wrong-secret-2") {
			t.Errorf("the password appears in walship's output:\n%s", out)
		}
	})
	t.Run("NoReplicationPrivilege", func(t *testing.T) {
		st.pg.Exec(`CREATE ROLE norep LOGIN`)
		failsWith(t, env, args("--pg", st.pg.URL("norep")), `role "norep" may not open a replication connection`, "ALTER ROLE norep REPLICATION")
	})
	t.Run("WALLevelMinimal", func(t *testing.T) {
		min := testenv.StartPostgres(t, testenv.PGOptions{Conf: []string{"wal_level = minimal", "max_wal_senders = 0"}})
		failsWith(t, env, args("--pg", min.URL("postgres")), "accepts no replication connection", "wal_level = replica")
	})
	t.Run("SlotMissing", func(t *testing.T) {
		failsWith(t, env, args(), `replication slot "walship" does not exist`, "--create-slot")
	})
	t.Run("MalformedDest", func(t *testing.T) {
		failsWith(t, env, args("--dest", "ftp://somewhere/x"), "malformed --dest", "s3://bucket/prefix")
		failsWith(t, env, args("--dest", "backups/relative"), "malformed --dest")
	})
	t.Run("BucketMissing", func(t *testing.T) {
		failsWith(t, env, args("--dest", "s3://no-such-bucket/x"), `s3 bucket "no-such-bucket"`, "does not exist", "create it")
	})
	t.Run("NATSUnreachable", func(t *testing.T) {
		failsWith(t, env, args("--nats", "nats://127.0.0.1:"+strconv.Itoa(testenv.FreePort(t))), "cannot reach NATS", "--nats")
	})
	// None of the failures so far may leave a slot behind.
	if s := slots(); s != "" {
		t.Fatalf("failed runs left replication slots behind: %s", s)
	}
	t.Run("LogicalSlot", func(t *testing.T) {
		st.pg.Exec(`SELECT pg_create_logical_replication_slot('walship', 'test_decoding')`)
		defer st.pg.Exec(`SELECT pg_drop_replication_slot('walship')`)
		failsWith(t, env, args(), `replication slot "walship" is a logical slot`, "physical")
	})
	t.Run("SlotActive", func(t *testing.T) {
		if out, err := runWalship(t, env, "slot", "create", "--pg", st.pg.URL("postgres")); err != nil {
			t.Fatalf("slot create: %v\n%s", err, out)
		}
		dir := t.TempDir()
		recv := exec.Command(testenv.PGBinDir(t)+"/pg_receivewal", "-h", "127.0.0.1", "-p", strconv.Itoa(st.pg.Port),
			"-U", "postgres", "-S", "walship", "-D", dir, "--no-loop")
		if err := recv.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { recv.Process.Kill(); recv.Wait() }()
		waitFor(t, 20*time.Second, "pg_receivewal to hold the slot", func() bool {
			return st.pg.QueryString(`SELECT active::text FROM pg_replication_slots WHERE slot_name='walship'`) == "true"
		})
		failsWith(t, env, args(), `replication slot "walship"`, "is active", "another walship receiver or pg_receivewal")
	})

	// After all that, a correct run works: the failures left nothing behind.
	waitFor(t, 20*time.Second, "the slot to be released", func() bool {
		return st.pg.QueryString(`SELECT active::text FROM pg_replication_slots WHERE slot_name='walship'`) == "false"
	})
	w := startWalship(t, env, st.args("run")...)
	waitFor(t, 30*time.Second, "streaming", func() bool { return st.walsenderPID() != "" })
	end := st.writeSegments(2)
	waitFor(t, 60*time.Second, "archiving", func() bool { return st.replFlush() >= end })
	if err := w.stop(t); err != nil {
		t.Fatalf("walship exit: %v", err)
	}
}
