"""Diagnostics computed from a cache alone: the teacher never runs.

* :mod:`kdcache.analysis.calibrate` (``kdcache calibrate``): fit temperature scaling on a dense
  cache of held-out labelled data, ``probabilities = softmax(logits / T)``;
* :mod:`kdcache.analysis.report` (``kdcache report``): one HTML page about a cache (teacher
  accuracy, calibration, confidence, per-class errors) and, optionally, the student runs trained
  from it;
* :mod:`kdcache.analysis.read`: what both share: opening a cache for analysis with clear errors,
  reading its per-row table and its logits a chunk at a time, the reliability bins and ECE;
* :mod:`kdcache.analysis.plots`: the matplotlib figures (Agg backend: no display needed).

Everything is read a chunk at a time (a Parquet part, a chunk of logits), so a cache of any size
is analysed in bounded memory.
"""

from kdcache.analysis.calibrate import Calibration, calibrate, fit_temperature
from kdcache.analysis.read import BINS, Reliability

__all__ = ["BINS", "Calibration", "Reliability", "calibrate", "fit_temperature"]
