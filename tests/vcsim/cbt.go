package main

// Changed block tracking for the simulator.
//
// The model is write tracking, as on ESXi: every write that goes through the
// testbed's control endpoint marks the CBT blocks it touches.  The blocks
// written since the last change ID are "pending"; taking a snapshot of a VM
// with CBT on closes that epoch: the disk's sequence number goes up by one,
// the epoch's blocks are recorded under the new change ID, and the snapshot's
// disk backing carries that ID.  QueryChangedDiskAreas(snapshot S, changeId C)
// answers the union of the epochs after C up to S's change ID.  Change ID "*"
// answers the blocks ever written (the allocation of a thin disk) as of S.
//
// Locking: the simulator locks a VM while it runs a method on it, and calls
// the snapshot hook (PutObject) with that lock held.  The tracker's own mutex
// is therefore always taken after a VM lock, never before one.

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"sync"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// proxyType is the moref type of the per-VM objects that answer
// QueryChangedDiskAreas (see front.go for why they exist).
const proxyType = "VirtualMachineCBT"

type diskID struct {
	vm  string // the VM's moref value
	key int32
}

// diskState is what the tracker knows of one disk of one VM.
type diskState struct {
	file       string // datastore path of the descriptor; a new file is a new disk
	flat       string // the local -flat.vmdk
	capacity   int64
	descriptor int64     // capacity the descriptor was last written for
	written    extentSet // blocks ever written: the allocation of the thin disk
	track      *tracking // nil while CBT is off
}

// tracking is one CBT instance of a disk: it starts when CBT is turned on and
// ends when it is turned off (a reset), and its change IDs carry its UUID.
type tracking struct {
	uuid    string
	seq     int
	pending extentSet // blocks written since change ID uuid/seq
	points  []point   // points[n] is the state at change ID uuid/n
}

type point struct {
	delta   extentSet // blocks written between uuid/(n-1) and uuid/n
	written extentSet // allocation at uuid/n
}

// snapDisk is the change ID a snapshot recorded for one disk.
type snapDisk struct {
	uuid string
	seq  int
}

type snapRecord struct {
	vm    string
	disks map[int32]snapDisk
}

type tracker struct {
	mu        sync.Mutex
	blockSize int64
	pageSize  int64
	disks     map[diskID]*diskState
	snapshots map[string]snapRecord // by snapshot moref value

	proxyMu sync.Mutex
	proxies map[string]bool
}

func newTracker(cbt CBTSpec) *tracker {
	return &tracker{
		blockSize: cbt.BlockSize,
		pageSize:  cbt.PageSize,
		disks:     map[diskID]*diskState{},
		snapshots: map[string]snapRecord{},
		proxies:   map[string]bool{},
	}
}

// Reference makes the tracker a simulator.RegisterObject.
func (t *tracker) Reference() types.ManagedObjectReference {
	return types.ManagedObjectReference{Type: "TestbedCBTTracker", Value: "cbt-tracker"}
}

// PutObject is called for every object the simulator registers.
func (t *tracker) PutObject(obj mo.Reference) {
	switch x := obj.(type) {
	case *simulator.VirtualMachineSnapshot:
		t.snapshotTaken(x)
	case *simulator.Task:
		fixSnapshotTaskEntity(x)
	}
}

func (t *tracker) UpdateObject(mo.Reference, []types.PropertyChange) {}

func (t *tracker) RemoveObject(ref types.ManagedObjectReference) {
	switch ref.Type {
	case "VirtualMachineSnapshot":
		// The states stay addressable by change ID: a backup deletes its
		// snapshot and later asks what changed since that snapshot's ID.
		t.mu.Lock()
		delete(t.snapshots, ref.Value)
		t.mu.Unlock()
	case "VirtualMachine":
		t.mu.Lock()
		for id := range t.disks {
			if id.vm == ref.Value {
				delete(t.disks, id)
			}
		}
		t.mu.Unlock()
		t.proxyMu.Lock()
		had := t.proxies[ref.Value]
		delete(t.proxies, ref.Value)
		t.proxyMu.Unlock()
		if had {
			simulator.Map.Remove(types.ManagedObjectReference{Type: proxyType, Value: ref.Value})
		}
	}
}

