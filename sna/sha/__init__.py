"""Talking to the SHA: change IDs before a job, live telemetry during it, completions after.

The SHA is sna's one real client and the contract is its own
(``reference/sha-contract.md``): its three node-facing routes, their exact
types and the order of calls.  :mod:`~sna.sha.messages` builds what is
sent, :mod:`~sna.sha.client` sends one request, :mod:`~sna.sha.live` pushes
running jobs' telemetry, and :mod:`~sna.sha.outbox` delivers what must
arrive (completions, final states) from the store, across restarts.
Nothing here changes a job.
"""
