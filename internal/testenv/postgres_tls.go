package testenv

import (
	"os"
	"path/filepath"
	"strings"
)

// EnableTLS turns on ssl with a server certificate from ca for the names
// hosts, trusts ca for client certificates (ssl_ca_file), puts hba lines
// first in pg_hba.conf, and restarts the server.
func (p *Postgres) EnableTLS(ca *CA, hosts []string, hba ...string) {
	p.t.Helper()
	cert, key := ca.Issue("pg-server", hosts, false)
	for src, dst := range map[string]string{cert: "server.crt", key: "server.key", ca.CAPath: "root.crt"} {
		b, err := os.ReadFile(src)
		if err != nil {
			p.t.Fatal(err)
		}
		p.writeFile(dst, string(b)) // 0600, owned by the server's user
	}
	p.SetConf("ssl = on", "ssl_cert_file = 'server.crt'", "ssl_key_file = 'server.key'", "ssl_ca_file = 'root.crt'")
	if len(hba) > 0 {
		old, err := os.ReadFile(filepath.Join(p.DataDir, "pg_hba.conf"))
		if err != nil {
			p.t.Fatal(err)
		}
		p.writeFile("pg_hba.conf", strings.Join(hba, "\n")+"\n"+string(old))
	}
	p.Stop("fast")
	p.Start()
}
