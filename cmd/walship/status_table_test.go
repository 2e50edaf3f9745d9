package main

import (
	"strings"
	"testing"

	"github.com/walship/walship/pipeline"
)

// Several servers print as rows of one table, under one header.
func TestStatusTable(t *testing.T) {
	var b strings.Builder
	backlog, queued := uint64(4), uint64(3)
	printServerTable(&b, []serverStatus{
		{ServerState: pipeline.ServerState{Server: "a", SystemID: "1", Timeline: 1, FlushLSN: 0x3000000}, Receiver: "streaming", ArchiverBacklog: &backlog, Queued: &queued},
		{ServerState: pipeline.ServerState{Server: "b", SystemID: "2", Timeline: 2}, Receiver: "disconnected", ArchiverBacklog: &backlog},
	})
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	if len(lines) != 4 || !strings.HasPrefix(lines[0], "SERVER ") || !strings.HasPrefix(lines[1], "a ") || !strings.HasPrefix(lines[2], "b ") ||
		!strings.Contains(lines[1], "0/3000000") || !strings.Contains(lines[2], "disconnected") || lines[3] != "archiver backlog: 4 events (all servers)" {
		t.Errorf("table:\n%s", b.String())
	}
	col := strings.Index(lines[0], "QUEUED")
	if col < 0 || !strings.HasPrefix(lines[1][col:], "3 ") || !strings.HasPrefix(lines[2][col:], "- ") {
		t.Errorf("queued events per server:\n%s", b.String())
	}
	if strings.Index(lines[1], "streaming") != strings.Index(lines[2], "disconnected") {
		t.Errorf("columns not aligned:\n%s", b.String())
	}
}
