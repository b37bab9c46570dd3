package kubecluster

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"

	"k8s.io/client-go/util/cert"
	"k8s.io/client-go/util/keyutil"
)

// certValidity is long enough for a lab left running, short enough that a
// leaked test CA is worthless soon.
const certValidity = 90 * 24 * time.Hour

// pki is where the control plane's keys and certificates are.
type pki struct{ dir string }

func (p pki) path(name string) string { return filepath.Join(p.dir, name) }

// CAFile is the cluster CA certificate; clients trust it.
func (s *Spec) CAFile() string { return s.pki().path("ca.crt") }

func (s *Spec) pki() pki { return pki{dir: filepath.Join(s.Dir, "pki")} }

// writePKI makes a CA, the API server's serving certificate (for host and
// the in-cluster names), an admin client certificate (group
// system:masters) and the service-account signing key. An existing CA is
// kept, so restarting a control plane on its directory keeps its clients'
// credentials valid.
func (p pki) write(host net.IP) error {
	if _, err := os.Stat(p.path("ca.crt")); err == nil {
		return nil
	}
	if err := os.MkdirAll(p.dir, 0o700); err != nil {
		return err
	}
	caKey, err := newKey()
	if err != nil {
		return err
	}
	ca, err := cert.NewSelfSignedCACert(cert.Config{CommonName: "flatnet-test-ca"}, caKey)
	if err != nil {
		return err
	}
	leaves := []struct {
		name string
		tmpl x509.Certificate
	}{
		{"apiserver", x509.Certificate{
			Subject:     pkix.Name{CommonName: "kube-apiserver"},
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
			IPAddresses: []net.IP{host, net.IPv4(127, 0, 0, 1), net.ParseIP(ServiceIP)},
			DNSNames:    []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		}},
		{"admin", x509.Certificate{
			Subject:     pkix.Name{CommonName: "flatnet-admin", Organization: []string{"system:masters"}},
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		}},
	}
	for _, l := range leaves {
		if err := p.writeLeaf(l.name, l.tmpl, ca, caKey); err != nil {
			return fmt.Errorf("%s certificate: %w", l.name, err)
		}
	}
	// Service-account tokens are signed with sa.key; the API server reads
	// the public half from the same file.
	saKey, err := newKey()
	if err != nil {
		return err
	}
	if err := writeKey(p.path("sa.key"), saKey); err != nil {
		return err
	}
	if err := writeKey(p.path("ca.key"), caKey); err != nil {
		return err
	}
	return writeCert(p.path("ca.crt"), ca) // last: its presence means "complete"
}

// writeClient makes a client certificate (and key) named name for user in
// groups, signed by the CA written earlier.
func (p pki) writeClient(name, user string, groups []string) error {
	ca, err := cert.CertsFromFile(p.path("ca.crt"))
	if err != nil {
		return err
	}
	key, err := keyutil.PrivateKeyFromFile(p.path("ca.key"))
	if err != nil {
		return err
	}
	signer, ok := key.(crypto.Signer)
	if !ok {
		return errors.New("CA key cannot sign")
	}
	return p.writeLeaf(name, x509.Certificate{
		Subject:     pkix.Name{CommonName: user, Organization: groups},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, ca[0], signer)
}

func (p pki) writeLeaf(name string, tmpl x509.Certificate, ca *x509.Certificate, caKey crypto.Signer) error {
	key, err := newKey()
	if err != nil {
		return err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return err
	}
	tmpl.SerialNumber = serial
	tmpl.NotBefore = time.Now().Add(-time.Minute)
	tmpl.NotAfter = time.Now().Add(certValidity)
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	der, err := x509.CreateCertificate(rand.Reader, &tmpl, ca, key.Public(), caKey)
	if err != nil {
		return err
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		return err
	}
	if err := writeKey(p.path(name+".key"), key); err != nil {
		return err
	}
	return writeCert(p.path(name+".crt"), c)
}

func newKey() (*ecdsa.PrivateKey, error) { return ecdsa.GenerateKey(elliptic.P256(), rand.Reader) }

func writeKey(path string, key crypto.PrivateKey) error {
	b, err := keyutil.MarshalPrivateKeyToPEM(key)
	if err != nil {
		return err
	}
	return keyutil.WriteKey(path, b)
}

func writeCert(path string, c *x509.Certificate) error {
	b, err := cert.EncodeCertificates(c)
	if err != nil {
		return err
	}
	if len(b) == 0 {
		return errors.New("empty certificate")
	}
	return os.WriteFile(path, b, 0o644)
}
