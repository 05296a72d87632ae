"""Shared infrastructure every part of snapshotd may import: the control protocol, the
configuration, the metrics, the request/reply channel and the router loop.

Imports nothing from the other parts (``node``, ``cluster``, ``ops``, ``tools``) nor from the
daemon. Layer order, lower first: common < node < cluster < ops < daemon < tools < cli;
a module may import its own part and the parts below it (``tests/unit/test_layout.py``).
"""
