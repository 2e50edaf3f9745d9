package main

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/compose-spec/compose-go/v2/types"
	"gopkg.in/yaml.v3"
)

const repoRoot = "../.."

func loadCompose(t *testing.T) *types.Project {
	t.Helper()
	return loadComposeProfile(t, "", "")
}

// loadComposeProfile loads docker-compose.yml as `docker compose --profile
// profile --env-file envFile` would (either may be empty).
func loadComposeProfile(t *testing.T, profile, envFile string) *types.Project {
	t.Helper()
	fns := []cli.ProjectOptionsFn{cli.WithWorkingDirectory(repoRoot), cli.WithEnv(nil), cli.WithName("walship")}
	if profile != "" {
		fns = append(fns, cli.WithProfiles([]string{profile}))
	}
	if envFile != "" {
		fns = append(fns, cli.WithEnvFiles(filepath.Join(repoRoot, envFile)), cli.WithDotEnv)
	}
	opts, err := cli.NewProjectOptions([]string{filepath.Join(repoRoot, "docker-compose.yml")}, fns...)
	if err != nil {
		t.Fatal(err)
	}
	p, err := opts.LoadProject(context.Background())
	if err != nil {
		t.Fatalf("docker-compose.yml (profile %q, env file %q) does not load: %v", profile, envFile, err)
	}
	return p
}

var commandGroups = map[string]flagGroup{"run": runGroups, "receive": receiveGroups, "archive": archiveGroups}

// The compose file loads and validates, every file it mounts or builds from
// exists, and every walship command line parses with walship's own flags:
// the single-node stack, and the 3-node NATS cluster profile with its
// environment file, where every walship process is given all three nodes
// and three replicas.
func TestComposeFile(t *testing.T) {
	t.Run("default", func(t *testing.T) {
		checkCompose(t, loadComposeProfile(t, "", ""), []string{"nats://nats:4222"}, 1, time.Minute)
	})
	t.Run("cluster", func(t *testing.T) {
		p := loadComposeProfile(t, "cluster", "deploy/nats-cluster.env")
		checkCompose(t, p, []string{"nats://nats-1:4222", "nats://nats-2:4222", "nats://nats-3:4222"}, 3, 30*time.Second)
		checkNATSCluster(t, p, []string{"nats-1", "nats-2", "nats-3"})
	})
}

func checkCompose(t *testing.T, p *types.Project, natsURLs []string, replicas int, ackWait time.Duration) {
	abs, _ := filepath.Abs(repoRoot)
	walships := 0
	for name, svc := range p.Services {
		for _, v := range svc.Volumes {
			if v.Type != types.VolumeTypeBind {
				continue
			}
			if _, err := os.Stat(v.Source); err != nil {
				t.Errorf("service %s mounts %s, which does not exist", name, strings.TrimPrefix(v.Source, abs+"/"))
			}
		}
		if svc.Build != nil {
			if _, err := os.Stat(filepath.Join(svc.Build.Context, svc.Build.Dockerfile)); err != nil {
				t.Errorf("service %s builds from a missing Dockerfile: %v", name, err)
			}
		}
		for dep, d := range svc.DependsOn {
			ds, ok := p.Services[dep]
			if !ok {
				if _, disabled := p.DisabledServices[dep]; !disabled || d.Required {
					t.Errorf("service %s depends on unknown %s", name, dep)
				}
				continue
			}
			if d.Condition == types.ServiceConditionHealthy && ds.HealthCheck == nil && ds.Build == nil {
				t.Errorf("service %s waits for %s to be healthy, but %s has no healthcheck", name, dep, dep)
			}
		}
		if svc.Build == nil {
			continue
		}
		walships++
		if len(svc.Command) == 0 {
			t.Errorf("walship service %s has no command", name)
			continue
		}
		groups, ok := commandGroups[svc.Command[0]]
		if !ok {
			t.Errorf("walship service %s runs unknown command %q", name, svc.Command[0])
			continue
		}
		for k, v := range svc.Environment {
			if v != nil {
				t.Setenv(k, *v)
			}
		}
		c := &config{}
		fs := newFlagSet(svc.Command[0], c, groups)
		rest, err := parse(fs, svc.Command[1:])
		if err == nil && len(rest) > 0 {
			t.Errorf("service %s: stray arguments %v", name, rest)
		}
		if err == nil {
			err = c.validate(groups)
		}
		if err != nil {
			t.Errorf("service %s: walship rejects its command line: %v", name, err)
			continue
		}
		if groups&gNATS != 0 {
			if got := strings.Split(c.NATS, ","); !slices.Equal(got, natsURLs) {
				t.Errorf("service %s: --nats %q, want %q", name, c.NATS, strings.Join(natsURLs, ","))
			}
			if c.NATSReplicas != replicas {
				t.Errorf("service %s: --nats-replicas %d, want %d", name, c.NATSReplicas, replicas)
			}
			if c.AckWait != ackWait {
				t.Errorf("service %s: --ack-wait %s, want %s (the same on every process)", name, c.AckWait, ackWait)
			}
			for _, u := range natsURLs {
				host := strings.TrimSuffix(strings.TrimPrefix(u, "nats://"), ":4222")
				if _, ok := p.Services[host]; !ok {
					t.Errorf("service %s uses NATS at %s, which is not a service", name, u)
				}
				if d, ok := svc.DependsOn[host]; !ok || d.Condition != types.ServiceConditionHealthy {
					t.Errorf("service %s does not wait for %s to be healthy", name, host)
				}
			}
		}
	}
	if walships < 3 {
		t.Errorf("%d walship services, want a receiver and two archivers", walships)
	}
}

