"""The byte-counting TCP relay the daemon puts in front of each NBD target port.

For the life of a backup job the backup client does not connect to the hub's
NBD port itself: it connects to a :class:`Relay` on loopback, and the relay
opens one upstream connection per client connection and moves the bytes,
counting them each way.  :class:`RelayRegistry` holds every relay of the
daemon for the API and the metrics.

The package owns the listening port, both sockets of every relayed
connection and their byte counts.  It must not touch the bytes: it never
alters, delays or parses NBD traffic, except that it remembers the last
request header the client sent, to tell a clean ``NBD_CMD_DISC`` end of
session from a hub that went away.  It never decides what happens to a job.

- `counters`: the figures (:class:`RelayStats`), the rate window, the last bytes seen;
- `pumps`: the copy data path, two pumps between lent sockets;
- `connection`: one relayed connection, its protocols, data path and phase;
- `lifecycle`: :class:`Relay`, listening, stopping, incidents, figures;
- `registry`: :class:`RelayRegistry`.

Import from here; the modules are the package's own layout.
"""

from sna.nbd.relay.counters import RATE_STEP, RATE_WINDOW, RelayState, RelayStats
from sna.nbd.relay.lifecycle import CONNECT_TIMEOUT, STOP_GRACE, DataPath, Relay
from sna.nbd.relay.registry import RelayRegistry

__all__ = [
    "CONNECT_TIMEOUT",
    "RATE_STEP",
    "RATE_WINDOW",
    "STOP_GRACE",
    "DataPath",
    "Relay",
    "RelayRegistry",
    "RelayState",
    "RelayStats",
]
