"""Pooled penultimate embeddings: the input of a model's classifier, taken in the same forward pass as its logits.

One mechanism for every model: a forward hook on the classifier records the tensor it receives. The classifier
is timm's ``get_classifier()`` (so the embedding is exactly ``forward_head(forward_features(x), pre_logits=True)``),
else the last ``nn.Linear`` of the model whose output size is the model's number of outputs (torchvision's
``fc`` / ``classifier[-1]`` / ``heads.head``, the CIFAR ResNets' and demo CNNs' final layer), which is what
``torchvision.models.feature_extraction`` would return for the node feeding it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from pipeline.errors import UsageError


def classifier_of(model: nn.Module) -> nn.Module:
    """The module whose input is the embedding (raises UsageError when the model has no linear classifier)."""
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        if isinstance(head, nn.Module) and not isinstance(head, nn.Identity):
            return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UsageError(f"{type(model).__name__} has no linear classifier to take an embedding from")
    return linears[-1]


class FeatureTap:
    """Records the classifier input of ``model`` at every forward: ``tap.features`` [B, D] (flattened).

    Use as ``tap = FeatureTap(model); logits = model(x); emb = tap.pop()``. ``dim`` is the embedding size (the
    classifier's ``in_features`` when it has one). ``remove()`` detaches the hook.
    """

    def __init__(self, model: nn.Module):
        self.head = classifier_of(model)
        self.features: torch.Tensor | None = None
        self._handle = self.head.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        self.features = inputs[0].flatten(1)

    @property
    def dim(self) -> int | None:
        return getattr(self.head, "in_features", None)

    def pop(self) -> torch.Tensor:
        """The features of the last forward (then forgotten); RuntimeError when no forward reached the head."""
        if self.features is None:
            raise RuntimeError("no forward pass reached the classifier since the last pop()")
        f, self.features = self.features, None
        return f

    def remove(self) -> None:
        self._handle.remove()


def embedding_dim(model: nn.Module, crop: int) -> int:
    """The embedding size of ``model`` (one forward of a zero image at its input size)."""
    tap = FeatureTap(model)
    p = next(model.parameters(), None)
    try:
        with torch.inference_mode():
            was = model.training
            model.eval()(torch.zeros(1, 3, crop, crop, device=p.device if p is not None else "cpu"))
            model.train(was)
        return int(tap.pop().shape[1])
    finally:
        tap.remove()
