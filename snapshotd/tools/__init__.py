"""Tools that are not the daemon: the local multi-node cluster launcher and the demo.

May import every part and the daemon; nothing in the daemon imports them (only the ``snapshotd``
command's ``demo`` subcommand, in ``cli``).
"""
