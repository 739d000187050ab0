"""Capture kinds: what a dump keeps of the teacher's output, one class each.

A kind declares its arrays from a probe of the teacher's output (:meth:`Capture.declare`), turns
each batch of output into named storage tensors on the teacher's device (:meth:`Capture.encode`:
reductions such as top-k run there, so only what is stored crosses to the host), and names its
settings and version (:meth:`Capture.spec`), which go into the manifest and the capture fingerprint.
The writer, reader, verify, info and loader only ever see the declared :class:`ArraySpec`\\ s.
"""

from kdcache.capture.kinds.base import Capture, Encoded
from kdcache.capture.kinds.dense import Dense

KINDS: dict[str, type[Capture]] = {k.kind: k for k in (Dense,)}

__all__ = ["Capture", "Dense", "Encoded", "KINDS"]
