"""Datasets: layouts -> manifests, DALI pipelines, the embedded demo set."""

from pipeline.data.manifest import Manifest, build_manifest, fingerprint

__all__ = ["Manifest", "build_manifest", "fingerprint"]
