package main

// The HTTP front: every request passes here before the simulator's own mux.
//
// Why it exists: the simulator dispatches a SOAP call by looking the _this
// moref up in its registry and calling the method of that name on the Go
// object by reflection.  VirtualMachine has no QueryChangedDiskAreas, and it
// cannot be given one: wrapping the VM object breaks either the property
// collector or the many `.(*simulator.VirtualMachine)` assertions in the
// simulator.  So QueryChangedDiskAreas calls are pointed, by rewriting the
// type of _this, at a small proxy object registered under the VM's moref
// value (cbtProxy in cbt.go).  The simulator still does the session check,
// the locking and the SOAP encoding.
//
// The front also turns panics of the simulator into SOAP faults (the stock
// property collector's Fetch panics on unset properties such as vm.snapshot,
// which pyVmomi reads with Fetch), and reconciles the tracker after calls
// that change a VM's disks.

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"io"
	"log"
	"net/http"
	"regexp"
	"strings"
)

type front struct {
	sdk     http.Handler // the simulator's mux
	control http.Handler
	t       *tracker
}

// syncAfter lists the methods after which VMs' disks may have changed.
var syncAfter = map[string]bool{
	"ReconfigVM_Task": true,
	"CreateVM_Task":   true,
	"CloneVM_Task":    true,
	"RelocateVM_Task": true,
	"RegisterVM_Task": true,
}

// soapCall is what the front needs to know of a SOAP request.
type soapCall struct {
	method   string // local name of the first element in the Body
	this     string // the _this moref value
	thisType string
}

// sniff reads the method and _this of a SOAP request without decoding it.
func sniff(body []byte) soapCall {
	var call soapCall
	dec := xml.NewDecoder(bytes.NewReader(body))
	inBody, inThis := false, false
	for {
		tok, err := dec.Token()
		if err != nil {
			return call
		}
		switch el := tok.(type) {
		case xml.StartElement:
			switch {
			case !inBody && el.Name.Local == "Body":
				inBody = true
			case inBody && call.method == "":
				call.method = el.Name.Local
			case call.method != "" && el.Name.Local == "_this":
				inThis = true
				for _, a := range el.Attr {
					if a.Name.Local == "type" {
						call.thisType = a.Value
					}
				}
			}
		case xml.CharData:
			if inThis {
				call.this += strings.TrimSpace(string(el))
			}
		case xml.EndElement:
			if inThis {
				return call
			}
		}
	}
}

var thisVMType = regexp.MustCompile(`(<_this\b[^>]*\btype=")VirtualMachine(")`)

// retarget points a request's _this at the VM's CBT proxy.
func retarget(body []byte) []byte {
	done := false
	return thisVMType.ReplaceAllFunc(body, func(m []byte) []byte {
		if done {
			return m
		}
		done = true
		return thisVMType.ReplaceAll(m, []byte("${1}"+proxyType+"${2}"))
	})
}

// watchWriter remembers whether the response has started.
type watchWriter struct {
	http.ResponseWriter
	started bool
}

func (w *watchWriter) WriteHeader(status int) {
	w.started = true
	w.ResponseWriter.WriteHeader(status)
}

func (w *watchWriter) Write(b []byte) (int, error) {
	w.started = true
	return w.ResponseWriter.Write(b)
}

func (f *front) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if strings.HasPrefix(r.URL.Path, controlPrefix) {
		f.control.ServeHTTP(w, r)
		return
	}
	if r.Method != http.MethodPost || !strings.HasPrefix(r.URL.Path, "/sdk") {
		f.sdk.ServeHTTP(w, r)
		return
	}
	body, err := io.ReadAll(r.Body)
	_ = r.Body.Close()
	if err != nil {
		http.Error(w, "reading the request: "+err.Error(), http.StatusBadRequest)
		return
	}
	call := sniff(body)
	restore := func() {}
	switch {
	case call.method == "QueryChangedDiskAreas" && call.thisType == "VirtualMachine":
		f.t.ensureProxy(call.this)
		body = retarget(body)
	case call.method == "CloneVM_Task":
		restore = protectCloneSource(call.this)
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.ContentLength = int64(len(body))

	out := &watchWriter{ResponseWriter: w}
	func() {
		// The simulator releases its locks with defer, and writes nothing
		// before a method returns, so a panic can be answered cleanly.
		defer func() {
			if p := recover(); p != nil {
				if out.started {
					log.Printf("%s panicked after answering: %v", call.method, p)
					return
				}
				if call.method == "Fetch" {
					// An unset property: pyVmomi reads an empty answer as None.
					writeSOAP(w, http.StatusOK, `<FetchResponse xmlns="urn:vim25"></FetchResponse>`)
					return
				}
				log.Printf("%s on %s panicked: %v", call.method, call.this, p)
				writeSOAP(w, http.StatusInternalServerError, fmt.Sprintf(
					`<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>%s</faultstring>`+
						`<detail><RuntimeFaultFault xmlns="urn:vim25" xsi:type="RuntimeFault"></RuntimeFaultFault></detail></soapenv:Fault>`,
					xmlEscape(fmt.Sprintf("vcsim panic in %s: %v", call.method, p))))
			}
		}()
		f.sdk.ServeHTTP(out, r)
	}()
	restore()
	if syncAfter[call.method] {
		f.t.syncAll()
	}
}

func xmlEscape(s string) string {
	var b strings.Builder
	_ = xml.EscapeText(&b, []byte(s))
	return b.String()
}

func writeSOAP(w http.ResponseWriter, status int, inner string) {
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(status)
	_, _ = io.WriteString(w, xml.Header+
		`<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" `+
		`xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" `+
		`xmlns:xsd="http://www.w3.org/2001/XMLSchema" `+
		`xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">`+
		`<soapenv:Body>`+inner+`</soapenv:Body></soapenv:Envelope>`)
}
