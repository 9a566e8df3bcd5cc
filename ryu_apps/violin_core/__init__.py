"""violin-snapshot: the controller's pure core (never imports ryu)."""

__version__ = "0.1.0"
