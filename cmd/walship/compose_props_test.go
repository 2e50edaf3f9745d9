package main

import (
	goversion "go/version"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/compose-spec/compose-go/v2/types"
)

// The properties that make `docker compose up -d --build` come up the
// first time and again the second, read from the files themselves (no
// Docker engine runs where walship is developed): each subtest names the
// failure it keeps away.
func TestComposeComesUp(t *testing.T) {
	p := loadCompose(t)
	df := readDockerfile(t)

	// A VOLUME the image does not create is created by Docker owned by
	// root, and a non-root process cannot write it (the receiver's
	// "mkdir .../spool: permission denied").
	t.Run("VolumesOwnedByImageUser", func(t *testing.T) {
		final := df.stages[len(df.stages)-1]
		user := ""
		for _, in := range final {
			if in.op == "USER" {
				user, _, _ = strings.Cut(in.args, ":")
			}
		}
		if user == "" || user == "root" || user == "0" {
			t.Fatalf("the image runs as %q: want a non-root USER", user)
		}
		vols := 0
		for _, in := range final {
			if in.op != "VOLUME" {
				continue
			}
			for _, v := range dockerList(in.args) {
				vols++
				if !createdOwnedBy(final, v, user) {
					t.Errorf("VOLUME %s is not created in the image owned by %s: add COPY --chown=%s:%s <an empty dir> %s before it", v, user, user, user, v)
				}
			}
		}
		if vols == 0 {
			t.Error("the image declares no VOLUME for walship's data directory")
		}
	})

	// The build image sets GOTOOLCHAIN=local: a Go older than go.mod's go
	// line does not build walship.
	t.Run("GolangImageAtLeastGoMod", func(t *testing.T) {
		gomod, err := os.ReadFile(filepath.Join(repoRoot, "go.mod"))
		if err != nil {
			t.Fatal(err)
		}
		m := regexp.MustCompile(`(?m)^go (\S+)$`).FindSubmatch(gomod)
		if m == nil {
			t.Fatal("go.mod has no go line")
		}
		want := "go" + string(m[1])
		found := false
		for _, st := range df.stages {
			for _, in := range st {
				if in.op != "FROM" {
					continue
				}
				img := strings.Fields(in.args)[0]
				tag, ok := strings.CutPrefix(img, "golang:")
				if !ok {
					continue
				}
				found = true
				v := "go" + regexp.MustCompile(`^[0-9.]+`).FindString(tag)
				if strings.Count(v, ".") < 2 {
					t.Errorf("FROM %s: pin the exact Go release (golang:%s-...), not a moving minor", img, m[1])
				}
				if !goversion.IsValid(v) || goversion.Compare(v, want) < 0 {
					t.Errorf("FROM %s: Go %s is older than go.mod's go %s", img, strings.TrimPrefix(v, "go"), m[1])
				}
			}
		}
		if !found {
			t.Error("the Dockerfile builds from no golang image")
		}
	})

	// .git is not in the build context: the version must come in as a
	// build argument, or every image says "dev".
	t.Run("VersionBuildArg", func(t *testing.T) {
		if !regexp.MustCompile(`(?m)^ARG VERSION\b`).MatchString(df.text) || !strings.Contains(df.text, `make build VERSION="${VERSION}"`) {
			t.Error(`the Dockerfile does not take ARG VERSION and pass it to make build VERSION="${VERSION}"`)
		}
		for name, svc := range p.Services {
			if svc.Build == nil {
				continue
			}
			if v, ok := svc.Build.Args["VERSION"]; !ok || v == nil || *v == "" {
				t.Errorf("service %s builds walship without a VERSION build argument", name)
			}
		}
	})

	// pg_isready without -h asks the Unix socket, which the image's
	// initialisation server answers before PostgreSQL listens on TCP.
	t.Run("HealthchecksUseTCP", func(t *testing.T) {
		for name, svc := range p.Services {
			if svc.HealthCheck == nil || len(svc.HealthCheck.Test) == 0 {
				continue
			}
			cmd := strings.Join(svc.HealthCheck.Test[1:], " ")
			if strings.Contains(cmd, "pg_isready") {
				h := regexp.MustCompile(`(?:-h|--host)[ =](\S+)`).FindStringSubmatch(cmd)
				if h == nil || strings.HasPrefix(h[1], "/") {
					t.Errorf("service %s: healthcheck %q may pass on the Unix socket before TCP listens: use pg_isready -h 127.0.0.1", name, cmd)
				}
				continue
			}
			if !strings.Contains(cmd, "127.0.0.1") && !strings.Contains(cmd, "localhost") {
				t.Errorf("service %s: healthcheck %q does not probe a TCP address", name, cmd)
			}
		}
	})

	// A job others wait for (service_completed_successfully) runs on every
	// `up`: it must succeed when its work is already done, and must not be
	// restarted in a loop when it fails.
	t.Run("OneShotJobsIdempotent", func(t *testing.T) {
		jobs := map[string]bool{}
		for _, svc := range p.Services {
			for dep, d := range svc.DependsOn {
				if d.Condition != types.ServiceConditionCompletedSuccessfully {
					continue
				}
				job, ok := p.Services[dep]
				if !ok || jobs[dep] {
					continue
				}
				jobs[dep] = true
				if job.Restart != "" && job.Restart != types.RestartPolicyNo {
					t.Errorf("one-shot job %s has restart %q: want \"no\"", dep, job.Restart)
				}
				cmd := strings.Join(append(append([]string{}, job.Entrypoint...), job.Command...), " ")
				if strings.Contains(cmd, "create-bucket") || strings.Contains(cmd, " mb ") {
					guard := regexp.MustCompile(`head-bucket[^|]*\|\|[^|]*(create-bucket|\bmb\b)`)
					if !guard.MatchString(cmd) {
						t.Errorf("one-shot job %s creates a bucket without checking first (%q): CreateBucket answers 409 on the second up; use head-bucket ... || create-bucket ...", dep, cmd)
					}
				}
			}
		}
		if len(jobs) == 0 {
			t.Error("no one-shot job found (the bucket is created by one)")
		}
	})

	// Monitoring is most needed when walship is broken.
	t.Run("MonitoringIndependentOfWalship", func(t *testing.T) {
		for name, svc := range p.Services {
			if svc.Build != nil {
				continue
			}
			for dep, d := range svc.DependsOn {
				if ds, ok := p.Services[dep]; ok && ds.Build != nil && d.Condition == types.ServiceConditionHealthy {
					t.Errorf("service %s waits for walship service %s to be healthy: it would be down exactly when walship is broken", name, dep)
				}
			}
		}
	})

	// The stack's passwords are defaults: nothing of it is reachable from
	// other hosts.
	t.Run("PortsOnLoopback", func(t *testing.T) {
		for name, svc := range p.Services {
			for _, port := range svc.Ports {
				if port.Published != "" && port.HostIP != "127.0.0.1" && port.HostIP != "::1" {
					t.Errorf("service %s publishes port %s on every interface (%q): bind it to 127.0.0.1", name, port.Published, port.HostIP)
				}
			}
		}
	})

	// The NATS image is a maintained line: not older than the server
	// walship is built and tested against (go.mod).
	t.Run("NATSImageCurrent", func(t *testing.T) {
		gomod, _ := os.ReadFile(filepath.Join(repoRoot, "go.mod"))
		m := regexp.MustCompile(`github.com/nats-io/nats-server/v2 v(\d+\.\d+)`).FindSubmatch(gomod)
		if m == nil {
			t.Fatal("go.mod does not require nats-server")
		}
		want := "go" + string(m[1])
		all := loadComposeProfile(t, "cluster", "deploy/nats-cluster.env")
		n := 0
		for name, svc := range all.Services {
			tag, ok := strings.CutPrefix(svc.Image, "nats:")
			if !ok {
				continue
			}
			n++
			v := "go" + regexp.MustCompile(`^\d+\.\d+`).FindString(tag)
			if !goversion.IsValid(v) || goversion.Compare(v, want) < 0 {
				t.Errorf("service %s runs %s, older than the nats-server %s walship is tested against", name, svc.Image, m[1])
			}
		}
		if n == 0 {
			t.Error("no NATS service")
		}
	})

	// Profiles are served only on --debug-addr, off by default.
	t.Run("NoDebugEndpoints", func(t *testing.T) {
		if strings.Contains(df.text, "WALSHIP_DEBUG_ADDR") {
			t.Error("the image turns on the debug endpoints")
		}
		for name, svc := range p.Services {
			for _, a := range svc.Command {
				if strings.HasPrefix(a, "--debug-addr") {
					t.Errorf("service %s serves the debug endpoints (%s)", name, a)
				}
			}
			if _, ok := svc.Environment["WALSHIP_DEBUG_ADDR"]; ok {
				t.Errorf("service %s serves the debug endpoints (WALSHIP_DEBUG_ADDR)", name)
			}
		}
	})
}

