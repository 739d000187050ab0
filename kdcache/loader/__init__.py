"""Loader: cached targets as a shuffled torch dataset, sharded over DDP ranks and workers.

``order`` holds the sample order as a pure function; ``dataset`` reads a cache in that order.
"""

from kdcache.loader.dataset import CacheDataset, CacheLoader, DatasetRows, make_loader, resolve_world
from kdcache.loader.order import EpochPlan

__all__ = ["CacheDataset", "CacheLoader", "DatasetRows", "EpochPlan", "make_loader", "resolve_world"]
