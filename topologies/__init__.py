"""Mininet topologies for violin-snapshot (usable with ``mn --custom``)."""
