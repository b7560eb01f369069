"""migrated: live memory migration over TCP with XBZRLE page deltas."""

__version__ = "0.1.0"
