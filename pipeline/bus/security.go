package bus

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"

	"github.com/nats-io/nats.go"
)

// ErrMisconfigured marks a connection failure that waiting cannot fix:
// an untrusted server certificate, a refused client certificate, wrong
// credentials. Unavailable is false for it.
var ErrMisconfigured = errors.New("nats misconfigured")

// explainConnError turns a TLS or authentication failure into one line
// that names the flag to fix, wrapping ErrMisconfigured and the cause; any
// other error is returned unchanged. No credential is part of the text.
func explainConnError(url string, err error) error {
	if err == nil {
		return nil
	}
	var (
		unknown  x509.UnknownAuthorityError
		hostname x509.HostnameError
		verify   *tls.CertificateVerificationError
		alert    tls.AlertError
	)
	where := redact(url)
	msg := ""
	switch {
	case errors.As(err, &hostname):
		msg = fmt.Sprintf("NATS at %s: TLS: the server's certificate is not valid for this host (%v): connect with a host name the certificate names", where, hostname.Error())
	case errors.As(err, &unknown):
		msg = fmt.Sprintf("NATS at %s: TLS: the server's certificate is signed by an authority walship does not trust: give that CA's certificate with --nats-tls-ca", where)
	case errors.As(err, &verify):
		msg = fmt.Sprintf("NATS at %s: TLS: cannot verify the server's certificate (%v): check --nats-tls-ca", where, verify.Err)
	case errors.As(err, &alert), errors.Is(err, nats.ErrTLS) && strings.Contains(err.Error(), "certificate"):
		msg = fmt.Sprintf("NATS at %s: TLS handshake refused (%v): the server may require a client certificate: give --nats-tls-cert and --nats-tls-key", where, tlsReason(err))
	case errors.Is(err, nats.ErrSecureConnRequired):
		msg = fmt.Sprintf("NATS at %s requires TLS: give --nats-tls-ca (and use a tls:// URL)", where)
	case errors.Is(err, nats.ErrSecureConnWanted):
		msg = fmt.Sprintf("NATS at %s does not offer TLS but TLS was asked for: drop the --nats-tls-* flags or enable TLS on the server", where)
	case errors.Is(err, nats.ErrTLS):
		msg = fmt.Sprintf("NATS at %s: TLS handshake failed (%v): check --nats-tls-ca, --nats-tls-cert and --nats-tls-key", where, tlsReason(err))
	case errors.Is(err, nats.ErrAuthorization):
		msg = fmt.Sprintf("NATS at %s refused walship's credentials (authorization violation): check the user and password (--nats-user, --nats-password or WALSHIP_NATS_PASSWORD, or in the URL), the --nats-nkey seed, or the --nats-creds file (its user may be revoked, or its account unknown to the server)", where)
	case errors.Is(err, nats.ErrAuthExpired), errors.Is(err, nats.ErrAuthRevoked), errors.Is(err, nats.ErrAccountAuthExpired):
		msg = fmt.Sprintf("NATS at %s: %v: renew the credentials in --nats-creds", where, err)
	default:
		return err
	}
	return &misconfigured{msg: msg, err: err}
}

// misconfigured is ErrMisconfigured with its own text.
type misconfigured struct {
	msg string
	err error
}

func (e *misconfigured) Error() string        { return e.msg }
func (e *misconfigured) Unwrap() error        { return e.err }
func (e *misconfigured) Is(target error) bool { return target == ErrMisconfigured }

// tlsReason is the text after the last "tls: " of err, on one line.
func tlsReason(err error) string {
	s := err.Error()
	if i := strings.LastIndex(s, "tls: "); i >= 0 {
		s = s[i:]
	}
	return strings.Join(strings.Fields(s), " ")
}

// Permission reports whether err is NATS refusing a publish or subscribe
// that the connection's permissions do not allow.
func Permission(err error) bool {
	return err != nil && (errors.Is(err, nats.ErrPermissionViolation) || strings.Contains(strings.ToLower(err.Error()), "permissions violation"))
}