// checkNATSCluster: the nodes form one JetStream cluster, each with its own
// name, store volume and a route to every node.
func checkNATSCluster(t *testing.T, p *types.Project, nodes []string) {
	var routes []string
	for _, n := range nodes {
		routes = append(routes, "nats://"+n+":6222")
	}
	volumes := map[string]string{}
	for _, n := range nodes {
		svc, ok := p.Services[n]
		if !ok {
			t.Errorf("no service %s in the cluster profile", n)
			continue
		}
		if svc.HealthCheck == nil {
			t.Errorf("%s has no healthcheck", n)
		}
		flags := map[string]string{}
		for i, a := range svc.Command {
			if strings.HasPrefix(a, "-") && i+1 < len(svc.Command) && !strings.HasPrefix(svc.Command[i+1], "-") {
				flags[a] = svc.Command[i+1]
			} else if strings.HasPrefix(a, "-") {
				flags[a] = ""
			}
		}
		if _, ok := flags["-js"]; !ok {
			t.Errorf("%s: JetStream not enabled (-js): %v", n, svc.Command)
		}
		if flags["--name"] != n || flags["--cluster_name"] != "walship" || flags["--cluster"] != "nats://0.0.0.0:6222" {
			t.Errorf("%s: name %q, cluster %q on %q", n, flags["--name"], flags["--cluster_name"], flags["--cluster"])
		}
		if got := strings.Split(flags["--routes"], ","); !slices.Equal(got, routes) {
			t.Errorf("%s: routes %v, want %v", n, got, routes)
		}
		store := flags["-sd"]
		for _, v := range svc.Volumes {
			if v.Target == store && v.Type == types.VolumeTypeVolume {
				if other, dup := volumes[v.Source]; dup {
					t.Errorf("%s and %s share the store volume %s", n, other, v.Source)
				}
				volumes[v.Source] = n
				store = ""
			}
		}
		if store != "" {
			t.Errorf("%s: its store %q is not on a volume of its own", n, flags["-sd"])
		}
	}
}

