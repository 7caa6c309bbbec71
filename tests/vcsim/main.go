// Command vcsim-cbt serves a vCenter simulator (govmomi's vcsim, as Debian
// packages it) with changed block tracking, for sna's tests.
//
// It builds the inventory a testbed spec describes (VMs with disks on SCSI,
// SATA, NVMe or IDE controllers, each disk's bytes in a real -flat.vmdk under
// the datastore directory), serves the SDK over HTTPS on a loopback address,
// answers VirtualMachine.QueryChangedDiskAreas from the writes made through
// its /testbed/ control endpoint, and puts change IDs on disk backings at
// snapshot time.  See docs/testbed.md.
//
// Usage:
//
//	vcsim-cbt -spec SPEC.json -dir DATASTORE_DIR -info INFO.json [-l 127.0.0.1:0]
package main

import (
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	listen := flag.String("l", "127.0.0.1:0", "loopback `address` to serve on; port 0 picks a free one")
	specFile := flag.String("spec", "", "testbed spec `file` (JSON); without one, an empty inventory")
	dir := flag.String("dir", "", "`directory` backing the datastore (default: a temporary one, removed at exit)")
	infoFile := flag.String("info", "", "write the URL, credentials and inventory to this `file` (JSON) once serving")
	certFile := flag.String("cert", "", "write the server certificate (PEM) to this `file`")
	trace := flag.Bool("trace", false, "log SOAP requests and responses to stderr")
	flag.Parse()
	log.SetPrefix("vcsim-cbt: ")
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)

	// Signals are caught first, so a stop that arrives during start-up still
	// ends in the cleanup below.
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)

	spec, err := loadSpec(*specFile)
	if err != nil {
		fmt.Fprintln(os.Stderr, "vcsim-cbt:", err)
		os.Exit(2)
	}
	if err := checkLoopback(*listen); err != nil {
		fmt.Fprintln(os.Stderr, "vcsim-cbt:", err)
		os.Exit(2)
	}
	simulator.Trace = *trace

	datastoreDir := *dir
	if datastoreDir == "" {
		tmp, err := os.MkdirTemp("", "vcsim-cbt-")
		if err != nil {
			log.Fatal(err)
		}
		defer os.RemoveAll(tmp)
		datastoreDir = tmp
	}
	if datastoreDir, err = filepath.Abs(datastoreDir); err != nil {
		log.Fatal(err)
	}

	server, err := start(spec, *listen, datastoreDir, *infoFile, *certFile)
	if err != nil {
		log.Print(err)
		os.Exit(1)
	}
	sig := <-stop
	log.Printf("%s: stopping", sig)
	_ = server.Close()
}

// checkLoopback refuses other addresses: the control endpoint writes files
// and has no authentication.
func checkLoopback(address string) error {
	host, _, err := net.SplitHostPort(address)
	if err != nil {
		return err
	}
	if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
		return fmt.Errorf("-l %s: only loopback addresses are served", address)
	}
	return nil
}

// start builds the inventory and serves it; it returns once serving.
func start(spec *Spec, listen, datastoreDir, infoFile, certFile string) (*http.Server, error) {
	model := simulator.VPX()
	model.Datastore = 0 // the spec's datastore is mounted from datastoreDir below
	model.Machine = 0   // the spec's VMs replace the model's
	if err := model.Create(); err != nil {
		return nil, fmt.Errorf("creating the vCenter model: %v", err)
	}
	b, err := newBuilder(model, spec)
	if err != nil {
		return nil, err
	}
	refs, err := b.build(datastoreDir)
	if err != nil {
		return nil, err
	}

	t := newTracker(spec.CBT)
	simulator.Map.AddHandler(t)
	t.syncAll()

	cert, err := newCertificate()
	if err != nil {
		return nil, err
	}
	der := cert.Certificate[0]
	model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	model.Service.Listen = &url.URL{Host: "127.0.0.1:0", User: url.UserPassword(spec.VCenter.User, spec.VCenter.Password)}
	// NewServer builds the simulator's mux and finishes the TLS config, but
	// serves it directly; that server is closed at once and the mux is
	// served behind the front handler on the address asked for.
	probe := model.Service.NewServer()
	probe.Close()

	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, err
	}
	addr := ln.Addr().(*net.TCPAddr)
	hostPort := net.JoinHostPort(addr.IP.String(), strconv.Itoa(addr.Port))
	pointServiceAt(hostPort)

	vcenter := vcenterInfo{
		URL:              "https://" + hostPort + "/sdk",
		Host:             addr.IP.String(),
		Port:             addr.Port,
		User:             spec.VCenter.User,
		Thumbprint:       thumbprintSHA1(der),
		ThumbprintSHA256: thumbprintSHA256(der),
		Datacenter:       spec.Datacenter,
		Datastore:        spec.Datastore,
		DatastoreDir:     datastoreDir,
		ControlURL:       "https://" + hostPort + strings.TrimSuffix(controlPrefix, "/"),
	}
	order := map[string]int{}
	for i, ref := range refs {
		order[ref.Value] = i
	}
	ctl := &control{t: t, vcenter: vcenter, order: order}
	server := &http.Server{
		Handler:           &front{sdk: model.Service.ServeMux, control: ctl, t: t},
		ReadHeaderTimeout: time.Minute,
		ErrorLog:          log.New(os.Stderr, "vcsim-cbt http: ", log.LstdFlags),
	}
	go func() {
		if err := server.Serve(tls.NewListener(ln, model.Service.TLS)); err != http.ErrServerClosed {
			log.Fatalf("serving: %v", err)
		}
	}()

	if certFile != "" {
		if err := writeCertificatePEM(certFile, der); err != nil {
			return nil, err
		}
		vcenter.CertFile, _ = filepath.Abs(certFile)
		ctl.vcenter.CertFile = vcenter.CertFile
	}
	if infoFile != "" {
		inv := ctl.inventory()
		inv.VCenter = vcenter
		inv.VCenter.Password = spec.VCenter.Password
		data, err := json.MarshalIndent(inv, "", "  ")
		if err != nil {
			return nil, err
		}
		// 0600: it holds the password.
		if err := writeFileAtomic(infoFile, append(data, '\n'), 0o600); err != nil {
			return nil, err
		}
	}
	fmt.Printf("vcsim-cbt: serving %s (%d VMs, datastore %s)\n", vcenter.URL, len(refs), datastoreDir)
	return server, nil
}

// pointServiceAt makes the simulator hand out URLs of the address actually
// served rather than the probe server's.
func pointServiceAt(hostPort string) {
	simulator.Map.SessionManager().ServiceHostName = hostPort
	for _, setting := range simulator.Map.OptionManager().Setting {
		opt := setting.GetOptionValue()
		text, ok := opt.Value.(string)
		if !ok || !(strings.HasSuffix(opt.Key, ".uri") || opt.Key == "vcsim.server.url") {
			continue
		}
		if u, err := url.Parse(text); err == nil {
			u.Scheme, u.Host = "https", hostPort
			opt.Value = u.String()
		}
	}
}