// fixSnapshotTaskEntity points the task of a snapshot method at the
// snapshot's VM.  The simulator sets the snapshot itself, which real vCenter
// never does and which pyVmomi rejects ("expected type vim.ManagedEntity").
func fixSnapshotTaskEntity(task *simulator.Task) {
	entity := task.Info.Entity
	if entity == nil || entity.Type != "VirtualMachineSnapshot" {
		return
	}
	snap, ok := simulator.Map.Get(*entity).(*simulator.VirtualMachineSnapshot)
	if !ok {
		return
	}
	vm := snap.Vm
	task.Info.Entity = &vm
	if v, ok := simulator.Map.Get(vm).(*simulator.VirtualMachine); ok {
		task.Info.EntityName = v.Name
	}
}

// ensureProxy registers the QueryChangedDiskAreas object of a VM, if the VM
// exists.  VMs created at run time get theirs on their first query.
func (t *tracker) ensureProxy(vmValue string) {
	vmRef := types.ManagedObjectReference{Type: "VirtualMachine", Value: vmValue}
	if _, ok := simulator.Map.Get(vmRef).(*simulator.VirtualMachine); !ok {
		return
	}
	t.proxyMu.Lock()
	defer t.proxyMu.Unlock()
	if t.proxies[vmValue] {
		return
	}
	simulator.Map.Put(&cbtProxy{
		ExtensibleManagedObject: mo.ExtensibleManagedObject{Self: types.ManagedObjectReference{Type: proxyType, Value: vmValue}},
		t:                       t,
	})
	t.proxies[vmValue] = true
}

func allVMs() []*simulator.VirtualMachine {
	var vms []*simulator.VirtualMachine
	for _, e := range simulator.Map.All("VirtualMachine") {
		if vm, ok := e.(*simulator.VirtualMachine); ok {
			vms = append(vms, vm)
		}
	}
	return vms
}

// syncAll brings every VM's disks and CBT state in line with its config.
func (t *tracker) syncAll() {
	for _, vm := range allVMs() {
		simulator.Map.WithLock(vm, func() {
			t.mu.Lock()
			defer t.mu.Unlock()
			t.syncVM(vm)
		})
		t.ensureProxy(vm.Self.Value)
	}
}

// syncVM reconciles one VM; the caller holds the VM's lock and t.mu.
//
// It gives disks that clients added the keys and labels ESXi would, makes
// capacityInKB and capacityInBytes agree, grows each flat file to its
// disk's capacity, and starts or ends tracking as the VM's
// changeTrackingEnabled says.
func (t *tracker) syncVM(vm *simulator.VirtualMachine) {
	renumberDisks(vm)
	fixControllerDeviceLists(vm)
	cbt := vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
	present := map[int32]bool{}
	devices := object.VirtualDeviceList(vm.Config.Hardware.Device)
	for _, dev := range devices {
		disk, ok := dev.(*types.VirtualDisk)
		if !ok {
			continue
		}
		backing, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		if !ok {
			continue
		}
		present[disk.Key] = true
		capacity := normaliseCapacity(disk)
		id := diskID{vm.Self.Value, disk.Key}
		st := t.disks[id]
		if st == nil || st.file != backing.FileName {
			st = &diskState{file: backing.FileName, flat: flatFileOf(backing.FileName)}
			t.disks[id] = st
			if err := growFlatFile(st.flat, capacity); err != nil {
				log.Printf("%s disk %d: %v", vm.Name, disk.Key, err)
			}
			st.written = t.allocatedBlocks(st.flat)
		} else if capacity > st.capacity {
			if err := growFlatFile(st.flat, capacity); err != nil {
				log.Printf("%s disk %d: %v", vm.Name, disk.Key, err)
			}
		}
		st.capacity = capacity
		if st.descriptor != capacity {
			writeDescriptor(st.flat, backing, capacity, adapterType(devices, disk))
			st.descriptor = capacity
		}
		switch {
		case cbt && st.track == nil:
			st.track = newTracking(st.written)
			backing.ChangeId = st.track.changeID(0)
		case !cbt:
			// Also clears IDs a disk brought along (a clone's disks come
			// from its source).
			st.track = nil
			backing.ChangeId = ""
		}
	}
	for id := range t.disks {
		if id.vm == vm.Self.Value && !present[id.key] {
			delete(t.disks, id)
		}
	}
}

