package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"gopkg.in/yaml.v3"

	"github.com/walship/walship/pipeline"
)

// A configuration file (--config walship.yml) lists many PostgreSQL servers
// for one receive or run process. Its keys are the command's flag names
// without dashes, and every value is applied through the same flag.FlagSet
// as the command line, so a key and a flag can never mean different
// things. Precedence, highest first: the command line, the server's entry,
// the file's top level, WALSHIP_<FLAG> in the environment, the default.

// serverKeys are the settings a server entry may hold; all but
// serverOnlyKeys may also be given at the top level, as every server's
// default. Every other key is top-level only: it is the process's (one
// NATS connection, one metrics endpoint, one archiver pool).
var serverKeys = map[string]bool{
	"pg": true, "server": true, "slot": true, "application-name": true, "create-slot": true,
	"spool-dir": true, "status-interval": true, "republish-after": true, "standby": true,
	"safe-wal-size-warn": true, "synchronous": true, "partial-interval": true,
}

// serverOnlyKeys name one server each: never a default, never a flag
// beside --config.
var serverOnlyKeys = map[string]bool{"pg": true, "server": true}

// serverConfig is one server of a configuration file.
type serverConfig struct {
	*config
	line int // of its entry
}

// fileValue is one key of the file, with its value(s) after ${VAR}
// expansion.
type fileValue struct {
	key    string
	values []string // several only for a list, which only repeatable flags take
	list   bool
	line   int
}

type fileServer struct {
	line   int
	values []fileValue
}

// configFile is a parsed walship.yml, keys not yet checked.
type configFile struct {
	path    string
	top     []fileValue
	servers []fileServer
}

// addConfigFlag registers --config.
func addConfigFlag(fs *flag.FlagSet, path *string) {
	fs.StringVar(path, "config", "", "YAML file listing many PostgreSQL servers for this one process (keys: flag names; see README, 'Many servers in one process')")
}

// setupServers is setup for the commands that take --config (run,
// receive). Without --config, servers is nil and c is the one server's
// configuration; with it, c holds the process's settings (NATS, metrics,
// destination, archivers) and servers one configuration per server.
func setupServers(name string, args []string, groups flagGroup, stdout io.Writer) (*config, []serverConfig, *slog.Logger, *prometheus.Registry, error) {
	c, servers, err := parseServers(name, args, groups, stdout)
	if err != nil {
		return nil, nil, nil, nil, err
	}
	log, reg, err := newLogging(c)
	if err != nil {
		return nil, nil, nil, nil, err
	}
	return c, servers, log, reg, nil
}

