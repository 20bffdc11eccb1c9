"""Datasets: layouts -> manifests, DALI pipelines, the embedded demo set.

- :mod:`pipeline.data.manifest`: the Manifest (sample identity, fingerprint).
- :mod:`pipeline.data.layouts`: one class per on-disk layout (folders, file lists, CIFAR pickles, tar shards).
- :mod:`pipeline.data.dali`: the DALI pipelines of both stages.
"""

from pipeline.data.layouts import build_manifest, layout_of
from pipeline.data.manifest import Manifest, fingerprint

__all__ = ["Manifest", "build_manifest", "fingerprint", "layout_of"]