// normaliseCapacity makes capacityInBytes and capacityInKB agree, taking the
// larger: a client that grows a disk may set either one.
func normaliseCapacity(disk *types.VirtualDisk) int64 {
	capacity := disk.CapacityInBytes
	if kb := disk.CapacityInKB * 1024; kb > capacity {
		capacity = kb
	}
	disk.CapacityInBytes = capacity
	disk.CapacityInKB = capacity / 1024
	return capacity
}

// renumberDisks gives disks the simulator numbered itself (clients add disks
// with key -1 or 0, and the simulator picks a small free key such as 202)
// the key ESXi would give, and a "Hard disk N" label.
func renumberDisks(vm *simulator.VirtualMachine) {
	devices := object.VirtualDeviceList(vm.Config.Hardware.Device)
	labels := map[string]bool{}
	for _, dev := range devices {
		if d := dev.GetVirtualDevice(); d.DeviceInfo != nil {
			labels[d.DeviceInfo.GetDescription().Label] = true
		}
	}
	for _, dev := range devices {
		disk, ok := dev.(*types.VirtualDisk)
		if !ok {
			continue
		}
		if disk.Key < 2000 && disk.UnitNumber != nil {
			if ctrl := devices.FindByKey(disk.ControllerKey); ctrl != nil {
				if kind, ok := controllerKinds[kindOf(ctrl)]; ok {
					bus := ctrl.(types.BaseVirtualController).GetVirtualController().BusNumber
					key := kind.conventionalDiskKey(bus, *disk.UnitNumber)
					if devices.FindByKey(key) == nil {
						replaceLayoutKey(vm, disk.Key, key)
						disk.Key = key
					}
				}
			}
		}
		if disk.DeviceInfo == nil || !strings.HasPrefix(disk.DeviceInfo.GetDescription().Label, "Hard disk ") {
			n := 1
			for labels[fmt.Sprintf("Hard disk %d", n)] {
				n++
			}
			label := fmt.Sprintf("Hard disk %d", n)
			labels[label] = true
			summary := ""
			if disk.DeviceInfo != nil {
				summary = disk.DeviceInfo.GetDescription().Summary
			}
			disk.DeviceInfo = &types.Description{Label: label, Summary: summary}
		}
	}
}

func replaceLayoutKey(vm *simulator.VirtualMachine, old, key int32) {
	if vm.Layout != nil {
		for i := range vm.Layout.Disk {
			if vm.Layout.Disk[i].Key == old {
				vm.Layout.Disk[i].Key = key
			}
		}
	}
	if vm.LayoutEx != nil {
		for i := range vm.LayoutEx.Disk {
			if vm.LayoutEx.Disk[i].Key == old {
				vm.LayoutEx.Disk[i].Key = key
			}
		}
	}
}

// fixControllerDeviceLists makes each disk controller's "device" list name
// the devices attached to it, as on vSphere.  Controllers are replaced by
// copies, never changed in place: the simulator shares its default devices
// (the IDE controllers among them) between all VMs.
func fixControllerDeviceLists(vm *simulator.VirtualMachine) {
	devices := vm.Config.Hardware.Device
	children := map[int32][]int32{}
	for _, dev := range devices {
		d := dev.GetVirtualDevice()
		if d.ControllerKey != 0 {
			children[d.ControllerKey] = append(children[d.ControllerKey], d.Key)
		}
	}
	for i, dev := range devices {
		if kindOf(dev) == "" {
			continue
		}
		ctrl := dev.(types.BaseVirtualController).GetVirtualController()
		want := children[ctrl.Key]
		if reflect.DeepEqual(ctrl.Device, want) || (len(ctrl.Device) == 0 && len(want) == 0) {
			continue
		}
		v := reflect.ValueOf(dev).Elem()
		cp := reflect.New(v.Type())
		cp.Elem().Set(v)
		copied := cp.Interface().(types.BaseVirtualDevice)
		copied.(types.BaseVirtualController).GetVirtualController().Device = append([]int32(nil), want...)
		devices[i] = copied
	}
}

// adapterType is the descriptor's ddb.adapterType for a disk.
func adapterType(devices object.VirtualDeviceList, disk *types.VirtualDisk) string {
	if ctrl := devices.FindByKey(disk.ControllerKey); ctrl != nil && kindOf(ctrl) == "ide" {
		return "ide"
	}
	return "lsilogic"
}

// growFlatFile makes the flat file at least capacity bytes long.  Growing
// with Truncate leaves a sparse file: a fresh thin disk allocates nothing.
func growFlatFile(flat string, capacity int64) error {
	if flat == "" {
		return errors.New("no flat file (unknown datastore)")
	}
	f, err := os.OpenFile(flat, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return err
	}
	if info.Size() < capacity {
		return f.Truncate(capacity)
	}
	return nil
}

