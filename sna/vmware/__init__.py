"""VMware: vCenter sessions and operations, always off the reactor thread.

``interface`` is what the rest of the daemon sees (:class:`IVSphere`, the
credentials record and the errors); the real implementation talks to vCenter
with pyvmomi on the service's thread pool.  Nothing here knows HTTP routes or
jobs; passwords never leave the :class:`Credentials` record.
"""
