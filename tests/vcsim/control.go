package main

// The testbed's control endpoint, beside the SDK on the same loopback
// listener:
//
//	GET  /testbed/inventory               the VMs and their disks (JSON)
//	POST /testbed/write?vm=&disk=&offset=  write the request body into a disk
//	     [&length=N&zero=1]                 (or N zero bytes), marking CBT
//	GET  /testbed/cbt?vm=&disk=            a disk's tracking state (JSON)
//
// vm is a moref ("vm-42"), an inventory path ("/DC0/vm/pgtest1") or a name.

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

const controlPrefix = "/testbed/"

type vcenterInfo struct {
	URL              string `json:"url"`
	Host             string `json:"host"`
	Port             int    `json:"port"`
	User             string `json:"user"`
	Password         string `json:"password,omitempty"`
	Thumbprint       string `json:"thumbprint"`
	ThumbprintSHA256 string `json:"thumbprint_sha256"`
	CertFile         string `json:"cert_file,omitempty"`
	Datacenter       string `json:"datacenter"`
	Datastore        string `json:"datastore"`
	DatastoreDir     string `json:"datastore_dir"`
	ControlURL       string `json:"control_url"`
}

type cbtInfo struct {
	BlockSize int64 `json:"block_size"`
	PageSize  int64 `json:"page_size"`
}

type diskInfo struct {
	Key           int32  `json:"key"`
	Label         string `json:"label"`
	CapacityBytes int64  `json:"capacity_bytes"`
	Controller    string `json:"controller"`
	Bus           int32  `json:"bus"`
	Unit          int32  `json:"unit"`
	Thin          bool   `json:"thin"`
	File          string `json:"file"`
	FlatFile      string `json:"flat_file"`
	ChangeID      string `json:"change_id"`
}

type vmInfo struct {
	Name       string     `json:"name"`
	Path       string     `json:"path"`
	Moref      string     `json:"moref"`
	UUID       string     `json:"uuid"`
	PowerState string     `json:"power_state"`
	CBTEnabled bool       `json:"cbt_enabled"`
	Disks      []diskInfo `json:"disks"`
}

type inventoryInfo struct {
	VCenter vcenterInfo `json:"vcenter"`
	CBT     cbtInfo     `json:"cbt"`
	VMs     []vmInfo    `json:"vms"`
}

type control struct {
	t       *tracker
	vcenter vcenterInfo    // without the password: the endpoint is unauthenticated
	order   map[string]int // spec VMs come first, in spec order
}

// inventoryPath is an entity's path as vSphere's SearchIndex knows it:
// "/DC0/vm/folder/name" (the root folder is not part of it).
func inventoryPath(e mo.Entity) string {
	var names []string
	for e != nil {
		me := e.Entity()
		if me.Parent == nil {
			break
		}
		names = append(names, me.Name)
		parent, ok := simulator.Map.Get(*me.Parent).(mo.Entity)
		if !ok {
			break
		}
		e = parent
	}
	for i, j := 0, len(names)-1; i < j; i, j = i+1, j-1 {
		names[i], names[j] = names[j], names[i]
	}
	return "/" + strings.Join(names, "/")
}

var errNoVM = errors.New("no such VM")

func resolveVM(q string) (*simulator.VirtualMachine, error) {
	vms := allVMs()
	for _, vm := range vms {
		if vm.Self.Value == q {
			return vm, nil
		}
	}
	var found []*simulator.VirtualMachine
	for _, vm := range vms {
		if strings.HasPrefix(q, "/") && inventoryPath(vm) == strings.TrimSuffix(q, "/") || vm.Name == q {
			found = append(found, vm)
		}
	}
	switch len(found) {
	case 0:
		return nil, fmt.Errorf("%w: %q", errNoVM, q)
	case 1:
		return found[0], nil
	}
	return nil, fmt.Errorf("%q names %d VMs; use the inventory path", q, len(found))
}

// describeVM reads a VM; the caller holds its lock and t.mu.
func (c *control) describeVM(vm *simulator.VirtualMachine) vmInfo {
	info := vmInfo{
		Name:       vm.Name,
		Path:       inventoryPath(vm),
		Moref:      vm.Self.Value,
		UUID:       vm.Config.Uuid,
		PowerState: string(vm.Runtime.PowerState),
		CBTEnabled: vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled,
		Disks:      []diskInfo{},
	}
	devices := object.VirtualDeviceList(vm.Config.Hardware.Device)
	for _, dev := range devices {
		disk, ok := dev.(*types.VirtualDisk)
		if !ok {
			continue
		}
		d := diskInfo{Key: disk.Key, CapacityBytes: disk.CapacityInBytes}
		if disk.DeviceInfo != nil {
			d.Label = disk.DeviceInfo.GetDescription().Label
		}
		if disk.UnitNumber != nil {
			d.Unit = *disk.UnitNumber
		}
		if ctrl := devices.FindByKey(disk.ControllerKey); ctrl != nil {
			d.Controller = kindOf(ctrl)
			if c, ok := ctrl.(types.BaseVirtualController); ok {
				d.Bus = c.GetVirtualController().BusNumber
			}
		}
		if b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok {
			d.File = b.FileName
			d.FlatFile = flatFileOf(b.FileName)
			d.ChangeID = b.ChangeId
			d.Thin = b.ThinProvisioned != nil && *b.ThinProvisioned
		}
		info.Disks = append(info.Disks, d)
	}
	return info
}

