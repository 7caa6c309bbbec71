"""The backup client (SBC) as seen from the daemon.

This package owns everything about the child process: the command line and
environment it is started with, the ProcessProtocol that reads its output,
the parsers that turn that output into :mod:`sna.sbc.events`, and stopping it
(TERM, then KILL).  It knows nothing about HTTP or SQLite: it reports events
to whoever started it.

Modules, from the bottom up:

- `events`: what the client reports, as plain data.
- `parse`: a line of output into events (our JSON lines, the Go client's logrus).
- `command`: the ``--sbc`` command, its program, argv and environment for a job.
- `joblog`: a job's log file and the directory it goes in.
- `protocol`: the ProcessProtocol: lines in, masked, logged, parsed; events and the exit out.
- `spare`: clients started ahead of jobs, and handing one a job.
- `launcher`: starting a job's client (spare or spawn) and stopping it.

Clients a dead daemon left behind are :mod:`sna.jobs.leftovers`' business.
"""
