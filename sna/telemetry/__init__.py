"""What the daemon tells monitoring: Prometheus metrics.

This package reads the job manager and the relay registry; it never changes
either.  What the SHA is told is :mod:`sna.sha`'s.
"""
