package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path"
	"strings"

	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/types"
)

// Spec is the testbed spec (the JSON the Python side is given).  Only the
// parts the simulator needs are read here; "hub" belongs to the Python side.
type Spec struct {
	Datacenter string          `json:"datacenter"`
	Datastore  string          `json:"datastore"`
	VCenter    VCenterSpec     `json:"vcenter"`
	CBT        CBTSpec         `json:"cbt"`
	Hub        json.RawMessage `json:"hub"`
	VMs        []VMSpec        `json:"vms"`
}

type VCenterSpec struct {
	User     string `json:"user"`
	Password string `json:"password"`
}

type CBTSpec struct {
	// BlockSize is the tracking granularity in bytes.  Changed areas are
	// reported in whole blocks, as vSphere does.
	BlockSize int64 `json:"block_size"`
	// PageSize, when set, limits how much of the disk one
	// QueryChangedDiskAreas answer covers, so clients must page.
	PageSize int64 `json:"page_size"`
}

type VMSpec struct {
	Name       string     `json:"name"`
	Folder     string     `json:"folder"`
	CPUs       int32      `json:"cpus"`
	MemoryMB   int64      `json:"memory_mb"`
	GuestID    string     `json:"guest_id"`
	Power      string     `json:"power"`
	Networks   *[]string  `json:"networks"`
	CBTEnabled bool       `json:"cbt_enabled"`
	SCSIType   string     `json:"scsi_type"`
	Disks      []DiskSpec `json:"disks"`
}

type DiskSpec struct {
	CapacityBytes int64  `json:"capacity_bytes"`
	Controller    string `json:"controller"`
	Bus           int32  `json:"bus"`
	Unit          *int32 `json:"unit"`
	Key           *int32 `json:"key"`
	Thin          *bool  `json:"thin"`
}

const (
	defaultUser      = "administrator@vsphere.local"
	defaultBlockSize = 64 * 1024
	defaultGuestID   = "otherLinux64Guest"
)

// controllerKind describes one family of disk controllers and the device keys
// ESXi gives the controllers and the disks on them (for example SCSI(0:1)
// is disk 2001 and SCSI(1:0) is disk 2016; SATA(0:0) is 16000).
type controllerKind struct {
	name      string
	maxBus    int32
	units     int32 // unit numbers per controller
	reserved  int32 // a unit the controller itself uses, or -1
	ctrlKey   int32 // key of the controller on bus 0
	diskKey   int32 // key of the disk at (bus 0, unit 0)
	labelName string
}

var controllerKinds = map[string]controllerKind{
	"scsi": {name: "scsi", maxBus: 3, units: 16, reserved: 7, ctrlKey: 1000, diskKey: 2000, labelName: "SCSI controller"},
	"sata": {name: "sata", maxBus: 3, units: 30, reserved: -1, ctrlKey: 15000, diskKey: 16000, labelName: "SATA controller"},
	"nvme": {name: "nvme", maxBus: 3, units: 15, reserved: -1, ctrlKey: 31000, diskKey: 32000, labelName: "NVME controller"},
	"ide":  {name: "ide", maxBus: 1, units: 2, reserved: -1, ctrlKey: 200, diskKey: 3000, labelName: "IDE"},
}

// conventionalDiskKey is the key ESXi would give a disk at (bus, unit).
func (k controllerKind) conventionalDiskKey(bus, unit int32) int32 {
	return k.diskKey + bus*k.units + unit
}

// kindOf names the family of a controller device, or "" for a device that
// is not a disk controller.
func kindOf(dev types.BaseVirtualDevice) string {
	switch dev.(type) {
	case types.BaseVirtualSCSIController:
		return "scsi"
	case types.BaseVirtualSATAController:
		return "sata"
	case *types.VirtualNVMEController:
		return "nvme"
	case *types.VirtualIDEController:
		return "ide"
	}
	return ""
}

