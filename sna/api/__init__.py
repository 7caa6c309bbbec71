"""The HTTP API under ``/api/v1``: routes, request validation, JSON errors.

It turns HTTP into calls on the :class:`~sna.jobs.manager.JobManager` and
records into JSON.  It starts no process and opens no file itself.
"""
