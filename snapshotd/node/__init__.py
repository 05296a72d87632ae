"""The node: the snapshot store and its budget, the shared-memory segments and the control
server that trainers talk to.

May import ``common``; nothing from ``cluster``, ``ops``, ``tools`` or the daemon.
"""
