"""NBD: the wire protocol, a pipelined client, the pre-flight probe, the relay.

`sna.nbd.wire` is the protocol without I/O, `sna.nbd.client` a Twisted client
over it, `sna.nbd.probe` the handshake check run before a backup starts, and
`sna.nbd.relay` the byte-counting relay.  Nothing in this package knows about
jobs, the API or vCenter; callers pass the reactor in.
"""
