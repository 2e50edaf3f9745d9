// Package ratelog keeps repeated failures from flooding the log: the first
// occurrence of a key is logged, then at most one line per interval with the
// count of what was suppressed.
package ratelog

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// Limiter rate-limits log lines by key. It is safe for concurrent use.
type Limiter struct {
	log      *slog.Logger
	interval time.Duration
	mu       sync.Mutex
	last     map[string]time.Time
	dropped  map[string]int
}

// New builds a limiter that writes to log at most once per interval per key.
func New(log *slog.Logger, interval time.Duration) *Limiter {
	return &Limiter{log: log, interval: interval, last: map[string]time.Time{}, dropped: map[string]int{}}
}

// Warn logs msg at warning level unless key was logged within the interval.
func (l *Limiter) Warn(key, msg string, args ...any) { l.emit(slog.LevelWarn, key, msg, args) }

// Error logs msg at error level unless key was logged within the interval.
func (l *Limiter) Error(key, msg string, args ...any) { l.emit(slog.LevelError, key, msg, args) }

// Reset forgets key, so its next failure is logged at once (after a success).
func (l *Limiter) Reset(key string) {
	l.mu.Lock()
	delete(l.last, key)
	delete(l.dropped, key)
	l.mu.Unlock()
}

func (l *Limiter) emit(level slog.Level, key, msg string, args []any) {
	l.mu.Lock()
	now := time.Now()
	if t, ok := l.last[key]; ok && now.Sub(t) < l.interval {
		l.dropped[key]++
		l.mu.Unlock()
		return
	}
	n := l.dropped[key]
	l.last[key] = now
	l.dropped[key] = 0
	l.mu.Unlock()
	if n > 0 {
		args = append(args, "suppressed", n)
	}
	l.log.Log(context.Background(), level, msg, args...)
}