// parseServers parses the command line and, when it names one, the
// configuration file.
func parseServers(name string, args []string, groups flagGroup, stdout io.Writer) (*config, []serverConfig, error) {
	// build parses the command line over values applied first by apply.
	build := func(apply func(fs *flag.FlagSet) error) (*config, *flag.FlagSet, string, error) {
		c := &config{}
		fs := newFlagSet(name, c, groups)
		var path string
		addConfigFlag(fs, &path)
		if apply != nil {
			if err := apply(fs); err != nil {
				return nil, nil, "", err
			}
		}
		rest, err := parse(fs, args)
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprintf(stdout, "Usage: walship %s [flags]\n\n%s", name, usageOf(fs))
			return nil, nil, "", err
		}
		if err != nil {
			return nil, nil, "", err
		}
		if len(rest) > 0 {
			return nil, nil, "", fmt.Errorf("%w: unexpected argument %q", errUsage, rest[0])
		}
		return c, fs, path, nil
	}
	c, fs, path, err := build(nil)
	if err != nil {
		return nil, nil, err
	}
	if path == "" {
		return c, nil, c.validate(groups)
	}
	var bad error
	fs.Visit(func(f *flag.Flag) { // the command line only: parse sets the environment's without marking them
		if serverOnlyKeys[f.Name] && bad == nil {
			bad = fmt.Errorf("%w: --%s cannot be given with --config: give each server's %s in its entry under servers:", errUsage, f.Name, f.Name)
		}
	})
	if bad != nil {
		return nil, nil, bad
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: --config: %v", errUsage, err)
	}
	file, err := parseConfigFile(path, data)
	if err != nil {
		return nil, nil, err
	}
	if err := file.checkKeys(fs, name); err != nil {
		return nil, nil, err
	}
	applyAll := func(vals ...[]fileValue) func(*flag.FlagSet) error {
		return func(fs *flag.FlagSet) error {
			for _, vs := range vals {
				for _, v := range vs {
					for _, s := range v.values {
						if err := fs.Set(v.key, s); err != nil {
							return file.errorf(v.line, "%s: invalid value %q: %v", v.key, s, setError(fs.Lookup(v.key), err))
						}
					}
				}
			}
			return nil
		}
	}
	if c, _, _, err = build(applyAll(file.top)); err != nil {
		return nil, nil, err
	}
	if err := c.validate(groups); err != nil {
		return nil, nil, file.located(err, file.top, 0)
	}
	servers := make([]serverConfig, 0, len(file.servers))
	for _, s := range file.servers {
		sc, _, _, err := build(applyAll(file.top, s.values))
		if err != nil {
			return nil, nil, err
		}
		if err := sc.validate(groups); err != nil {
			return nil, nil, file.located(err, s.values, s.line)
		}
		servers = append(servers, serverConfig{config: sc, line: s.line})
	}
	if err := file.checkServers(servers); err != nil {
		return nil, nil, err
	}
	return c, servers, nil
}

// errorf is a usage error at a line of the file.
func (f *configFile) errorf(line int, format string, args ...any) error {
	return fmt.Errorf("%w: %s:%d: %s", errUsage, f.path, line, fmt.Sprintf(format, args...))
}

var flagInErr = regexp.MustCompile(`--([a-z0-9-]+)`)

// located puts the line of the key a validation error names in front of
// it: the key's own line when the file gives it, else def (0: none).
func (f *configFile) located(err error, vals []fileValue, def int) error {
	line := def
	if m := flagInErr.FindStringSubmatch(err.Error()); m != nil {
		for _, v := range append(append([]fileValue(nil), f.top...), vals...) {
			if v.key == m[1] {
				line = v.line
			}
		}
	}
	if line == 0 {
		return fmt.Errorf("%w: %s: %s", errUsage, f.path, trimUsage(err))
	}
	return f.errorf(line, "%s", trimUsage(err))
}

// checkKeys refuses keys that are no flag of the command, and keys in the
// wrong place.
func (f *configFile) checkKeys(fs *flag.FlagSet, cmd string) error {
	check := func(v fileValue, inServer bool) error {
		fl := fs.Lookup(v.key)
		switch {
		case v.key == "config":
			return f.errorf(v.line, "config: a configuration file cannot name another")
		case fl == nil:
			return f.errorf(v.line, "unknown key %q: keys are the flags of 'walship %s' without the dashes (see 'walship %s -h')", v.key, cmd, cmd)
		case inServer && !serverKeys[v.key]:
			return f.errorf(v.line, "%s is a setting of the whole process, not of one server: move it to the top level", v.key)
		case !inServer && serverOnlyKeys[v.key]:
			return f.errorf(v.line, "%s names one server: give it in each entry under servers:, not at the top level", v.key)
		case v.list && !repeatable(fl):
			return f.errorf(v.line, "%s takes one value, not a list", v.key)
		}
		return nil
	}
	for _, v := range f.top {
		if err := check(v, false); err != nil {
			return err
		}
	}
	for _, s := range f.servers {
		for _, v := range s.values {
			if err := check(v, true); err != nil {
				return err
			}
		}
		for _, k := range []string{"server", "pg"} {
			if !hasKey(s.values, k) {
				return f.errorf(s.line, "this server has no %s: every entry under servers: needs server (its name) and pg (its connection string)", k)
			}
		}
	}
	return nil
}

