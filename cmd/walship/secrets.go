package main

import (
	"flag"
	"net/url"
	"regexp"
	"strings"
)

// Passwords given on the command line are visible to every user of the
// host (ps, /proc/<pid>/cmdline); `walship check` warns about them. The
// environment (WALSHIP_*, PGPASSWORD) and files (~/.pgpass) are readable
// only by the process's owner.

// pgKVPassword finds a password key in a key=value connection string.
var pgKVPassword = regexp.MustCompile(`(^|\s)password\s*=`)

// pgHasPassword reports whether a libpq connection string (URL or
// key=value) holds a password itself; PGPASSWORD and .pgpass do not count.
func pgHasPassword(conn string) bool {
	if strings.HasPrefix(conn, "postgres://") || strings.HasPrefix(conn, "postgresql://") {
		u, err := url.Parse(conn)
		if err != nil {
			// Unparsable: look for user:password@ by hand.
			rest := conn[strings.Index(conn, "://")+3:]
			if at := strings.LastIndex(rest, "@"); at >= 0 {
				return strings.Contains(rest[:at], ":")
			}
			return strings.Contains(conn, "password=")
		}
		if _, ok := u.User.Password(); ok {
			return true
		}
		return u.Query().Has("password")
	}
	return pgKVPassword.MatchString(conn)
}

// urlHasPassword reports whether any URL of a comma-separated list holds
// user:password@.
func urlHasPassword(urls string) bool {
	for _, s := range strings.Split(urls, ",") {
		if u, err := url.Parse(strings.TrimSpace(s)); err == nil {
			if _, ok := u.User.Password(); ok {
				return true
			}
		}
	}
	return false
}

// commandLineSecrets lists warnings for passwords given as command-line
// flags (not those from WALSHIP_* variables, which ps does not show).
func commandLineSecrets(fs *flag.FlagSet, c *config) []string {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var out []string
	if set["pg"] && pgHasPassword(c.PG) {
		out = append(out, "--pg carries a password, which every user of this host sees in ps: use PGPASSWORD, ~/.pgpass (PGPASSFILE) or WALSHIP_PG instead")
	}
	if set["nats"] && urlHasPassword(c.NATS) {
		out = append(out, "--nats carries a password, which every user of this host sees in ps: use WALSHIP_NATS instead")
	}
	return out
}
