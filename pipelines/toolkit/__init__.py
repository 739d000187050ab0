"""Runnable comparisons for the distillation toolkit of `kdcache train` (docs/toolkit.md)."""
