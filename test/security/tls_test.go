package security

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/url"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/internal/e2e"
	"github.com/outboxd/outboxd/internal/pgtest"
)

// pki is a CA and a server certificate it signed, as PEM files.
type pki struct {
	dir                       string
	caFile, certFile, keyFile string
}

// newCA returns a self-signed CA certificate and key.
func newCA(t *testing.T, name string) (*x509.Certificate, *ecdsa.PrivateKey, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	require.NoError(t, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	return cert, key, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// newPKI writes a CA and a server certificate for 127.0.0.1 and localhost
// into a directory the server's user owns (the key must be 0600 and owned by
// the user postgres runs as). The directory is removed at cleanup, which
// runs after the server's (registered later) has stopped it.
func newPKI(t *testing.T) *pki {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", "outboxd-tls-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	ca, caKey, caPEM := newCA(t, "outboxd test CA")
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "localhost"},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	require.NoError(t, err)
	keyDER, err := x509.MarshalECPrivateKey(key)
	require.NoError(t, err)
	p := &pki{dir: dir, caFile: filepath.Join(dir, "ca.pem"), certFile: filepath.Join(dir, "server.crt"), keyFile: filepath.Join(dir, "server.key")}
	require.NoError(t, os.WriteFile(p.caFile, caPEM, 0o644))
	require.NoError(t, os.WriteFile(p.certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644))
	require.NoError(t, os.WriteFile(p.keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600))
	if os.Geteuid() == 0 {
		// Postgres runs as user postgres (pgserver): it must own its key.
		u, err := user.Lookup("postgres")
		require.NoError(t, err)
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		for _, f := range []string{dir, p.certFile, p.keyFile, p.caFile} {
			require.NoError(t, os.Chown(f, uid, gid))
		}
	}
	return p
}

// withTLS rewrites a pgtest URL to sslmode=verify-full with rootCA.
func withTLS(t *testing.T, raw, rootCA string) string {
	u, err := url.Parse(raw)
	require.NoError(t, err)
	q := u.Query()
	q.Set("sslmode", "verify-full")
	q.Set("sslrootcert", rootCA)
	u.RawQuery = q.Encode()
	return u.String()
}

// Postgres TLS: with sslmode=verify-full against a server whose certificate
// was made in the test, migrate and run work end to end and every outboxd
// connection (replication included) is encrypted; with the wrong CA both
// fail at once with an error that names certificate verification, exit 1, no
// crash loop.
func TestPostgresTLSVerifyFull(t *testing.T) {
	t.Parallel()
	p := newPKI(t)
	srv := pgtest.New(t, map[string]string{"ssl": "on", "ssl_cert_file": p.certFile, "ssl_key_file": p.keyFile})
	plain := srv.NewDatabase(t)
	tlsURL := withTLS(t, plain, p.caFile)
	slot := e2e.SlotName(plain)
	recv := e2e.NewReceiver(t)
	env := e2e.Env(tlsURL, slot, recv.URL, nil)

	code, out := e2e.RunCommand(t, env, "migrate")
	require.Equal(t, 0, code, out)
	d := e2e.StartDaemon(t, env)
	pool := e2e.Pool(t, plain)
	ids := e2e.Insert(t, pool, 10, 2, func(i int) int64 { return int64(i % 2) })
	recv.WaitAccepted(t, ids, time.Minute)
	var total, encrypted int
	require.NoError(t, pool.QueryRow(context.Background(), `SELECT count(*), count(*) FILTER (WHERE s.ssl)
FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = 'outboxd'`).Scan(&total, &encrypted))
	require.Positive(t, total)
	require.Equal(t, total, encrypted, "every outboxd connection uses TLS")
	var walsenderTLS bool
	require.NoError(t, pool.QueryRow(context.Background(), `SELECT s.ssl FROM pg_replication_slots r JOIN pg_stat_ssl s ON s.pid = r.active_pid WHERE r.slot_name = $1`, slot).Scan(&walsenderTLS))
	require.True(t, walsenderTLS, "the replication connection uses TLS")
	require.Equal(t, 0, d.Stop(30*time.Second))

	// The wrong CA: a clear error, exit 1, once.
	_, _, otherCA := newCA(t, "some other CA")
	wrong := filepath.Join(p.dir, "wrong-ca.pem")
	require.NoError(t, os.WriteFile(wrong, otherCA, 0o644))
	wrongEnv := e2e.Env(withTLS(t, plain, wrong), slot, recv.URL, nil)
	code, out = e2e.RunCommand(t, wrongEnv, "migrate")
	require.Equal(t, 1, code, out)
	requireCertError(t, out)

	begin := time.Now()
	d = e2e.StartDaemon(t, wrongEnv)
	code = d.Wait(time.Minute)
	log := d.Log()
	require.Equal(t, 1, code, log)
	requireCertError(t, log)
	require.Equal(t, 1, strings.Count(log, "outboxd starting"), "no crash loop")
	t.Logf("wrong CA: exit %d after %s: %s", code, time.Since(begin).Round(time.Millisecond), lastLine(log))
}

func requireCertError(t *testing.T, out string) {
	t.Helper()
	lower := strings.ToLower(out)
	require.True(t, strings.Contains(lower, "certificate") && (strings.Contains(lower, "verify") || strings.Contains(lower, "unknown authority")),
		"the error must say the certificate could not be verified:\n%s", out)
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}
