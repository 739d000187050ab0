"""kdcache: offline soft-target caching for knowledge distillation.

Run the teacher once (``kdcache dump``), then train any number of students from the cached
targets (``kdcache train`` or your own loop with :func:`kdcache.open` and
:func:`kdcache.losses.kd_loss`).
"""

__version__ = "0.1.0"

from kdcache.sources import _spec_import  # noqa: E402,F401 - lets spawned workers import spec files' objects
from kdcache.store.reader import Cache, open_cache as open  # noqa: E402,A001

__all__ = ["Cache", "open", "__version__"]
