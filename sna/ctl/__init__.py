"""``sna-ctl``: the operator's command line for a running ``twistd sna``.

It talks to the daemon's HTTP API only (``client``), with the URL and token
from options, the environment or a config file (``config``); it shows jobs,
relays, health, job logs, live progress (``watch``) and the vCenter
certificates the daemon trusts.  ``format`` turns numbers into text for
people; ``cli`` is the argument parsing and the commands.  Nothing here
imports Twisted: it is a plain, synchronous program.
"""