var scsiTypes = map[string]func() types.BaseVirtualDevice{
	"pvscsi":       func() types.BaseVirtualDevice { return &types.ParaVirtualSCSIController{} },
	"lsilogic":     func() types.BaseVirtualDevice { return &types.VirtualLsiLogicController{} },
	"lsilogic-sas": func() types.BaseVirtualDevice { return &types.VirtualLsiLogicSASController{} },
	"buslogic":     func() types.BaseVirtualDevice { return &types.VirtualBusLogicController{} },
}

// loadSpec reads and validates a spec file.  Unknown keys are errors so a
// typo in a spec does not silently give a different VM.
func loadSpec(file string) (*Spec, error) {
	spec := &Spec{}
	if file != "" {
		data, err := os.ReadFile(file)
		if err != nil {
			return nil, err
		}
		dec := json.NewDecoder(bytes.NewReader(data))
		dec.DisallowUnknownFields()
		if err := dec.Decode(spec); err != nil {
			return nil, fmt.Errorf("spec %s: %v", file, err)
		}
	}
	if err := spec.normalise(); err != nil {
		return nil, fmt.Errorf("spec: %v", err)
	}
	return spec, nil
}

// normalise fills in defaults and checks everything the simulator relies on.
func (s *Spec) normalise() error {
	if s.Datacenter == "" {
		s.Datacenter = "DC0"
	}
	if s.Datastore == "" {
		s.Datastore = "LocalDS_0"
	}
	if s.VCenter.User == "" {
		s.VCenter.User = defaultUser
	}
	if s.VCenter.Password == "" {
		var raw [9]byte
		if _, err := rand.Read(raw[:]); err != nil {
			return err
		}
		s.VCenter.Password = "Tb-" + hex.EncodeToString(raw[:])
	}
	if s.CBT.BlockSize == 0 {
		s.CBT.BlockSize = defaultBlockSize
	}
	if s.CBT.BlockSize < 512 || s.CBT.BlockSize%512 != 0 {
		return fmt.Errorf("cbt.block_size %d is not a positive multiple of 512", s.CBT.BlockSize)
	}
	if s.CBT.PageSize < 0 || s.CBT.PageSize%s.CBT.BlockSize != 0 {
		return fmt.Errorf("cbt.page_size %d is not a multiple of cbt.block_size", s.CBT.PageSize)
	}
	seen := map[string]bool{}
	for i := range s.VMs {
		vm := &s.VMs[i]
		where := fmt.Sprintf("vms[%d]", i)
		if vm.Name == "" || strings.ContainsAny(vm.Name, "/\\[]") {
			return fmt.Errorf("%s: name %q is empty or has one of / \\ [ ]", where, vm.Name)
		}
		if seen[vm.Name] {
			return fmt.Errorf("%s: a second VM named %q", where, vm.Name)
		}
		seen[vm.Name] = true
		vm.Folder = strings.Trim(vm.Folder, "/")
		if vm.CPUs == 0 {
			vm.CPUs = 1
		}
		if vm.MemoryMB == 0 {
			vm.MemoryMB = 1024
		}
		if vm.CPUs < 0 || vm.MemoryMB < 0 {
			return fmt.Errorf("%s: negative cpus or memory_mb", where)
		}
		if vm.GuestID == "" {
			vm.GuestID = defaultGuestID
		}
		switch vm.Power {
		case "":
			vm.Power = "on"
		case "on", "off":
		default:
			return fmt.Errorf("%s: power %q is not \"on\" or \"off\"", where, vm.Power)
		}
		if vm.Networks == nil {
			vm.Networks = &[]string{"VM Network"}
		}
		if vm.SCSIType == "" {
			vm.SCSIType = "pvscsi"
		}
		if scsiTypes[vm.SCSIType] == nil {
			return fmt.Errorf("%s: scsi_type %q is not one of pvscsi, lsilogic, lsilogic-sas, buslogic", where, vm.SCSIType)
		}
		if err := vm.placeDisks(where); err != nil {
			return err
		}
	}
	return nil
}