// writeDescriptor fills the descriptor (the .vmdk beside the flat file) with
// a VMFS flat-extent descriptor, as ESXi writes one, unless something other
// than the simulator (an empty file) or this program put content there.
// With it, tools that read VMDKs (qemu-img) can open the disk.
func writeDescriptor(flat string, backing *types.VirtualDiskFlatVer2BackingInfo, capacity int64, adapter string) {
	descriptor := strings.Replace(flat, "-flat.vmdk", ".vmdk", 1)
	if descriptor == flat {
		return
	}
	if old, err := os.ReadFile(descriptor); err == nil && len(old) > 0 && !strings.HasPrefix(string(old), descriptorMarker) {
		return
	}
	sectors := capacity / 512
	heads, perTrack := int64(255), int64(63)
	if adapter == "ide" {
		heads = 16
	}
	thin := ""
	if backing.ThinProvisioned != nil && *backing.ThinProvisioned {
		thin = "ddb.thinProvisioned = \"1\"\n"
	}
	text := fmt.Sprintf(`%s
version=1
encoding="UTF-8"
CID=fffffffe
parentCID=ffffffff
createType="vmfs"

# Extent description
RW %d VMFS "%s"

# The Disk Data Base
#DDB

ddb.adapterType = "%s"
ddb.geometry.cylinders = "%d"
ddb.geometry.heads = "%d"
ddb.geometry.sectors = "%d"
%sddb.virtualHWVersion = "13"
`, descriptorMarker, sectors, filepath.Base(flat), adapter, sectors/(heads*perTrack), heads, perTrack, thin)
	if err := os.WriteFile(descriptor, []byte(text), 0o644); err != nil {
		log.Printf("descriptor %s: %v", descriptor, err)
	}
}

const descriptorMarker = "# Disk DescriptorFile"

// allocatedBlocks finds the blocks of a file that hold data, skipping holes
// with SEEK_DATA/SEEK_HOLE.  A disk the tracker sees for the first time
// counts these as written.  (A file system without hole support reports the
// whole file as data, like vSphere on storage without allocation maps.)
func (t *tracker) allocatedBlocks(flat string) extentSet {
	const seekData, seekHole = 3, 4 // Linux lseek whence values
	f, err := os.Open(flat)
	if err != nil {
		return nil
	}
	defer f.Close()
	var set extentSet
	var offset int64
	for {
		start, err := f.Seek(offset, seekData)
		if err != nil {
			return set // ENXIO: no data after offset
		}
		end, err := f.Seek(start, seekHole)
		if err != nil {
			return set
		}
		first, last := blockSpan(t.blockSize, start, end-start)
		set = set.add(first, last)
		offset = end
	}
}

func newTracking(written extentSet) *tracking {
	var raw [16]byte
	if _, err := io.ReadFull(rand.Reader, raw[:]); err != nil {
		panic(err)
	}
	raw[0] = 0x52 // vSphere's tracking UUIDs start with 52
	hexes := make([]string, 16)
	for i, b := range raw {
		hexes[i] = fmt.Sprintf("%02x", b)
	}
	uuid := strings.Join(hexes[:8], " ") + "-" + strings.Join(hexes[8:], " ")
	return &tracking{uuid: uuid, points: []point{{written: written}}}
}

func (tr *tracking) changeID(seq int) string {
	return fmt.Sprintf("%s/%d", tr.uuid, seq)
}

// closeEpoch ends the current epoch and returns the new change ID.
func (tr *tracking) closeEpoch(written extentSet) string {
	tr.seq++
	tr.points = append(tr.points, point{delta: tr.pending, written: written})
	tr.pending = nil
	return tr.changeID(tr.seq)
}

var changeIDPattern = regexp.MustCompile(`^((?:[0-9a-fA-F]{2} ){7}[0-9a-fA-F]{2}-(?:[0-9a-fA-F]{2} ){7}[0-9a-fA-F]{2})/([0-9]+)$`)

func parseChangeID(id string) (string, int, bool) {
	m := changeIDPattern.FindStringSubmatch(id)
	if m == nil {
		return "", 0, false
	}
	seq, err := strconv.Atoi(m[2])
	if err != nil {
		return "", 0, false
	}
	return strings.ToLower(m[1]), seq, true
}

