package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"text/tabwriter"
	"time"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/bus"
	"github.com/walship/walship/pipeline/receiver"
)

// serverStatus is one server's line in `walship status`.
type serverStatus struct {
	pipeline.ServerState
	Receiver        string    `json:"receiver"` // streaming, standby, disconnected, stale
	StateAge        float64   `json:"state_age_seconds"`
	LastArchived    string    `json:"last_archived,omitempty"`
	LastArchivedAt  time.Time `json:"last_archived_at,omitempty"`
	ArchiverBacklog *uint64   `json:"archiver_backlog,omitempty"`
	// Queued is how many of the server's events wait for (or are held by)
	// the archiver pool.
	Queued *uint64   `json:"queued_events,omitempty"`
	Slot   *slotInfo `json:"slot_state,omitempty"`
}

type slotInfo struct {
	Exists     bool   `json:"exists"`
	WALStatus  string `json:"wal_status"`
	RestartLSN string `json:"restart_lsn"`
	Active     bool   `json:"active"`
	// What pg_stat_replication says of walship's connection.
	ReplWrite string `json:"replication_write_lsn,omitempty"`
	ReplFlush string `json:"replication_flush_lsn,omitempty"`
}

func cmdStatus(ctx context.Context, args []string, stdout io.Writer) error {
	c := &config{}
	fs := newFlagSet("status", c, gPG|gNATS)
	asJSON := fs.Bool("json", false, "print as JSON")
	server := fs.String("server", "", "only this server")
	processes := fs.Bool("processes", false, "list the walship processes and what they can reach (with --json: as JSON)")
	rest, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(rest) > 0 {
		return fmt.Errorf("%w: unexpected argument %q", errUsage, rest[0])
	}
	if c.NATS == "" {
		return fmt.Errorf("%w: status needs --nats (the embedded server of 'walship run' listens on 127.0.0.1:4222)", errUsage)
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	extra, err := c.NATSSec.clientOptions(c.NATS)
	if err != nil {
		return err
	}
	snap, err := bus.ReadSnapshot(ctx, c.NATS, bus.DefaultNames(), extra...)
	if err != nil {
		return err
	}
	now := time.Now()
	if *processes {
		return printProcesses(stdout, snap.Processes, now, *asJSON)
	}
	var out []serverStatus
	sort.Slice(snap.States, func(i, j int) bool { return snap.States[i].Server < snap.States[j].Server })
	for _, st := range snap.States {
		if *server != "" && st.Server != *server {
			continue
		}
		s := serverStatus{ServerState: st, StateAge: now.Sub(st.Updated).Seconds()}
		switch {
		case s.StateAge > 60:
			s.Receiver = "stale"
		case st.Standby:
			s.Receiver = "standby"
		case st.Connected:
			s.Receiver = "streaming"
		default:
			s.Receiver = "disconnected"
		}
		if ev := snap.LastArchived[st.Server]; ev != nil {
			s.LastArchived, s.LastArchivedAt = ev.File, snap.ArchivedAt[st.Server]
		}
		if snap.BacklogKnown {
			b := snap.Backlog
			s.ArchiverBacklog = &b
			q := snap.ServerBacklog[st.Server]
			s.Queued = &q
		}
		if c.PG != "" {
			s.Slot = pgSlotInfo(ctx, c, st.Slot)
		}
		out = append(out, s)
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(out)
	}
	if len(out) == 0 {
		fmt.Fprintln(stdout, "no servers recorded in NATS yet")
	} else {
		printServerTable(stdout, out)
	}
	return printProcesses(stdout, snap.Processes, now, false)
}

func pgSlotInfo(ctx context.Context, c *config, slot string) *slotInfo {
	cfg, err := receiver.ConnConfig(c.PG, c.AppName+"-status", "")
	if err != nil {
		return nil
	}
	conn, err := receiver.Connect(ctx, cfg)
	if err != nil {
		return nil
	}
	defer conn.Close(context.Background())
	st, err := receiver.QuerySlot(ctx, conn, slot)
	if err != nil {
		return nil
	}
	info := &slotInfo{Exists: st.Exists, WALStatus: st.WALStatus, RestartLSN: st.RestartLSN.String(), Active: st.ActivePID != 0}
	res := conn.ExecParams(ctx, `SELECT write_lsn::text, flush_lsn::text FROM pg_stat_replication r
		JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = $1`, [][]byte{[]byte(slot)}, nil, nil, nil).Read()
	if res.Err == nil && len(res.Rows) == 1 {
		info.ReplWrite, info.ReplFlush = string(res.Rows[0][0]), string(res.Rows[0][1])
	}
	return info
}

// printProcesses lists the processes that recorded themselves, and what
// each cannot reach. A record not refreshed for a minute is marked stale:
// its process stopped, or cannot reach NATS.
func printProcesses(w io.Writer, ps []pipeline.ProcessState, now time.Time, asJSON bool) error {
	sort.Slice(ps, func(i, j int) bool {
		if ps[i].Role != ps[j].Role {
			return ps[i].Role < ps[j].Role
		}
		if ps[i].Host != ps[j].Host {
			return ps[i].Host < ps[j].Host
		}
		return ps[i].PID < ps[j].PID
	})
	if asJSON {
		if ps == nil {
			ps = []pipeline.ProcessState{}
		}
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(ps)
	}
	if len(ps) == 0 {
		fmt.Fprintln(w, "no walship processes recorded in NATS in the last few minutes")
		return nil
	}
	fmt.Fprintln(w, "processes:")
	for _, p := range ps {
		age := now.Sub(p.Updated)
		state := "ready"
		switch {
		case age > time.Minute:
			state = fmt.Sprintf("stale (record %.0fs old: stopped, or cannot reach NATS)", age.Seconds())
		case !p.Ready && p.NotReady != "":
			state = "NOT READY: " + p.NotReady
		case !p.Ready:
			state = "NOT READY"
		}
		fmt.Fprintf(w, "  %s on %s (pid %d): %s\n", p.Role, p.Host, p.PID, state)
		for _, d := range p.Dependencies {
			if d.Up {
				fmt.Fprintf(w, "    %s: up\n", d.Name)
			} else {
				fmt.Fprintf(w, "    %s: UNAVAILABLE for %s: %s\n", d.Name, now.Sub(d.Since).Round(time.Second), d.Error)
			}
		}
	}
	return nil
}

// printServerTable prints one row per server, then what is not per row.
func printServerTable(w io.Writer, out []serverStatus) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SERVER\tSYSTEM\tTLI\tRECEIVER\tSERVER_LSN\tRECEIVED\tWRITTEN\tPUBLISHED\tARCHIVED\tFLUSH\tLAG_BYTES\tLAG_S\tQUEUED\tLAST_ARCHIVED\tSTATE_AGE")
	for _, s := range out {
		last := "-"
		if s.LastArchived != "" {
			last = s.LastArchived + " at " + s.LastArchivedAt.Format(time.RFC3339)
		}
		queued := "-"
		if s.Queued != nil {
			queued = fmt.Sprint(*s.Queued)
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%.1f\t%s\t%s\t%.0fs\n", s.Server, s.SystemID, s.Timeline, s.Receiver,
			s.ServerLSN, s.ReceivedLSN, s.WrittenLSN, s.PublishedLSN, s.ArchivedLSN, s.FlushLSN, s.LagBytes, s.LagSeconds, queued, last, s.StateAge)
	}
	tw.Flush()
	if s := out[0]; s.ArchiverBacklog != nil {
		fmt.Fprintf(w, "archiver backlog: %d events (all servers)\n", *s.ArchiverBacklog)
	}
	for _, s := range out {
		if s.Slot != nil {
			fmt.Fprintf(w, "slot %s of %s: exists %v, wal_status %s, restart_lsn %s, active %v\n", s.ServerState.Slot, s.Server, s.Slot.Exists, s.Slot.WALStatus, s.Slot.RestartLSN, s.Slot.Active)
		}
	}
}
