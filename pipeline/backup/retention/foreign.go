package retention

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"path"
	"strconv"
	"strings"

	"github.com/walship/walship/pipeline"
	"github.com/walship/walship/sinks"
)

// foreignPrefix is where the tool whose layout walship shares keeps its
// base backups: barman-cloud <prefix>/<server>/base/<id>/backup.info,
// WAL-G <prefix>/basebackups_005/<name>_backup_stop_sentinel.json.
func foreignPrefix(l sinks.Layout) (tool, prefix string) {
	join := func(parts ...string) string {
		var out []string
		for _, p := range parts {
			if p = strings.Trim(p, "/"); p != "" {
				out = append(out, p)
			}
		}
		return strings.Join(out, "/") + "/"
	}
	switch l := l.(type) {
	case sinks.BarmanCloud:
		return "barman-cloud", join(l.Prefix, l.Server, "base")
	case sinks.WalG:
		return "wal-g", join(l.Prefix, "basebackups_005")
	}
	return "", ""
}

// scanForeign reads the other tool's catalogues. One that cannot be read
// goes to ForeignErrors: prune refuses rather than guess what WAL it needs.
func (st *State) scanForeign(ctx context.Context, sink sinks.Sink, lister sinks.Lister) error {
	tool, prefix := foreignPrefix(st.Layout)
	if prefix == "" {
		return nil
	}
	var keys []string
	err := lister.List(ctx, prefix, func(ob sinks.Object) error {
		rest := strings.TrimPrefix(ob.Key, prefix)
		switch tool {
		case "barman-cloud":
			if dir, leaf, ok := strings.Cut(rest, "/"); ok && dir != "" && leaf == "backup.info" {
				keys = append(keys, ob.Key)
			}
		case "wal-g":
			if !strings.Contains(rest, "/") && strings.HasSuffix(rest, "_backup_stop_sentinel.json") {
				keys = append(keys, ob.Key)
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("list %s: %w", prefix, err)
	}
	for _, key := range keys {
		data, err := readAll(ctx, sink, key)
		if err != nil {
			return err
		}
		var f Foreign
		switch tool {
		case "barman-cloud":
			f, err = parseBarmanInfo(data, st.SegSize)
		case "wal-g":
			f, err = parseWalGSentinel(data)
		}
		if err != nil {
			st.ForeignErrors = append(st.ForeignErrors, fmt.Sprintf("%s: %v", key, err))
			continue
		}
		if f.StartLSN == 0 {
			continue // a failed barman-cloud backup: it needs no WAL
		}
		f.Tool, f.Key = tool, key
		st.Foreign = append(st.Foreign, f)
	}
	return nil
}

// parseBarmanInfo reads barman's backup.info (key=value lines): begin_xlog
// (an LSN) or begin_wal (a segment name), and timeline. A backup whose
// status is FAILED needs no WAL (StartLSN 0).
func parseBarmanInfo(data []byte, size pipeline.SegmentSize) (Foreign, error) {
	kv := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			kv[strings.TrimSpace(k)] = strings.Trim(strings.TrimSpace(v), `"'`)
		}
	}
	if kv["status"] == "FAILED" {
		return Foreign{}, nil
	}
	var f Foreign
	if t, err := strconv.ParseUint(kv["timeline"], 10, 32); err == nil {
		f.Timeline = uint32(t)
	}
	if l, err := pipeline.ParseLSN(kv["begin_xlog"]); err == nil && l > 0 {
		f.StartLSN = l
		return f, nil
	}
	if w := kv["begin_wal"]; w != "" && size != 0 {
		seg, err := pipeline.ParseSegmentName(path.Base(w), size)
		if err == nil {
			f.StartLSN, f.Timeline = max(seg.StartLSN(size), 1), seg.Timeline
			return f, nil
		}
	}
	return Foreign{}, fmt.Errorf("no begin_xlog or begin_wal that parses")
}

// parseWalGSentinel reads WAL-G's backup sentinel: "LSN" is the backup's
// start (a number; a string "X/Y" is taken too), "Timeline" its timeline.
func parseWalGSentinel(data []byte) (Foreign, error) {
	var s struct {
		LSN      json.RawMessage `json:"LSN"`
		Timeline uint32          `json:"Timeline"`
	}
	if err := json.Unmarshal(data, &s); err != nil {
		return Foreign{}, fmt.Errorf("not JSON: %v", err)
	}
	var n uint64
	var str string
	switch {
	case json.Unmarshal(s.LSN, &n) == nil && n > 0:
		return Foreign{StartLSN: pipeline.LSN(n), Timeline: s.Timeline}, nil
	case json.Unmarshal(s.LSN, &str) == nil:
		if l, err := pipeline.ParseLSN(str); err == nil && l > 0 {
			return Foreign{StartLSN: l, Timeline: s.Timeline}, nil
		}
	}
	return Foreign{}, fmt.Errorf("no start LSN (field \"LSN\")")
}