// placeDisks checks each disk's controller and bus, gives it the next free
// unit when the spec names none, and its key by ESXi's numbering unless the
// spec names one.
func (vm *VMSpec) placeDisks(where string) error {
	type slot struct {
		kind      string
		bus, unit int32
	}
	used := map[slot]bool{}
	keys := map[int32]bool{}
	for j := range vm.Disks {
		d := &vm.Disks[j]
		at := fmt.Sprintf("%s.disks[%d]", where, j)
		if d.CapacityBytes <= 0 || d.CapacityBytes%512 != 0 {
			return fmt.Errorf("%s: capacity_bytes %d is not a positive multiple of 512", at, d.CapacityBytes)
		}
		if d.Controller == "" {
			d.Controller = "scsi"
		}
		kind, ok := controllerKinds[d.Controller]
		if !ok {
			return fmt.Errorf("%s: controller %q is not one of scsi, sata, nvme, ide", at, d.Controller)
		}
		if d.Bus < 0 || d.Bus > kind.maxBus {
			return fmt.Errorf("%s: bus %d is out of range 0..%d for %s", at, d.Bus, kind.maxBus, d.Controller)
		}
		if d.Unit == nil {
			for u := int32(0); u < kind.units; u++ {
				if u != kind.reserved && !used[slot{d.Controller, d.Bus, u}] {
					unit := u
					d.Unit = &unit
					break
				}
			}
			if d.Unit == nil {
				return fmt.Errorf("%s: %s bus %d has no free unit left", at, d.Controller, d.Bus)
			}
		}
		u := *d.Unit
		if u < 0 || u >= kind.units || u == kind.reserved {
			return fmt.Errorf("%s: unit %d is not usable on %s", at, u, d.Controller)
		}
		if used[slot{d.Controller, d.Bus, u}] {
			return fmt.Errorf("%s: %s(%d:%d) is already taken", at, d.Controller, d.Bus, u)
		}
		used[slot{d.Controller, d.Bus, u}] = true
		if d.Key == nil {
			key := kind.conventionalDiskKey(d.Bus, u)
			d.Key = &key
		}
		if *d.Key < 2000 {
			return fmt.Errorf("%s: key %d is below 2000, the range of controllers and other devices", at, *d.Key)
		}
		if keys[*d.Key] {
			return fmt.Errorf("%s: key %d is used twice", at, *d.Key)
		}
		keys[*d.Key] = true
		if d.Thin == nil {
			thin := true
			d.Thin = &thin
		}
	}
	return nil
}

// builder creates the spec's inventory through the simulator's own API (an
// in-process SOAP client), so the VMs go through the same code paths as VMs
// that clients create.
type builder struct {
	ctx    context.Context
	client *vim25.Client
	spec   *Spec
	finder *find.Finder
}

func newBuilder(model *simulator.Model, spec *Spec) (*builder, error) {
	ctx := context.Background()
	client, err := vim25.NewClient(ctx, model.Service)
	if err != nil {
		return nil, err
	}
	return &builder{ctx: ctx, client: client, spec: spec, finder: find.NewFinder(client, false)}, nil
}

func (b *builder) waitTask(task *object.Task, err error) (types.AnyType, error) {
	if err != nil {
		return nil, err
	}
	info, err := task.WaitForResult(b.ctx, nil)
	if err != nil {
		return nil, err
	}
	return info.Result, nil
}