// Prometheus scrapes every walship service and loads the alert rules.
func TestPrometheusConfig(t *testing.T) {
	p := loadCompose(t)
	b, err := os.ReadFile(filepath.Join(repoRoot, "deploy/prometheus.yml"))
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		RuleFiles     []string `yaml:"rule_files"`
		ScrapeConfigs []struct {
			StaticConfigs []struct {
				Targets []string `yaml:"targets"`
			} `yaml:"static_configs"`
		} `yaml:"scrape_configs"`
	}
	if err := yaml.Unmarshal(b, &cfg); err != nil {
		t.Fatal(err)
	}
	targets := map[string]bool{}
	for _, sc := range cfg.ScrapeConfigs {
		for _, st := range sc.StaticConfigs {
			for _, tg := range st.Targets {
				targets[tg] = true
			}
		}
	}
	for name, svc := range p.Services {
		if svc.Build != nil && !targets[name+":9752"] {
			t.Errorf("prometheus does not scrape walship service %s", name)
		}
	}
	if len(cfg.RuleFiles) != 1 || !strings.HasSuffix(cfg.RuleFiles[0], "alerts.yml") {
		t.Errorf("rule_files %v, want alerts.yml", cfg.RuleFiles)
	}
}

// The image's healthcheck runs a walship subcommand that works.
func TestDockerfileHealthcheck(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(repoRoot, "deploy/Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	df := string(b)
	for _, want := range []string{"make build", "USER nonroot", "HEALTHCHECK", "distroless/static"} {
		if !strings.Contains(df, want) {
			t.Errorf("Dockerfile lacks %q", want)
		}
	}
	m := regexp.MustCompile(`CMD (\[.*"health".*\])`).FindStringSubmatch(strings.ReplaceAll(df, "\\\n", ""))
	if m == nil {
		t.Fatal("no HEALTHCHECK CMD running walship health")
	}
	var argv []string
	if err := json.Unmarshal([]byte(m[1]), &argv); err != nil {
		t.Fatal(err)
	}
	ok := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok\n")) }))
	defer ok.Close()
	bad := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { http.Error(w, "nats down", 503) }))
	defer bad.Close()
	args := append([]string{}, argv[1:]...)
	args[len(args)-1] = ok.URL
	if err := run(context.Background(), args, os.Stdout, os.Stderr); err != nil {
		t.Errorf("healthcheck against a ready server: %v", err)
	}
	args[len(args)-1] = bad.URL
	if err := run(context.Background(), args, os.Stdout, os.Stderr); err == nil {
		t.Error("healthcheck passed against an unready server")
	}
}

// The dashboard is valid JSON and queries only walship metrics or
// Prometheus functions.
func TestDashboardJSON(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(repoRoot, "deploy/grafana/dashboards/walship.json"))
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
		Templating struct {
			List []struct {
				Name       string `json:"name"`
				Multi      bool   `json:"multi"`
				IncludeAll bool   `json:"includeAll"`
				Definition string `json:"definition"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatal(err)
	}
	if len(d.Panels) < 8 {
		t.Errorf("%d panels", len(d.Panels))
	}
	// A server selector (issue 12: one process and one pool for many
	// servers), and every panel follows it: each walship series that
	// carries the server label is filtered by it.
	selector := false
	for _, v := range d.Templating.List {
		selector = selector || v.Name == "server" && v.Multi && v.IncludeAll && strings.Contains(v.Definition, "server")
	}
	if !selector {
		t.Error("the dashboard has no server variable (multi-value, with All)")
	}
	unlabelled := map[string]bool{"walship_archiver_backlog": true, "walship_dependency_up": true}
	metric := regexp.MustCompile(`\b(walship_[a-z_]+)(\{[^}]*\})?`)
	for _, p := range d.Panels {
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			for _, m := range metric.FindAllStringSubmatch(tg.Expr, -1) {
				if !unlabelled[m[1]] && !strings.Contains(m[2], `server=~"$server"`) {
					t.Errorf("panel %q: %s is not filtered by the server selector: %s", p.Title, m[1], tg.Expr)
				}
			}
		}
	}
}

// The alert rules load, and their unit tests (deploy/alerts_test.yml) make
// each alert fire on a failing series and stay silent on healthy ones.
func TestAlertRules(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Fatal("promtool not installed: scripts/deps.sh installs Debian's prometheus package")
	}
	for _, args := range [][]string{{"check", "rules", "alerts.yml"}, {"test", "rules", "alerts_test.yml"}} {
		cmd := exec.Command(promtool, args...)
		cmd.Dir = filepath.Join(repoRoot, "deploy")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("promtool %v: %v\n%s", args, err, out)
		}
	}
}
