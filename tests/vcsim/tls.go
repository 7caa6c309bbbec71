package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"strings"
	"time"
)

// newCertificate makes a fresh self-signed certificate for the loopback
// addresses.  A certificate per run (rather than the fixed one govmomi's test
// server ships) means a client that pinned an old thumbprint fails, as it
// would against a reinstalled vCenter.
//
// It is marked as a CA so that a client may also trust it as its own root
// (Python's ssl with cafile=, strict OpenSSL verification).
func newCertificate() (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return tls.Certificate{}, err
	}
	keyID := sha1.Sum(elliptic.Marshal(key.Curve, key.X, key.Y)) // #nosec: an identifier, not a signature
	now := time.Now()
	template := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "127.0.0.1", Organization: []string{"sna testbed vCenter simulator"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.AddDate(5, 0, 0),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		SubjectKeyId:          keyID[:],
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		DNSNames:              []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, template, template, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

// thumbprint formats a digest as vSphere shows certificate thumbprints:
// upper-case hex pairs joined by colons.
func thumbprint(sum []byte) string {
	parts := make([]string, len(sum))
	for i, b := range sum {
		parts[i] = fmt.Sprintf("%02X", b)
	}
	return strings.Join(parts, ":")
}

func thumbprintSHA1(der []byte) string {
	sum := sha1.Sum(der) // #nosec: vSphere's thumbprint format is SHA-1
	return thumbprint(sum[:])
}

func thumbprintSHA256(der []byte) string {
	sum := sha256.Sum256(der)
	return thumbprint(sum[:])
}

// writeCertificatePEM writes the certificate (not the key) for clients that
// want to verify the server against it.
func writeCertificatePEM(path string, der []byte) error {
	data := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	return writeFileAtomic(path, data, 0o644)
}

// writeFileAtomic writes data to a temporary file beside path and renames it
// into place, so a reader polling for path never sees half a file.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, mode); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
