// Package backoff is capped exponential back-off with jitter for the retry
// loops that must never give up (uploads, publishes, reconnects).
package backoff

import (
	"context"
	"math/rand/v2"
	"time"
)

// Backoff doubles its delay from Min up to Max. The zero value is not
// usable; build one with New.
type Backoff struct {
	min, max, cur time.Duration
}

// New returns a back-off from min to max.
func New(min, max time.Duration) *Backoff { return &Backoff{min: min, max: max} }

// Next returns the next delay: the current one with up to 20% jitter.
func (b *Backoff) Next() time.Duration {
	if b.cur == 0 {
		b.cur = b.min
	} else if b.cur *= 2; b.cur > b.max {
		b.cur = b.max
	}
	return b.cur - time.Duration(rand.Int64N(int64(b.cur)/5+1))
}

// Reset starts again from the minimum, after a success.
func (b *Backoff) Reset() { b.cur = 0 }

// Wait sleeps for the next delay or until ctx is done, and reports whether
// the caller should go on (ctx not done).
func (b *Backoff) Wait(ctx context.Context) bool { return Sleep(ctx, b.Next()) }

// Sleep sleeps for d or until ctx is done, and reports whether ctx is still live.
func Sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
