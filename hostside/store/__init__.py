"""The snapshot server and its client."""
