package testenv

import (
	"os"
	"path/filepath"
	"strconv"
)

// BaseBackupTar runs pg_basebackup -Ft -X none (base.tar, <oid>.tar per
// tablespace, backup_manifest) with extra args into a new directory, and
// returns it.
func (p *Postgres) BaseBackupTar(extra ...string) string {
	p.t.Helper()
	dir, err := os.MkdirTemp("", "walship-tarbackup-")
	if err != nil {
		p.t.Fatal(err)
	}
	p.t.Cleanup(func() { os.RemoveAll(dir) })
	p.chown(dir)
	out := filepath.Join(dir, "tar")
	args := append([]string{"-h", "127.0.0.1", "-p", strconv.Itoa(p.Port), "-U", "postgres", "-D", out, "-Ft", "-X", "none", "--no-sync"}, extra...)
	p.run("pg_basebackup", args...)
	return out
}

// OwnedDir is a new empty directory (mode 0700) under a temporary one, owned by the
// cluster's OS user (for tablespaces and restores).
func (p *Postgres) OwnedDir(name string) string {
	p.t.Helper()
	dir, err := os.MkdirTemp("", "walship-"+name+"-")
	if err != nil {
		p.t.Fatal(err)
	}
	p.t.Cleanup(func() { os.RemoveAll(dir) })
	p.chown(dir)
	os.Chmod(dir, 0o755)
	sub := filepath.Join(dir, name)
	if err := os.Mkdir(sub, 0o700); err != nil {
		p.t.Fatal(err)
	}
	p.chown(sub)
	return sub
}

// FromRestore wraps a data directory that a restore tool filled (not
// started): it hands dataDir and the extra directories (tablespaces) to
// the cluster's OS user and gives the cluster its own port and socket
// directory (dataDir's parent, which also holds server.log).
func (p *Postgres) FromRestore(dataDir string, dirs ...string) *Postgres {
	p.t.Helper()
	dir := filepath.Dir(dataDir)
	r := &Postgres{t: p.t, Bin: p.Bin, Dir: dir, DataDir: dataDir, Port: FreePort(p.t), cred: p.cred}
	for _, d := range append([]string{dir, dataDir}, dirs...) {
		filepath.Walk(d, func(path string, _ os.FileInfo, err error) error {
			if err == nil {
				r.chown(path)
			}
			return nil
		})
	}
	r.SetConf("port = "+strconv.Itoa(r.Port), "unix_socket_directories = '"+dir+"'", "primary_conninfo = ''")
	p.t.Cleanup(func() { r.Stop("immediate") })
	return r
}