func hasKey(vals []fileValue, key string) bool {
	for _, v := range vals {
		if v.key == key {
			return true
		}
	}
	return false
}

// repeatable reports whether a flag takes several values (--encrypt-recipient).
func repeatable(fl *flag.Flag) bool {
	_, ok := fl.Value.(*recipientList)
	return ok
}

// checkServers refuses what cannot work in one process: two servers of
// one name (their subjects, keys and metrics would mix), two spools one
// inside the other, two entries streaming the same slot.
func (f *configFile) checkServers(servers []serverConfig) error {
	for i, s := range servers {
		if err := pipeline.ValidServerName(s.Server); err != nil {
			return f.errorf(lineOf(f.servers[i].values, "server", s.line), "server: %v", err)
		}
		for j := range i {
			o := servers[j]
			if o.Server == s.Server {
				return f.errorf(lineOf(f.servers[i].values, "server", s.line), "server %q is listed twice (first on line %d): give each server its own name", s.Server, o.line)
			}
			a, b := serverSpool(s.config), serverSpool(o.config)
			if within(a, b) || within(b, a) {
				return f.errorf(lineOf(f.servers[i].values, "spool-dir", s.line),
					"server %q spools in %s, which overlaps server %q's %s (line %d): give each server its own spool directory", s.Server, a, o.Server, b, o.line)
			}
			if s.PG == o.PG && s.Slot == o.Slot {
				return f.errorf(lineOf(f.servers[i].values, "pg", s.line), "server %q has the same pg and slot as server %q (line %d): a slot takes one receiver", s.Server, o.Server, o.line)
			}
		}
	}
	return nil
}

// serverSpool is the directory a server's receiver spools in: its name
// under --spool-dir (default <data-dir>/spool).
func serverSpool(c *config) string {
	spool := c.SpoolDir
	if spool == "" {
		spool = filepath.Join(c.DataDir, "spool")
	}
	return filepath.Join(absPath(spool), c.Server)
}

// within reports whether path a is dir or inside it.
func within(a, dir string) bool {
	rel, err := filepath.Rel(dir, a)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, ".."+string(filepath.Separator))
}

func lineOf(vals []fileValue, key string, def int) int {
	for _, v := range vals {
		if v.key == key {
			return v.line
		}
	}
	return def
}

var yamlLine = regexp.MustCompile(`^yaml: line (\d+): (.*)$`)

// parseConfigFile reads the file's shape: a mapping of scalar (or, for
// repeatable flags, list) values, and servers: a list of such mappings.
// ${VAR} in a value is replaced by the environment variable, which must be
// set; $$ is a literal $.
func parseConfigFile(path string, data []byte) (*configFile, error) {
	f := &configFile{path: path}
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		msg := strings.ReplaceAll(err.Error(), "\n", "; ")
		if m := yamlLine.FindStringSubmatch(msg); m != nil {
			n, _ := strconv.Atoi(m[1])
			return nil, f.errorf(n, "%s", m[2])
		}
		return nil, fmt.Errorf("%w: %s: %s", errUsage, path, msg)
	}
	if len(doc.Content) == 0 {
		return nil, fmt.Errorf("%w: %s: the file is empty: list the servers under servers:", errUsage, path)
	}
	root := doc.Content[0]
	if root.Kind != yaml.MappingNode {
		return nil, f.errorf(root.Line, "the file must be a mapping of settings, with the servers under servers:")
	}
	var serversNode *yaml.Node
	var err error
	f.top, err = f.mapping(root, func(k, v *yaml.Node) bool {
		if k.Value != "servers" {
			return false
		}
		serversNode = v
		return true
	})
	if err != nil {
		return nil, err
	}
	if serversNode == nil {
		return nil, f.errorf(root.Line, "no servers: list each PostgreSQL server under servers:")
	}
	if serversNode.Kind != yaml.SequenceNode || len(serversNode.Content) == 0 {
		return nil, f.errorf(serversNode.Line, "servers: must be a list of servers (- server: name, pg: connection string)")
	}
	for _, n := range serversNode.Content {
		if n.Kind != yaml.MappingNode {
			return nil, f.errorf(n.Line, "each entry under servers: must be a mapping (server: name, pg: connection string, ...)")
		}
		vals, err := f.mapping(n, nil)
		if err != nil {
			return nil, err
		}
		f.servers = append(f.servers, fileServer{line: n.Line, values: vals})
	}
	return f, nil
}

