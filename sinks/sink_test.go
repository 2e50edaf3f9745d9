package sinks

import (
	"strings"
	"testing"
)

func TestLayouts(t *testing.T) {
	cases := []struct {
		layout    Layout
		file, ext string
		want      string
	}{
		{BarmanCloud{"backups/", "pg1"}, "000000010000000A000000FF", ".zst", "backups/pg1/wals/000000010000000A/000000010000000A000000FF.zst"},
		{BarmanCloud{"", "pg1"}, "00000002.history", ".gz", "pg1/wals/00000002.history.gz"},
		{BarmanCloud{"a/b", "pg1"}, "000000010000000000000003.partial", "", "a/b/pg1/wals/0000000100000000/000000010000000000000003.partial"},
		{WalG{"/wg/"}, "000000010000000A000000FF", ".zst", "wg/wal_005/000000010000000A000000FF.zst"},
		{WalG{""}, "00000002.history", "", "wal_005/00000002.history"},
	}
	for _, c := range cases {
		if got := c.layout.Key(c.file, c.ext); got != c.want {
			t.Errorf("%T.Key(%s, %s) = %s, want %s", c.layout, c.file, c.ext, got, c.want)
		}
	}
	if _, err := NewLayout("pgbackrest", "", "x"); err == nil {
		t.Error("unknown layout accepted")
	}
}

func TestMetadataRoundTrip(t *testing.T) {
	m := Metadata{SHA256: "ab", StartLSN: "0/1000000", EndLSN: "0/2000000", Timeline: 3, SystemID: "73", Codec: "zstd", RawSize: 16 << 20, Encryption: "age"}
	in := m.Map()
	upper := map[string]string{}
	for k, v := range in {
		upper[strings.ToUpper(k)] = v
	}
	if got := MetadataFromMap(upper); got != m {
		t.Errorf("round trip %+v, want %+v", got, m)
	}
}

func TestDestID(t *testing.T) {
	cases := []struct{ dest, endpoint, want string }{
		{"s3://b/p/", "", "s3://b/p"},
		{"s3://b//p/q", "", "s3://b/p/q"},
		{"s3://b", "", "s3://b"},
		{"s3://b/p", "http://User:Secret@127.0.0.1:7070/", "s3://b/p?endpoint=http://127.0.0.1:7070"},
		{"file:///srv/wal/", "", "file:///srv/wal"},
	}
	for _, c := range cases {
		got, err := DestID(c.dest, c.endpoint)
		if err != nil || got != c.want {
			t.Errorf("DestID(%q, %q) = %q, %v; want %q", c.dest, c.endpoint, got, err, c.want)
		}
	}
	for _, bad := range []string{"", "bucket", "s3:///p", "ftp://x/y", "file://"} {
		if _, err := DestID(bad, ""); err == nil {
			t.Errorf("DestID(%q) accepted", bad)
		}
	}
}
