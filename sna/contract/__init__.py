"""What the daemon and the backup client agree on, and what both agree on with the SHA.

Plain rules and names only: no Twisted, no I/O.  Both sides import these
modules, so a value one side accepts or writes is one the other reads.
"""