// mapping reads a mapping's keys and values; special takes the keys it
// handles itself.
func (f *configFile) mapping(n *yaml.Node, special func(k, v *yaml.Node) bool) ([]fileValue, error) {
	var out []fileValue
	seen := map[string]int{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		if k.Kind != yaml.ScalarNode {
			return nil, f.errorf(k.Line, "keys must be flag names")
		}
		if first, dup := seen[k.Value]; dup {
			return nil, f.errorf(k.Line, "%s is given twice (first on line %d)", k.Value, first)
		}
		seen[k.Value] = k.Line
		if special != nil && special(k, v) {
			continue
		}
		if v.Kind == yaml.AliasNode {
			v = v.Alias
		}
		fv := fileValue{key: k.Value, line: k.Line}
		switch {
		case v.Kind == yaml.ScalarNode && v.Tag == "!!null":
			return nil, f.errorf(k.Line, "%s has no value (write \"\" for an empty one)", k.Value)
		case v.Kind == yaml.ScalarNode:
			fv.values = []string{v.Value}
		case v.Kind == yaml.SequenceNode:
			fv.list = true
			for _, e := range v.Content {
				if e.Kind != yaml.ScalarNode {
					return nil, f.errorf(e.Line, "%s: a list of plain values is expected", k.Value)
				}
				fv.values = append(fv.values, e.Value)
			}
		default:
			return nil, f.errorf(k.Line, "%s: a value is expected, not a mapping", k.Value)
		}
		for j, s := range fv.values {
			x, err := expandEnv(s, os.LookupEnv)
			if err != nil {
				return nil, f.errorf(k.Line, "%s: %v", k.Value, err)
			}
			fv.values[j] = x
		}
		out = append(out, fv)
	}
	return out, nil
}

var envVarName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// expandEnv replaces ${VAR} with the variable's value and $$ with $. An
// unset variable is an error naming it: an empty password or URL put in
// silently is a bad default. A $ before anything else stays as it is.
func expandEnv(s string, lookup func(string) (string, bool)) (string, error) {
	if !strings.Contains(s, "$") {
		return s, nil
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '$' || i+1 == len(s) {
			b.WriteByte(s[i])
			continue
		}
		switch s[i+1] {
		case '$':
			b.WriteByte('$')
			i++
		case '{':
			end := strings.IndexByte(s[i+2:], '}')
			if end < 0 {
				return "", errors.New("${ without its closing }")
			}
			name := s[i+2 : i+2+end]
			if !envVarName.MatchString(name) {
				return "", errors.New("a ${...} that does not name an environment variable (write $$ for a literal $)")
			}
			v, ok := lookup(name)
			if !ok {
				return "", fmt.Errorf("${%s}: the environment variable %s is not set", name, name)
			}
			b.WriteString(v)
			i += 2 + end
		default:
			b.WriteByte('$')
		}
	}
	return b.String(), nil
}

// setError explains a value a flag refused.
func setError(fl *flag.Flag, err error) error {
	if b, ok := fl.Value.(interface{ IsBoolFlag() bool }); ok && b.IsBoolFlag() {
		return errors.New("use true or false")
	}
	if err.Error() == "parse error" { // flag's numeric values
		return errors.New("not a number")
	}
	return err
}
