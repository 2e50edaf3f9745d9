package main

import (
	"strings"
	"testing"
)

// pgConfUnquote reads a postgresql.conf quoted string as PostgreSQL's
// GUC_scanstr does: ” is a quote, a backslash escapes the next byte (\n,
// \t, ... as C escapes; any other byte stands for itself).
func pgConfUnquote(t *testing.T, s string) string {
	t.Helper()
	if len(s) < 2 || s[0] != '\'' || s[len(s)-1] != '\'' {
		t.Fatalf("not quoted: %s", s)
	}
	s = s[1 : len(s)-1]
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '\\' && i+1 < len(s):
			i++
			switch s[i] {
			case 'n':
				b.WriteByte('\n')
			case 't':
				b.WriteByte('\t')
			case 'b':
				b.WriteByte('\b')
			case 'f':
				b.WriteByte('\f')
			case 'r':
				b.WriteByte('\r')
			default:
				b.WriteByte(s[i])
			}
		case c == '\'' && i+1 < len(s) && s[i+1] == '\'':
			i++
			b.WriteByte('\'')
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}

// confQuote's value reads back as itself, backslashes included (a
// Windows-style or escaped path, \n in a restore point name).
func TestConfQuoteBackslash(t *testing.T) {
	for _, v := range []string{`a'b`, `C:\keys\age.txt`, `rp\name`, `x\\y`, `it's \n literal`} {
		if got := pgConfUnquote(t, confQuote(v)); got != v {
			t.Errorf("confQuote(%q) = %s reads back as %q", v, confQuote(v), got)
		}
	}
}

// recovery_end_command is expanded like restore_command (%r, %%): a '%'
// in the binary's path is doubled.
func TestRecoveryEndCommandPercent(t *testing.T) {
	bf := &backupRestoreFlags{}
	for _, s := range bf.settings("x", "/opt/wal%ship/walship") {
		if k, v, _ := strings.Cut(s, " = "); k == "recovery_end_command" {
			if got := pgExpand(pgConfUnquote(t, v), "F", "P"); got != "/opt/wal%ship/walship fetch --cleanup" {
				t.Fatalf("recovery_end_command %s runs as %q", v, got)
			}
			return
		}
	}
	t.Fatal("no recovery_end_command")
}