// build renames the datacenter, mounts the datastore directory on every host
// and creates the VMs.  It returns the VMs' morefs in spec order.
func (b *builder) build(datastoreDir string) ([]types.ManagedObjectReference, error) {
	dc, err := b.finder.DatacenterOrDefault(b.ctx, "")
	if err != nil {
		return nil, err
	}
	if dc.Name() != b.spec.Datacenter {
		if _, err := b.waitTask(dc.Rename(b.ctx, b.spec.Datacenter)); err != nil {
			return nil, fmt.Errorf("renaming the datacenter: %v", err)
		}
		dc = object.NewDatacenter(b.client, dc.Reference())
	}
	b.finder.SetDatacenter(dc)
	folders, err := dc.Folders(b.ctx)
	if err != nil {
		return nil, err
	}

	hosts, err := b.finder.HostSystemList(b.ctx, "*/*")
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(datastoreDir, 0o755); err != nil {
		return nil, err
	}
	for _, host := range hosts {
		dss, err := host.ConfigManager().DatastoreSystem(b.ctx)
		if err != nil {
			return nil, err
		}
		if _, err := dss.CreateLocalDatastore(b.ctx, b.spec.Datastore, datastoreDir); err != nil {
			return nil, fmt.Errorf("mounting %s on %s: %v", datastoreDir, host.Name(), err)
		}
	}

	// VMs go into the cluster, spread over its hosts in turn.
	cluster, err := b.finder.DefaultClusterComputeResource(b.ctx)
	if err != nil {
		return nil, err
	}
	pool, err := cluster.ResourcePool(b.ctx)
	if err != nil {
		return nil, err
	}
	clusterHosts, err := cluster.Hosts(b.ctx)
	if err != nil || len(clusterHosts) == 0 {
		return nil, fmt.Errorf("the cluster has no hosts: %v", err)
	}

	var refs []types.ManagedObjectReference
	for i := range b.spec.VMs {
		vm := &b.spec.VMs[i]
		folder, err := b.folder(folders.VmFolder, vm.Folder)
		if err != nil {
			return nil, err
		}
		config, err := b.configSpec(vm)
		if err != nil {
			return nil, fmt.Errorf("VM %s: %v", vm.Name, err)
		}
		result, err := b.waitTask(folder.CreateVM(b.ctx, config, pool, clusterHosts[i%len(clusterHosts)]))
		if err != nil {
			return nil, fmt.Errorf("creating VM %s: %v", vm.Name, err)
		}
		ref := result.(types.ManagedObjectReference)
		if vm.Power == "on" {
			if _, err := b.waitTask(object.NewVirtualMachine(b.client, ref).PowerOn(b.ctx)); err != nil {
				return nil, fmt.Errorf("powering on VM %s: %v", vm.Name, err)
			}
		}
		refs = append(refs, ref)
	}
	return refs, nil
}

// folder returns the folder at a slash-separated path below parent,
// creating the missing parts.
func (b *builder) folder(parent *object.Folder, rel string) (*object.Folder, error) {
	if rel == "" {
		return parent, nil
	}
	current := parent
	for _, name := range strings.Split(rel, "/") {
		children, err := current.Children(b.ctx)
		if err != nil {
			return nil, err
		}
		var next *object.Folder
		for _, child := range children {
			if f, ok := child.(*object.Folder); ok {
				if n, err := f.ObjectName(b.ctx); err == nil && n == name {
					next = f
					break
				}
			}
		}
		if next == nil {
			if next, err = current.CreateFolder(b.ctx, name); err != nil {
				return nil, fmt.Errorf("creating folder %s: %v", rel, err)
			}
		}
		current = next
	}
	return current, nil
}

