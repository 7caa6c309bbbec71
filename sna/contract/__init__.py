"""What the daemon and the backup client agree on, and what both agree on with the SHA.

Plain rules and names: no Twisted, and no I/O but one blocking request,
the vim25 API version both ask vCenter for before they log in
(:mod:`sna.contract.soap`).  Both sides import these modules, so a value one
side accepts or writes is one the other reads, and vCenter is asked the same
way by both.
"""
