"""The test lab (not product, not installed): controller processes on private ports and Mininet networks
(lab), seqstream members played like a helper (members), whole helped slices (slicelab), VM guests (vms).
Used by tests/integration, scripts/demo.py and the benchmarks, which put the repository root on sys.path."""
