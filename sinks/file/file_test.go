package file

import (
	"testing"

	"github.com/walship/walship/sinks"
	"github.com/walship/walship/sinks/sinktest"
)

func TestConformance(t *testing.T) {
	sinktest.Run(t, func(t *testing.T) sinks.Sink {
		s, err := New(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		return s
	})
}

func TestRelativePathRefused(t *testing.T) {
	if _, err := New("relative/dir"); err == nil {
		t.Error("relative path accepted")
	}
}