// dockerfile is a Dockerfile split into build stages.
type dockerfile struct {
	text   string
	stages [][]instruction
}

type instruction struct{ op, args string }

func readDockerfile(t *testing.T) dockerfile {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot, "deploy/Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	d := dockerfile{text: string(b)}
	joined := strings.ReplaceAll(d.text, "\\\n", " ")
	for _, line := range strings.Split(joined, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		op, args, _ := strings.Cut(line, " ")
		op = strings.ToUpper(op)
		if op == "FROM" {
			d.stages = append(d.stages, nil)
		}
		if len(d.stages) == 0 {
			continue // ARG before FROM
		}
		d.stages[len(d.stages)-1] = append(d.stages[len(d.stages)-1], instruction{op, strings.TrimSpace(args)})
	}
	if len(d.stages) == 0 {
		t.Fatal("the Dockerfile has no FROM")
	}
	return d
}

// dockerList parses an instruction's arguments in JSON or space form.
func dockerList(args string) []string {
	if strings.HasPrefix(args, "[") {
		var out []string
		for _, f := range strings.Split(strings.Trim(args, "[]"), ",") {
			out = append(out, strings.Trim(strings.TrimSpace(f), `"`))
		}
		return out
	}
	return strings.Fields(args)
}

// createdOwnedBy reports whether a COPY or ADD before the VOLUME creates
// dir owned by user.
func createdOwnedBy(stage []instruction, dir, user string) bool {
	dir = strings.TrimSuffix(dir, "/")
	for _, in := range stage {
		if in.op == "VOLUME" {
			for _, v := range dockerList(in.args) {
				if strings.TrimSuffix(v, "/") == dir {
					return false
				}
			}
		}
		if in.op != "COPY" && in.op != "ADD" {
			continue
		}
		f := strings.Fields(in.args)
		owner := ""
		for _, a := range f {
			if o, ok := strings.CutPrefix(a, "--chown="); ok {
				owner, _, _ = strings.Cut(o, ":")
			}
		}
		if owner == user && strings.TrimSuffix(f[len(f)-1], "/") == dir {
			return true
		}
	}
	return false
}
