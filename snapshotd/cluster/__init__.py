"""The cluster: placement of groups and stripes, the erasure codec, the peer protocol and its
transport, protection (encoding and retention), parity files and node rebuild; ``start`` wires
them together for one node.

May import ``common`` and ``node``; nothing from ``ops``, ``tools`` or the daemon.
"""
