"""Demo and test workloads (not product, not installed): the Mandelbrot demo, the consistency oracle
(seqstream members, the oracle check, guestctl for VM guests). Run from the repository root:
``python -m workloads.oracle DIR...``."""
