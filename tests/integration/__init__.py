"""End-to-end tests: the real daemon, the backup-client double, HTTP on loopback."""
