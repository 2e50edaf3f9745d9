package bus

import (
	"context"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/walship/walship/pipeline"
)

// maxBackupSkip bounds how far back lastWALArchived looks past base backup
// confirmations for the last WAL one.
const maxBackupSkip = 4096

// lastWALArchived is the newest confirmation of a WAL file on subject:
// confirmations of base backup chunks (pipeline.KindBackup) share the
// subject and are skipped, looking back at most maxBackupSkip messages.
func lastWALArchived(ctx context.Context, stream jetstream.Stream, subject string) (*pipeline.ArchivedEvent, time.Time, bool) {
	m, err := stream.GetLastMsgForSubject(ctx, subject)
	if err != nil {
		return nil, time.Time{}, false
	}
	for seq, n := m.Sequence, 0; ; n++ {
		if m.Subject == subject {
			if ev, err := pipeline.DecodeArchivedEvent(m.Data); err == nil && ev.Kind != pipeline.KindBackup {
				return &ev, m.Time, true
			}
		}
		if seq <= 1 || n >= maxBackupSkip {
			return nil, time.Time{}, false
		}
		seq--
		if m, err = stream.GetMsg(ctx, seq); err != nil {
			if err == jetstream.ErrMsgNotFound {
				m = &jetstream.RawStreamMsg{Sequence: seq}
				continue
			}
			return nil, time.Time{}, false
		}
	}
}
