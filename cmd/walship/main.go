// Command walship streams PostgreSQL's WAL to object storage through NATS
// JetStream. See README.md for the commands and the durability contract.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/debug"
	"runtime/pprof"
	"syscall"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

const usage = `walship streams PostgreSQL WAL to object storage.

Usage: walship <command> [flags]

Commands:
  run            receiver and archivers in one process (embedded NATS unless --nats)
  receive        the receiver alone
  archive        an archiver worker pool alone
  slot create    create the physical replication slot
  slot drop      drop it
  fetch <wal> <dest>  restore_command: download, decompress, verify (with prefetch)
  restore        a base backup into an empty data directory, with restore_command and PITR targets
  verify         walk the archive: gaps per timeline, history chain, metadata (--deep: checksums)
  ls             list archived WAL per timeline
  prune          delete backups outside --keep/--keep-within and the WAL no kept backup needs
  status         positions, lags, slot, backlog, last archived segment, per server
  backup         take a base backup through the pipeline (backup list: the backups)
  check          preflight: PostgreSQL, slot, NATS, bucket, spool; one line per check
  health         probe a walship /readyz URL (container healthcheck)
  version        print the version, and those of Go, pglogrepl and NATS

Run 'walship <command> -h' for a command's flags. Every flag can also be
given as WALSHIP_<FLAG>, for example WALSHIP_PG or WALSHIP_S3_ENDPOINT.
`

func main() {
	if len(os.Args) > 1 && os.Args[1] == "fetch" {
		abortOnCrash()
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	// WALSHIP_CPU_PROFILE=<path> writes a CPU profile of the whole run, for
	// the benchmarks' "where does the time go".
	if path := os.Getenv("WALSHIP_CPU_PROFILE"); path != "" {
		if f, err := os.Create(fmt.Sprintf("%s.%d", path, os.Getpid())); err == nil {
			pprof.StartCPUProfile(f)
			defer f.Close()
		}
	}
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	pprof.StopCPUProfile()
	stop()
	os.Exit(exitCode(err, os.Stderr))
}

// abortOnCrash makes every way restore_command can die read as "abort
// recovery" to PostgreSQL, which takes any exit status up to 125 (a Go
// panic or fatal error exits 2) as "not in the archive": a panic or a
// fatal runtime error (out of memory) dies by SIGABRT instead, and
// SIGQUIT exits 255.
func abortOnCrash() {
	debug.SetTraceback("crash")
	quit := make(chan os.Signal, 1)
	signal.Notify(quit, syscall.SIGQUIT)
	go func() {
		<-quit
		fmt.Fprintln(os.Stderr, "walship: SIGQUIT: exiting 255 so that PostgreSQL aborts recovery")
		os.Exit(exitAbort)
	}()
}

func exitCode(err error, stderr io.Writer) int {
	var ee *exitError
	switch {
	case errors.As(err, &ee):
		fmt.Fprintln(stderr, "walship:", trimUsage(ee.err))
		return ee.code
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		fmt.Fprintln(stderr, "walship:", trimUsage(err))
		return 2
	default:
		fmt.Fprintln(stderr, "walship:", err)
		return 1
	}
}

func trimUsage(err error) string {
	s := err.Error()
	if p := errUsage.Error() + ": "; len(s) > len(p) && s[:len(p)] == p {
		return s[len(p):]
	}
	return s
}

// run dispatches a command line; it is main without the process around it.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return fmt.Errorf("%w: no command given", errUsage)
	}
	cmd, rest := args[0], args[1:]
	switch cmd {
	case "run":
		return cmdRun(ctx, rest, stdout)
	case "receive":
		return cmdReceive(ctx, rest, stdout)
	case "archive":
		return cmdArchive(ctx, rest, stdout)
	case "slot":
		return cmdSlot(ctx, rest, stdout)
	case "fetch":
		return cmdFetch(ctx, rest, stdout)
	case "restore":
		return cmdRestoreBackup(ctx, rest, stdout)
	case "verify":
		return cmdVerify(ctx, rest, stdout, false)
	case "ls":
		return cmdVerify(ctx, rest, stdout, true)
	case "status":
		return cmdStatus(ctx, rest, stdout)
	case "check":
		return cmdCheck(ctx, rest, stdout)
	case "prune":
		return cmdPrune(ctx, rest, stdout)
	case "backup":
		return cmdBackup(ctx, rest, stdout)
	case "health":
		return cmdHealth(ctx, rest, stdout)
	case "version", "--version", "-v":
		return cmdVersion(stdout)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	fmt.Fprint(stderr, usage)
	return fmt.Errorf("%w: unknown command %q", errUsage, cmd)
}
