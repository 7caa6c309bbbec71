"""sna: the Sendense Node Appliance control daemon.

The package is wired together by :mod:`sna.tap`; each subpackage owns one part
of the node (the HTTP API, the job records, the backup-client launcher).
"""

__version__ = "1.4.0"