func (c *control) inventory() inventoryInfo {
	inv := inventoryInfo{
		VCenter: c.vcenter,
		CBT:     cbtInfo{BlockSize: c.t.blockSize, PageSize: c.t.pageSize},
		VMs:     []vmInfo{},
	}
	for _, vm := range allVMs() {
		simulator.Map.WithLock(vm, func() {
			c.t.mu.Lock()
			defer c.t.mu.Unlock()
			c.t.syncVM(vm)
			inv.VMs = append(inv.VMs, c.describeVM(vm))
		})
	}
	rank := func(v vmInfo) int {
		if n, ok := c.order[v.Moref]; ok {
			return n
		}
		return len(c.order)
	}
	sort.SliceStable(inv.VMs, func(i, j int) bool {
		a, b := inv.VMs[i], inv.VMs[j]
		if rank(a) != rank(b) {
			return rank(a) < rank(b)
		}
		return a.Path < b.Path
	})
	return inv
}

func (c *control) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch strings.TrimPrefix(r.URL.Path, controlPrefix) {
	case "inventory":
		if r.Method != http.MethodGet {
			replyError(w, http.StatusMethodNotAllowed, "use GET")
			return
		}
		reply(w, http.StatusOK, c.inventory())
	case "write":
		if r.Method != http.MethodPost {
			replyError(w, http.StatusMethodNotAllowed, "use POST")
			return
		}
		c.write(w, r)
	case "cbt":
		if r.Method != http.MethodGet {
			replyError(w, http.StatusMethodNotAllowed, "use GET")
			return
		}
		c.cbtState(w, r)
	default:
		replyError(w, http.StatusNotFound, "unknown testbed endpoint "+r.URL.Path)
	}
}

// diskTarget is one disk resolved from the vm and disk query parameters.
type diskTarget struct {
	vm   *simulator.VirtualMachine
	path string
	key  int32
	id   diskID
	info diskInfo
}

func (c *control) resolveDisk(r *http.Request) (*diskTarget, int, error) {
	q := r.URL.Query()
	vm, err := resolveVM(q.Get("vm"))
	if err != nil {
		if errors.Is(err, errNoVM) {
			return nil, http.StatusNotFound, err
		}
		return nil, http.StatusBadRequest, err
	}
	key, err := strconv.ParseInt(q.Get("disk"), 10, 32)
	if err != nil {
		return nil, http.StatusBadRequest, fmt.Errorf("disk %q is not a device key", q.Get("disk"))
	}
	target := &diskTarget{vm: vm, key: int32(key), id: diskID{vm.Self.Value, int32(key)}}
	found := false
	simulator.Map.WithLock(vm, func() {
		c.t.mu.Lock()
		defer c.t.mu.Unlock()
		c.t.syncVM(vm)
		info := c.describeVM(vm)
		target.path = info.Path
		for _, d := range info.Disks {
			if d.Key == target.key {
				target.info, found = d, true
			}
		}
	})
	if !found {
		return nil, http.StatusNotFound, fmt.Errorf("%s has no disk with key %d", target.path, key)
	}
	return target, 0, nil
}

type writeReply struct {
	VM         string      `json:"vm"`
	Path       string      `json:"path"`
	DiskKey    int32       `json:"disk_key"`
	Label      string      `json:"label"`
	FlatFile   string      `json:"flat_file"`
	Offset     int64       `json:"offset"`
	Length     int64       `json:"length"`
	Zero       bool        `json:"zero"`
	BlockSize  int64       `json:"block_size"`
	Blocks     []byteRange `json:"blocks"`
	CBTEnabled bool        `json:"cbt_enabled"`
	ChangeID   string      `json:"change_id"`
	Pending    []byteRange `json:"pending"`
}

// mark records a write of [first, last) blocks: in the allocation, and in the
// current epoch when the disk is tracked.
func (c *control) mark(id diskID, file string, first, last int64) {
	c.t.mu.Lock()
	defer c.t.mu.Unlock()
	st := c.t.disks[id]
	if st == nil || st.file != file {
		return
	}
	st.written = st.written.add(first, last)
	if st.track != nil {
		st.track.pending = st.track.pending.add(first, last)
	}
}

