"""What the daemon tells monitoring: Prometheus metrics.

This package reads the job manager and the relay registry; it never changes
either.  (The push of final job states to the SHA arrives with the backup
client work.)
"""
