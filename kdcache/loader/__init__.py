"""Loader: cached targets as a chunk-shuffled torch dataset, sharded over DDP ranks and workers.

``order`` holds the sample order as pure functions; ``dataset`` reads a cache in that order.
"""

from kdcache.loader.dataset import CacheDataset, DatasetRows, make_loader, resolve_world
from kdcache.loader.order import chunk_order, partition, shuffle_buffer_batches

__all__ = ["CacheDataset", "DatasetRows", "chunk_order", "make_loader", "partition", "resolve_world",
           "shuffle_buffer_batches"]
