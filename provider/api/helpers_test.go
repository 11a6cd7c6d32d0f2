package api_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/nkp-dev/nkp/provider/api"
	"github.com/nkp-dev/nkp/provider/apiv1"
	"github.com/nkp-dev/nkp/provider/client"
	"github.com/nkp-dev/nkp/test/logbuf"
)

// served is an API server running under httptest with TLS, whichever provider it
// serves (the scripted fake in env, the real domain in realEnv): its address, its CA,
// an admin client and the server's log. The methods talk to it as clients do.
type served struct {
	srv    *httptest.Server
	api    *api.Server
	caCert *x509.Certificate
	admin  *client.Client
	logBuf *logbuf.Buffer
}

// serveTLS serves h with TLS under cert (api.TLSConfig, so client certificates are
// asked for) and closes the server at the end of the test.
func serveTLS(t *testing.T, h http.Handler, cert tls.Certificate) *httptest.Server {
	t.Helper()
	srv := httptest.NewUnstartedServer(h)
	srv.TLS = api.TLSConfig(cert)
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // handshake refusals are part of the tests
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv
}

// client is a provider client presenting cert, closed at the end of the test.
func (e *served) client(t *testing.T, cert tls.Certificate) *client.Client {
	t.Helper()
	c, err := client.New(client.Config{URL: e.srv.URL, CA: e.caCert, Certificate: cert})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// join enrolls a host through the API; it returns the host's client, certificate and ID.
func (e *served) join(t *testing.T, name string) (*client.Client, tls.Certificate, string) {
	t.Helper()
	ctx := context.Background()
	tok, err := e.admin.CreateToken(ctx, time.Minute)
	if err != nil {
		t.Fatalf("token: %v", err)
	}
	enr, err := client.Join(ctx, client.JoinRequest{URL: e.srv.URL, Token: tok.Secret, CAHash: tok.CAHash, Hostname: name, Key: newKey(t)})
	if err != nil {
		t.Fatalf("join: %v", err)
	}
	return e.client(t, enr.Certificate), enr.Certificate, enr.HostID
}

// rawClient sends requests with an arbitrary client certificate (or none).
func (e *served) rawClient(certs ...tls.Certificate) *http.Client {
	roots := x509.NewCertPool()
	roots.AddCert(e.caCert)
	return &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{
		RootCAs: roots, Certificates: certs, MinVersion: tls.VersionTLS13,
	}}}
}

// do sends one request with hc and returns the status, the decoded error body (when the
// status is 400 or more; a body that is not JSON fails the test) and the raw body.
func (e *served) do(t *testing.T, hc *http.Client, method, path, body string) (int, apiv1.ErrorBody, string) {
	t.Helper()
	req, err := http.NewRequest(method, e.srv.URL+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	var eb apiv1.ErrorBody
	if resp.StatusCode >= 400 {
		if err := json.Unmarshal(data, &eb); err != nil {
			t.Fatalf("%s %s: error body %q is not JSON: %v", method, path, data, err)
		}
	}
	return resp.StatusCode, eb, string(data)
}

// newKey is a fresh P-256 key.
func newKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// csrFor is a certificate request signed by key (the CA sets the names).
func csrFor(t *testing.T, key crypto.Signer) []byte {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "x"}}, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}
