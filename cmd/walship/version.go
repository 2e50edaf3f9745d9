package main

import (
	"fmt"
	"io"
	"runtime"
	"runtime/debug"
	"strings"
)

// versionModules are the libraries whose versions `walship version` names:
// what speaks PostgreSQL's replication protocol and NATS.
var versionModules = []string{"github.com/jackc/pglogrepl", "github.com/jackc/pgx/v5", "github.com/nats-io/nats.go", "github.com/nats-io/nats-server/v2"}

// cmdVersion prints walship's version (set by make build with -ldflags;
// else the module version go install stamps), the Go release it was built
// with, and the versions of the protocol libraries in the binary.
func cmdVersion(stdout io.Writer) error {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		bi = nil
	}
	_, err := io.WriteString(stdout, versionText(version, bi))
	return err
}

// versionText formats cmdVersion's lines from the build information (nil:
// none in the binary).
func versionText(v string, bi *debug.BuildInfo) string {
	var b strings.Builder
	goVersion := runtime.Version()
	deps := map[string]string{}
	if bi != nil {
		if v == "dev" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			v = bi.Main.Version
		}
		if bi.GoVersion != "" {
			goVersion = bi.GoVersion
		}
		for _, d := range bi.Deps {
			if d.Replace != nil {
				d = d.Replace
			}
			deps[d.Path] = d.Version
		}
	}
	fmt.Fprintf(&b, "walship %s\n", v)
	fmt.Fprintf(&b, "go %s\n", goVersion)
	for _, m := range versionModules {
		dv := deps[m]
		if dv == "" {
			dv = "unknown"
		}
		fmt.Fprintf(&b, "%s %s\n", m, dv)
	}
	return b.String()
}
