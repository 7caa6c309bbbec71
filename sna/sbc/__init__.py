"""The backup client (SBC) as seen from the daemon.

This package owns everything about the child process: the command line and
environment it is started with, the ProcessProtocol that reads its output,
the parsers that turn that output into :mod:`sna.sbc.events`, and stopping it
(TERM, then KILL).  It knows nothing about HTTP or SQLite: it reports events
to whoever started it.
"""
