package receiver

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
)

// explainTLSError turns a TLS failure while connecting to PostgreSQL into
// one line that says which libpq setting to fix, or returns nil when err is
// not one. These are misconfigurations, not outages: they are fatal.
func explainTLSError(cfg *pgconn.Config, where string, err error) error {
	var (
		unknown  x509.UnknownAuthorityError
		hostname x509.HostnameError
		invalid  x509.CertificateInvalidError
		verify   *tls.CertificateVerificationError
	)
	switch {
	case errors.As(err, &hostname):
		return wrapFatal(err, "PostgreSQL at %s: TLS: the server's certificate is not valid for host %q (%v): connect with a host name the certificate names, or use sslmode=verify-ca to check the CA only",
			where, cfg.Host, hostname.Error())
	case errors.As(err, &unknown):
		return wrapFatal(err, "PostgreSQL at %s: TLS: the server's certificate is signed by an authority walship does not trust: give that CA's certificate with sslrootcert=FILE in --pg (or PGSSLROOTCERT)", where)
	case errors.As(err, &invalid):
		return wrapFatal(err, "PostgreSQL at %s: TLS: the server's certificate is invalid (%v): renew it, or check sslrootcert in --pg (or PGSSLROOTCERT)", where, invalid.Error())
	case errors.As(err, &verify):
		return wrapFatal(err, "PostgreSQL at %s: TLS: cannot verify the server's certificate (%v): check sslrootcert in --pg (or PGSSLROOTCERT)", where, verify.Err)
	}
	msg := err.Error()
	switch {
	case strings.Contains(msg, "server refused TLS connection"):
		return wrapFatal(err, "PostgreSQL at %s does not accept TLS connections (ssl = off) but --pg asks for sslmode=%s: set ssl = on with a certificate in postgresql.conf, or change sslmode", where, sslModeOf(cfg))
	case strings.Contains(msg, "tls error") || strings.Contains(msg, "tls: "):
		return wrapFatal(err, "PostgreSQL at %s: TLS handshake failed (%s): check sslmode, sslrootcert, sslcert and sslkey in --pg (or PGSSL* variables)", where, tlsReason(msg))
	}
	return nil
}

// explainCertAuthError explains PostgreSQL refusing a client certificate
// (pg_hba.conf "cert" or clientcert=verify-full), or nil.
func explainCertAuthError(cfg *pgconn.Config, where string, pgErr *pgconn.PgError) error {
	if pgErr.Code != "28000" || !strings.Contains(pgErr.Message, "certificate") {
		return nil
	}
	return wrapFatal(pgErr, "PostgreSQL at %s refused the client certificate for user %q (%s): give sslcert=FILE and sslkey=FILE in --pg (or PGSSLCERT, PGSSLKEY), signed by a CA in the server's ssl_ca_file, with the user name as its common name",
		where, cfg.User, pgErr.Message)
}

// sslModeOf is the sslmode asked for, as far as the parsed config shows.
func sslModeOf(cfg *pgconn.Config) string {
	if cfg.TLSConfig == nil {
		return "disable"
	}
	if cfg.TLSConfig.InsecureSkipVerify && cfg.TLSConfig.VerifyPeerCertificate == nil {
		return "require"
	}
	if cfg.TLSConfig.ServerName != "" {
		return "verify-full"
	}
	return "verify-ca"
}

// tlsReason is the part of a pgconn TLS error after its last "tls: ", on
// one line, without the connection summary that precedes it.
func tlsReason(msg string) string {
	if i := strings.LastIndex(msg, "tls: "); i >= 0 {
		msg = msg[i:]
	}
	return strings.Join(strings.Fields(msg), " ")
}

// tlsSettingReason is pgconn's reason for refusing TLS settings, without
// the connection string it quotes.
func tlsSettingReason(err error) string {
	msg := err.Error()
	if i := strings.Index(msg, "failed to configure TLS"); i >= 0 {
		msg = msg[i:]
	}
	return strings.Join(strings.Fields(msg), " ")
}