// snapshotTaken records the CBT state of every tracked disk of the VM at a
// new snapshot.  The simulator calls it from CreateSnapshot_Task with the VM
// locked, after copying the VM's config into the snapshot.
func (t *tracker) snapshotTaken(snap *simulator.VirtualMachineSnapshot) {
	vm, ok := simulator.Map.Get(snap.Vm).(*simulator.VirtualMachine)
	if !ok {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.syncVM(vm)

	// The simulator's copy is shallow: the snapshot would share its disk
	// objects with the VM, and every later change would show in it.  The
	// snapshot gets its own device list with its own copies of the disks.
	record := snapRecord{vm: vm.Self.Value, disks: map[int32]snapDisk{}}
	devices := make([]types.BaseVirtualDevice, len(vm.Config.Hardware.Device))
	for i, dev := range vm.Config.Hardware.Device {
		devices[i] = dev
		disk, ok := dev.(*types.VirtualDisk)
		if !ok {
			continue
		}
		live, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		if !ok {
			continue
		}
		copied := *disk
		backing := *live
		copied.Backing = &backing
		devices[i] = &copied
		st := t.disks[diskID{vm.Self.Value, disk.Key}]
		if st == nil || st.track == nil {
			continue
		}
		id := st.track.closeEpoch(st.written)
		backing.ChangeId = id
		live.ChangeId = id // the running VM's disk shows the newest ID too
		record.disks[disk.Key] = snapDisk{uuid: st.track.uuid, seq: st.track.seq}
	}
	snap.Config.Hardware.Device = devices
	t.snapshots[snap.Self.Value] = record
}

// protectCloneSource works around the simulator's CloneVM_Task, which hands
// the source VM's own disk objects to the clone and renames their files:
// afterwards the source would point at the clone's disks.  It saves copies
// of the source's disks and returns a function that puts them back.
func protectCloneSource(vmValue string) func() {
	vm, ok := simulator.Map.Get(types.ManagedObjectReference{Type: "VirtualMachine", Value: vmValue}).(*simulator.VirtualMachine)
	if !ok {
		return func() {}
	}
	saved := map[int32]*types.VirtualDisk{}
	simulator.Map.WithLock(vm, func() {
		for _, dev := range vm.Config.Hardware.Device {
			if disk, ok := dev.(*types.VirtualDisk); ok {
				copied := *disk
				if b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok {
					backing := *b
					copied.Backing = &backing
				}
				saved[disk.Key] = &copied
			}
		}
	})
	return func() {
		simulator.Map.WithLock(vm, func() {
			for i, dev := range vm.Config.Hardware.Device {
				if disk, ok := dev.(*types.VirtualDisk); ok && saved[disk.Key] != nil {
					vm.Config.Hardware.Device[i] = saved[disk.Key]
				}
			}
		})
	}
}

// cbtProxy answers QueryChangedDiskAreas for one VM.  It is registered in the
// simulator under {VirtualMachineCBT, <vm moref>}; the front handler points
// the VM's QueryChangedDiskAreas calls at it.
type cbtProxy struct {
	// First, and an mo type: the simulator's reflection (getManagedObject,
	// behind FindByUuid and others) walks every registered object's first field.
	mo.ExtensibleManagedObject
	t *tracker
}

func (p *cbtProxy) Reference() types.ManagedObjectReference { return p.Self }

// QueryChangedDiskAreas is found by the simulator's dispatcher by reflection.
func (p *cbtProxy) QueryChangedDiskAreas(req *types.QueryChangedDiskAreas) soap.HasFault {
	body := &methods.QueryChangedDiskAreasBody{}
	vmRef := types.ManagedObjectReference{Type: "VirtualMachine", Value: p.Self.Value}
	vm, ok := simulator.Map.Get(vmRef).(*simulator.VirtualMachine)
	if !ok {
		body.Fault_ = simulator.Fault("", &types.ManagedObjectNotFound{Obj: vmRef})
		return body
	}
	var info types.DiskChangeInfo
	var fault *soap.Fault
	// The dispatcher locked only this proxy, not the VM.
	simulator.Map.WithLock(vm, func() {
		p.t.mu.Lock()
		defer p.t.mu.Unlock()
		info, fault = p.t.query(vm, req)
	})
	if fault != nil {
		body.Fault_ = fault
		return body
	}
	body.Res = &types.QueryChangedDiskAreasResponse{Returnval: info}
	return body
}

func invalidArgument(property, format string, args ...interface{}) *soap.Fault {
	return simulator.Fault(fmt.Sprintf(format, args...), &types.InvalidArgument{InvalidProperty: property})
}

// query computes a QueryChangedDiskAreas answer; the caller holds the VM's
// lock and t.mu.
func (t *tracker) query(vm *simulator.VirtualMachine, req *types.QueryChangedDiskAreas) (types.DiskChangeInfo, *soap.Fault) {
	var info types.DiskChangeInfo
	t.syncVM(vm)

	devices := vm.Config.Hardware.Device
	var record *snapRecord
	if req.Snapshot != nil {
		snap, ok := simulator.Map.Get(*req.Snapshot).(*simulator.VirtualMachineSnapshot)
		if !ok || snap.Vm != vm.Self {
			return info, invalidArgument("snapshot", "%s is not a snapshot of %s", req.Snapshot.Value, vm.Name)
		}
		devices = snap.Config.Hardware.Device
		r := t.snapshots[req.Snapshot.Value]
		record = &r
	} else if vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOff {
		// vSphere computes changes against the running disk only for
		// powered-off VMs; a running VM needs a snapshot.
		return info, invalidArgument("snapshot", "%s is %s: QueryChangedDiskAreas needs a snapshot", vm.Name, vm.Runtime.PowerState)
	}

	var disk *types.VirtualDisk
	for _, dev := range devices {
		if d, ok := dev.(*types.VirtualDisk); ok && d.Key == req.DeviceKey {
			disk = d
		}
	}
	if disk == nil {
		return info, invalidArgument("deviceKey", "%s has no disk with key %d", vm.Name, req.DeviceKey)
	}
	capacity := disk.CapacityInBytes
	if kb := disk.CapacityInKB * 1024; kb > capacity {
		capacity = kb
	}
	if req.StartOffset < 0 || req.StartOffset >= capacity {
		return info, invalidArgument("startOffset", "startOffset %d is outside the disk (capacity %d)", req.StartOffset, capacity)
	}
	fileName := ""
	if b, ok := disk.Backing.(types.BaseVirtualDeviceFileBackingInfo); ok {
		fileName = b.GetVirtualDeviceFileBackingInfo().FileName
	}
	notTracked := func(why string) (types.DiskChangeInfo, *soap.Fault) {
		return info, simulator.Fault(fmt.Sprintf("%s disk %d: %s", vm.Name, req.DeviceKey, why), &types.FileFault{File: fileName})
	}

	st := t.disks[diskID{vm.Self.Value, req.DeviceKey}]
	if st == nil || st.track == nil {
		return notTracked("change tracking is not enabled")
	}
	tr := st.track
	target, live := tr.seq, true
	if record != nil {
		sd, ok := record.disks[req.DeviceKey]
		if !ok || sd.uuid != tr.uuid {
			return notTracked("the snapshot has no change tracking state of the current tracking instance")
		}
		target, live = sd.seq, false
	}

	var changed extentSet
	if req.ChangeId == "*" {
		changed = st.written
		if !live {
			changed = tr.points[target].written
		}
	} else {
		uuid, seq, ok := parseChangeID(req.ChangeId)
		switch {
		case !ok:
			return info, invalidArgument("changeId", "malformed changeId %q", req.ChangeId)
		case uuid != tr.uuid:
			return info, invalidArgument("changeId", "changeId %q is not of this disk's current change tracking (another disk, or tracking was reset)", req.ChangeId)
		case seq > target:
			return info, invalidArgument("changeId", "changeId %q is later than the state queried (%s)", req.ChangeId, tr.changeID(target))
		}
		for n := seq + 1; n <= target; n++ {
			changed = changed.union(tr.points[n].delta)
		}
		if live {
			changed = changed.union(tr.pending)
		}
	}

	end := capacity
	if t.pageSize > 0 && req.StartOffset+t.pageSize < end {
		end = req.StartOffset + t.pageSize
	}
	info.StartOffset = req.StartOffset
	info.Length = end - req.StartOffset
	for _, r := range changed.bytesWithin(t.blockSize, req.StartOffset, end) {
		info.ChangedArea = append(info.ChangedArea, types.DiskChangeExtent{Start: r.Start, Length: r.Length})
	}
	return info, nil
}
