package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/pipeline/backup/retention"
)

// backupListEntry is one backup in `backup list --json`.
type backupListEntry struct {
	ID          string            `json:"id"`
	Complete    bool              `json:"complete"`
	StartTime   time.Time         `json:"start_time"`
	EndTime     *time.Time        `json:"end_time,omitempty"`
	StartLSN    *pipeline.LSN     `json:"start_lsn,omitempty"`
	EndLSN      *pipeline.LSN     `json:"end_lsn,omitempty"`
	Timeline    uint32            `json:"timeline,omitempty"`
	EndTimeline uint32            `json:"end_timeline,omitempty"`
	Size        int64             `json:"size"`        // raw bytes of the archives (complete backups)
	StoredSize  int64             `json:"stored_size"` // bytes of every object of the backup in the bucket
	Objects     int               `json:"objects"`
	AgeSeconds  float64           `json:"age_seconds,omitempty"` // incomplete backups: since they started
	Window      *retention.Window `json:"recovery_window,omitempty"`
}

// backupList prints a server's backups and, for each complete one, the
// recovery window the bucket's WAL gives it. `walship backup list`.
func backupList(ctx context.Context, args []string, stdout io.Writer) error {
	var all, asJSON bool
	c, err := retentionSetup("backup list", args, stdout, func(fs *flag.FlagSet) {
		fs.BoolVar(&all, "all", false, "also list incomplete backups (no catalogue: in progress, or failed)")
		fs.BoolVar(&asJSON, "json", false, "print JSON")
	})
	if err != nil {
		return err
	}
	_, st, err := scanServer(ctx, c)
	if err != nil {
		return err
	}
	var entries []backupListEntry
	for _, b := range st.Backups {
		if !b.Complete && !all {
			continue
		}
		e := backupListEntry{ID: b.ID, Complete: b.Complete, StartTime: b.StartedAt.UTC(), StoredSize: b.Bytes, Objects: len(b.Objects)}
		if b.Started != nil {
			e.StartLSN, e.Timeline = &b.Started.StartLSN, b.Started.Timeline
		}
		if !b.Complete {
			e.AgeSeconds = time.Since(b.StartedAt).Round(time.Second).Seconds()
		}
		if c := b.Catalog; c != nil {
			end := c.EndTime.UTC()
			e.StartTime, e.EndTime, e.StartLSN, e.EndLSN = c.StartTime.UTC(), &end, &c.StartLSN, &c.EndLSN
			e.Timeline, e.EndTimeline, e.Size, e.Window = c.Timeline, c.EndTimeline, c.Size, b.Window
		}
		entries = append(entries, e)
	}
	if asJSON {
		if entries == nil {
			entries = []backupListEntry{}
		}
		out := struct {
			Server        string              `json:"server"`
			Backups       []backupListEntry   `json:"backups"`
			Foreign       []retention.Foreign `json:"foreign_backups"`
			Unreadable    []string            `json:"unreadable_catalogues,omitempty"`
			HistoryErrors []string            `json:"history_errors,omitempty"`
		}{Server: c.Server, Backups: entries, Foreign: append([]retention.Foreign{}, st.Foreign...), Unreadable: st.Unreadable, HistoryErrors: st.HistoryErrors}
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(out)
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tSTART\tEND\tSTART LSN\tEND LSN\tTLI\tSIZE\tSTORED\tRECOVERY WINDOW")
	const tf = "2006-01-02 15:04:05"
	for _, e := range entries {
		if !e.Complete {
			lsn := "-"
			if e.StartLSN != nil {
				lsn = e.StartLSN.String()
			}
			fmt.Fprintf(tw, "%s\t%s\t-\t%s\t-\t%d\t-\t%s\tINCOMPLETE (no catalogue; started %s ago)\n", e.ID, e.StartTime.Format(tf), lsn, e.Timeline,
				humanBytes(e.StoredSize), time.Since(e.StartTime).Round(time.Second))
			continue
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\n", e.ID, e.StartTime.Format(tf), e.EndTime.Format(tf), e.StartLSN, e.EndLSN, e.Timeline,
			humanBytes(e.Size), humanBytes(e.StoredSize), windowText(e.Window))
	}
	tw.Flush()
	for _, f := range st.Foreign {
		fmt.Fprintf(stdout, "%s backup %s: its WAL from %s is kept by prune\n", f.Tool, f.Key, f.StartLSN)
	}
	for _, k := range st.Unreadable {
		fmt.Fprintf(stdout, "unreadable catalogue %s (prune refuses while it is there)\n", k)
	}
	for _, h := range st.HistoryErrors {
		fmt.Fprintf(stdout, "history file not followed: %s\n", h)
	}
	now := time.Now()
	for _, b := range st.Future(now) {
		fmt.Fprintf(stdout, "warning: %s\n", retention.FutureWarning(b, now))
	}
	return nil
}

func windowText(w *retention.Window) string {
	if w == nil {
		return "-"
	}
	at := "?"
	if !w.EndTime.IsZero() {
		at = w.EndTime.UTC().Format("2006-01-02 15:04:05")
	}
	s := fmt.Sprintf("to %s (%s, timeline %d)", at, w.EndLSN, w.Timeline)
	switch {
	case w.Broken:
		return fmt.Sprintf("BROKEN: the WAL it needs is missing from %s", w.EndLSN)
	case w.Gap:
		return fmt.Sprintf("gap at %s: %s", w.GapAt, s)
	}
	return s
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
