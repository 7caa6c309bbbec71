"""The dashboard: a page the daemon serves at ``/`` for the people who run it.

The page is a shell of static files (``static/``: HTML, CSS, JavaScript, an
icon) that holds no data; in the browser it polls the JSON API for running
jobs, relay throughput, recent jobs and job logs, and sends the API token,
when the daemon has one, as the ``Authorization`` header of every call.
There is no build step and nothing is fetched from elsewhere.

- `shell`: :class:`Shell`, the set of files served and the headers they go with.

This package serves files and nothing else: it must not read jobs, relays or
any state of the daemon; the page gets those from the API like any client.
"""
