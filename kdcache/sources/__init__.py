"""Sources: turn the strings a user types (specs) into a teacher, a student and a dataset."""

from kdcache.sources.specs import freeze, load_checkpoint, load_dataset, load_module, resolve
from kdcache.sources.items import split_item

__all__ = ["freeze", "load_checkpoint", "load_dataset", "load_module", "resolve", "split_item"]
