"""Distributed dump: the coordinator (:mod:`.coordinator`) hands chunk-aligned row ranges of one
dump's plan to Dask workers, which run :mod:`.worker`'s task. ``distributed`` is an optional
dependency (``pip install 'kdcache[dask-dist]'``), imported only when ``--scheduler`` is given."""
