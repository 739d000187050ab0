"""Capture: run the frozen teacher over the data and hand finished chunks to the store."""

from kdcache.capture.dump import DumpResult, dump

__all__ = ["DumpResult", "dump"]
