"""The node's SSH tunnel to its hub: what it forwards, the ssh that carries it, its state.

Owns the ``ssh`` child process and everything about it.  It does not enrol
the node (:mod:`sna.enrollment` makes the key and the pinned host key this
package is given) and never touches jobs: the rest of the daemon reads its
state.
"""
