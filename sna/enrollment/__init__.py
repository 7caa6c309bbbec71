"""Enrolling the node with its hub: the node's SSH key, the hub's pinned host key, the
enroll-verify-poll exchange with the hub, its state in the job database.

It owns ``<state-dir>/enrollment/`` and the ``enrollment`` table.  It does not
run ssh: an approved enrollment is handed to the tunnel supervisor
(:mod:`sna.tunnel`) as :class:`~sna.tunnel.settings.TunnelSettings`, and the
supervisor's states come back through
:meth:`~sna.enrollment.service.EnrollmentService.tunnel_changed`.
"""
