package main

import (
	"errors"
	"strings"

	"github.com/walship/walship/internal/health"
)

// readiness builds /readyz's answer: nil when the process does its job,
// else every reason it does not. A process is ready when the dependencies
// it watches (NATS, the bucket) are up and each part it runs works: a
// receiver streams from PostgreSQL (recvReady), archivers consume segment
// events (archReady). nil parts are not run by this process.
func readiness(deps *health.Set, recvReady, archReady func() error) func() error {
	return func() error {
		var why []string
		for _, f := range []func() error{deps.Ready, recvReady, archReady} {
			if f == nil {
				continue
			}
			if err := f(); err != nil {
				why = append(why, err.Error())
			}
		}
		if len(why) == 0 {
			return nil
		}
		return errors.New(strings.Join(why, "; "))
	}
}