// configSpec is the CreateVM spec of one VM: its controllers with ESXi's
// keys, its disks at their units, and its network adapters.
func (b *builder) configSpec(vm *VMSpec) (types.VirtualMachineConfigSpec, error) {
	cbt := vm.CBTEnabled
	config := types.VirtualMachineConfigSpec{
		Name:                  vm.Name,
		GuestId:               vm.GuestID,
		NumCPUs:               vm.CPUs,
		NumCoresPerSocket:     1,
		MemoryMB:              vm.MemoryMB,
		ChangeTrackingEnabled: &cbt,
		Files:                 &types.VirtualMachineFileInfo{VmPathName: "[" + b.spec.Datastore + "]"},
	}

	var devices []types.BaseVirtualDevice
	controllers := map[string]types.BaseVirtualController{}
	controllerFor := func(kindName string, bus int32) types.BaseVirtualController {
		id := fmt.Sprintf("%s%d", kindName, bus)
		if c, ok := controllers[id]; ok {
			return c
		}
		kind := controllerKinds[kindName]
		var dev types.BaseVirtualDevice
		switch kindName {
		case "scsi":
			dev = scsiTypes[vm.SCSIType]()
			dev.(types.BaseVirtualSCSIController).GetVirtualSCSIController().SharedBus = types.VirtualSCSISharingNoSharing
			dev.(types.BaseVirtualSCSIController).GetVirtualSCSIController().ScsiCtlrUnitNumber = 7
		case "sata":
			dev = &types.VirtualAHCIController{}
		case "nvme":
			dev = &types.VirtualNVMEController{}
		case "ide":
			// Every VM has the two IDE controllers (keys 200 and 201)
			// already; this stands for one of them, to name its key.
			c := &types.VirtualIDEController{}
			c.Key = kind.ctrlKey + bus
			controllers[id] = c
			return c
		}
		c := dev.(types.BaseVirtualController)
		vc := c.GetVirtualController()
		vc.Key = kind.ctrlKey + bus
		vc.BusNumber = bus
		vc.ControllerKey = 100 // the PCI controller
		vc.DeviceInfo = &types.Description{Label: fmt.Sprintf("%s %d", kind.labelName, bus), Summary: kind.labelName}
		controllers[id] = c
		devices = append(devices, dev)
		return c
	}

	var change []types.BaseVirtualDeviceConfigSpec
	for j, d := range vm.Disks {
		ctrl := controllerFor(d.Controller, d.Bus)
		unit := *d.Unit
		disk := &types.VirtualDisk{
			VirtualDevice: types.VirtualDevice{
				Key:           *d.Key,
				ControllerKey: ctrl.GetVirtualController().Key,
				UnitNumber:    &unit,
				DeviceInfo:    &types.Description{Label: fmt.Sprintf("Hard disk %d", j+1)},
				Backing: &types.VirtualDiskFlatVer2BackingInfo{
					VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{
						// Only the datastore: the simulator names the file
						// <vm>.vmdk, <vm>_1.vmdk, ... as ESXi does.
						FileName: "[" + b.spec.Datastore + "]",
					},
					DiskMode:        string(types.VirtualDiskModePersistent),
					ThinProvisioned: d.Thin,
				},
			},
			CapacityInKB:    d.CapacityBytes / 1024,
			CapacityInBytes: d.CapacityBytes,
		}
		// The controllers' device lists are filled in by the tracker's sync.
		change = append(change, &types.VirtualDeviceConfigSpec{
			Operation:     types.VirtualDeviceConfigSpecOperationAdd,
			FileOperation: types.VirtualDeviceConfigSpecFileOperationCreate,
			Device:        disk,
		})
	}

	for i, name := range *vm.Networks {
		network, err := b.finder.Network(b.ctx, name)
		if err != nil {
			return config, fmt.Errorf("network %q: %v", name, err)
		}
		backing, err := network.EthernetCardBackingInfo(b.ctx)
		if err != nil {
			return config, fmt.Errorf("network %q: %v", name, err)
		}
		nic, err := object.VirtualDeviceList(nil).CreateEthernetCard("vmxnet3", backing)
		if err != nil {
			return config, err
		}
		card := nic.GetVirtualDevice()
		card.Key = 4000 + int32(i)
		card.DeviceInfo = &types.Description{Label: fmt.Sprintf("Network adapter %d", i+1), Summary: name}
		devices = append(devices, nic)
	}

	// Controllers must come before the disks that name them.
	var adds []types.BaseVirtualDeviceConfigSpec
	for _, dev := range devices {
		adds = append(adds, &types.VirtualDeviceConfigSpec{
			Operation: types.VirtualDeviceConfigSpecOperationAdd,
			Device:    dev,
		})
	}
	config.DeviceChange = append(adds, change...)
	return config, nil
}

// datastorePathToLocal maps "[ds] dir/file.vmdk" to the file on the local
// datastore directory, or "" if the datastore is not known.
func datastorePathToLocal(p string) string {
	var dp object.DatastorePath
	if !dp.FromString(p) {
		return ""
	}
	for _, e := range simulator.Map.All("Datastore") {
		ds, ok := e.(*simulator.Datastore)
		if ok && ds.Name == dp.Datastore {
			return path.Join(ds.Info.GetDatastoreInfo().Url, dp.Path)
		}
	}
	return ""
}

// flatFileOf is the local -flat.vmdk holding the bytes of the disk whose
// descriptor is at the datastore path p (the simulator's naming rule).
func flatFileOf(p string) string {
	local := datastorePathToLocal(p)
	if local == "" {
		return ""
	}
	return strings.Replace(local, ".vmdk", "-flat.vmdk", 1)
}