func (c *control) write(w http.ResponseWriter, r *http.Request) {
	target, status, err := c.resolveDisk(r)
	if err != nil {
		replyError(w, status, err.Error())
		return
	}
	q := r.URL.Query()
	zero := q.Get("zero") == "1" || q.Get("zero") == "true"
	offset, err := strconv.ParseInt(q.Get("offset"), 10, 64)
	if err != nil || offset < 0 {
		replyError(w, http.StatusBadRequest, fmt.Sprintf("offset %q is not a byte offset", q.Get("offset")))
		return
	}
	length := r.ContentLength
	if zero || q.Get("length") != "" {
		length, err = strconv.ParseInt(q.Get("length"), 10, 64)
		if err != nil {
			replyError(w, http.StatusBadRequest, fmt.Sprintf("length %q is not a byte count", q.Get("length")))
			return
		}
	}
	if !zero && length != r.ContentLength {
		replyError(w, http.StatusBadRequest, fmt.Sprintf("the body has %d bytes, not length %d", r.ContentLength, length))
		return
	}
	capacity := target.info.CapacityBytes
	if length <= 0 || offset+length > capacity {
		replyError(w, http.StatusBadRequest, fmt.Sprintf("[%d, %d) is empty or beyond the disk's %d bytes", offset, offset+length, capacity))
		return
	}

	// The blocks are marked before and after the data lands.  A snapshot
	// taken in between then reports them in both epochs: a false positive,
	// which CBT allows, and never a missed change.
	first, last := blockSpan(c.t.blockSize, offset, length)
	c.mark(target.id, target.info.File, first, last)
	err = writeAt(target.info.FlatFile, offset, length, zero, r.Body)
	c.mark(target.id, target.info.File, first, last)
	if err != nil {
		replyError(w, http.StatusInternalServerError, err.Error())
		return
	}

	out := writeReply{
		VM:        target.vm.Name,
		Path:      target.path,
		DiskKey:   target.key,
		Label:     target.info.Label,
		FlatFile:  target.info.FlatFile,
		Offset:    offset,
		Length:    length,
		Zero:      zero,
		BlockSize: c.t.blockSize,
		Blocks:    extentSet{{first, last}}.bytesWithin(c.t.blockSize, 0, capacity),
		Pending:   []byteRange{},
	}
	c.t.mu.Lock()
	if st := c.t.disks[target.id]; st != nil && st.track != nil {
		out.CBTEnabled = true
		out.ChangeID = st.track.changeID(st.track.seq)
		out.Pending = st.track.pending.bytesWithin(c.t.blockSize, 0, capacity)
	}
	c.t.mu.Unlock()
	reply(w, http.StatusOK, out)
}

// writeAt writes length bytes from body (or zeros) into file at offset.
func writeAt(file string, offset, length int64, zero bool, body io.Reader) error {
	f, err := os.OpenFile(file, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	buf := make([]byte, 1<<20)
	done := int64(0)
	for done < length {
		n := int64(len(buf))
		if length-done < n {
			n = length - done
		}
		chunk := buf[:n]
		if !zero {
			if _, err := io.ReadFull(body, chunk); err != nil {
				f.Close()
				return fmt.Errorf("reading the data after %d bytes: %v", done, err)
			}
		}
		if _, err := f.WriteAt(chunk, offset+done); err != nil {
			f.Close()
			return err
		}
		done += n
	}
	return f.Close()
}

type historyEntry struct {
	ChangeID string      `json:"change_id"`
	Changed  []byteRange `json:"changed"`
}

type cbtReply struct {
	VM         string         `json:"vm"`
	Path       string         `json:"path"`
	DiskKey    int32          `json:"disk_key"`
	BlockSize  int64          `json:"block_size"`
	CBTEnabled bool           `json:"cbt_enabled"`
	ChangeID   string         `json:"change_id"`
	Written    []byteRange    `json:"written"`
	Pending    []byteRange    `json:"pending"`
	History    []historyEntry `json:"history"`
}

func (c *control) cbtState(w http.ResponseWriter, r *http.Request) {
	target, status, err := c.resolveDisk(r)
	if err != nil {
		replyError(w, status, err.Error())
		return
	}
	capacity := target.info.CapacityBytes
	out := cbtReply{
		VM: target.vm.Name, Path: target.path, DiskKey: target.key, BlockSize: c.t.blockSize,
		Written: []byteRange{}, Pending: []byteRange{}, History: []historyEntry{},
	}
	c.t.mu.Lock()
	if st := c.t.disks[target.id]; st != nil {
		out.Written = st.written.bytesWithin(c.t.blockSize, 0, capacity)
		if tr := st.track; tr != nil {
			out.CBTEnabled = true
			out.ChangeID = tr.changeID(tr.seq)
			out.Pending = tr.pending.bytesWithin(c.t.blockSize, 0, capacity)
			for n, p := range tr.points {
				changed := p.delta.bytesWithin(c.t.blockSize, 0, capacity)
				out.History = append(out.History, historyEntry{ChangeID: tr.changeID(n), Changed: changed})
			}
		}
	}
	c.t.mu.Unlock()
	reply(w, http.StatusOK, out)
}

func reply(w http.ResponseWriter, status int, v interface{}) {
	data, err := json.Marshal(v)
	if err != nil {
		status, data = http.StatusInternalServerError, []byte(`{"error":"encoding the answer failed"}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(append(data, '\n'))
}

func replyError(w http.ResponseWriter, status int, message string) {
	reply(w, status, map[string]string{"error": message})
}
