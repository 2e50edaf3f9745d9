package pipeline

import (
	"bufio"
	"bytes"
	"fmt"
	"strconv"
	"strings"
)

// HistoryEntry is one line of a timeline history file: timeline Parent
// ended at Switch, where its child began.
type HistoryEntry struct {
	Parent uint32
	Switch LSN
}

// ParseHistory parses a timeline history file (<tli>.history) as
// PostgreSQL writes it: one "<parent tli>\t<switch lsn>\t<reason>" line per
// ancestor, oldest first; blank lines and lines starting with '#' are
// skipped. Timelines must increase and switch points must not go back.
func ParseHistory(data []byte) ([]HistoryEntry, error) {
	var out []HistoryEntry
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) < 2 {
			return nil, fmt.Errorf("history line %d: %q: want <timeline> <switch lsn> [reason]", n, line)
		}
		tli, err := strconv.ParseUint(f[0], 10, 32)
		if err != nil || tli == 0 {
			return nil, fmt.Errorf("history line %d: timeline %q", n, f[0])
		}
		at, err := ParseLSN(f[1])
		if err != nil {
			return nil, fmt.Errorf("history line %d: %w", n, err)
		}
		if k := len(out); k > 0 && (uint32(tli) <= out[k-1].Parent || at < out[k-1].Switch) {
			return nil, fmt.Errorf("history line %d: timeline %d at %s does not follow timeline %d at %s", n, tli, at, out[k-1].Parent, out[k-1].Switch)
		}
		out = append(out, HistoryEntry{Parent: uint32(tli), Switch: at})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("history: %w", err)
	}
	return out, nil
}

// SwitchPoint is where the timeline the history file belongs to began: the
// switch point of its last entry. ok is false for an empty history.
func SwitchPoint(h []HistoryEntry) (parent uint32, at LSN, ok bool) {
	if len(h) == 0 {
		return 0, 0, false
	}
	e := h[len(h)-1]
	return e.Parent, e.Switch, true
}

// ParseHistoryFileName parses "<8 hex digits>.history".
func ParseHistoryFileName(name string) (uint32, bool) {
	if !historyRE.MatchString(name) {
		return 0, false
	}
	t, err := strconv.ParseUint(name[:8], 16, 32)
	if err != nil || t == 0 {
		return 0, false
	}
	return uint32(t), true
}
