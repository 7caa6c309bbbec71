"""``sendense-backup-client``: one backup job, from a vSphere snapshot into NBD targets.

The client is its own process, started by the daemon (`sna.sbc.launcher`) once
per job; it shares no state with the daemon and reports to it only through
JSON-line events on stdout (``docs/sbc-events.md``).  It talks to vCenter with
pyVmomi directly (blocking calls on worker threads, one at a time, each with a
deadline) and never imports the daemon's async vSphere layer (`sna.vmware`),
the job model or the API.

Modules, from the bottom up:

- `changeid`: CBT change IDs, parsed and compared (pure).
- `extents`: areas of a disk: paging ``QueryChangedDiskAreas``, merging,
  gaps, cutting into requests; zero detection (pure).
- `events`: the JSON-line event encoder and its stdout writer.
- `options`: argv (compatible with the Go client) into one frozen record.
- `tls`: certificate verification for pyVmomi and for Twisted's HTTP client.
- `vsphere`: the blocking pyVmomi session (VM, CBT, snapshot, disks, CBT areas).
- `readers`: where disk bytes come from (`IDiskReader`): the datastore
  ``/folder`` HTTP reader and an NBD reader (nbdkit, the VDDK path).
- `nbdkit`: the ``nbdkit vddk`` servers the client starts per disk once the
  snapshot exists (``--reader vddk``).
- `copier`: one disk from a reader into an NBD target, then FLUSH.
- `job`: the whole run, its cleanup and its events.
- `cli`: ``main``, the reactor, signals and logging.
"""
