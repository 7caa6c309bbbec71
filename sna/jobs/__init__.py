"""Backup jobs: what was asked, what happened, and keeping it.

``model`` holds the immutable records and the state machine, ``store`` keeps
them in SQLite, ``manager`` runs them (one backup-client process per job).
Nothing here parses HTTP: requests arrive already validated.
"""
