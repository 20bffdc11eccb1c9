"""Label maps: a teacher's classifier applied at every cell of its last feature map (ReLabel, Yun et al. CVPR 2021,
naver-ai/relabel_imagenet; TokenLabeling, Jiang et al. NeurIPS 2021, for ViT patch tokens).

:func:`label_map_model` turns a classification model into a map model, ``x [B, 3, H, W] -> [B, C, h, w]`` logits
per cell, for the heads where that is meaningful:

| kind | models | map |
|---|---|---|
| ``pool_linear`` | torchvision ResNet, RegNet, EfficientNet, MobileNetV2; this project's ``democnn*``, CIFAR ``resnet*``, ``mobilenet_v1`` | the linear classifier at every cell of the feature map the global average pool reads: its mean over the cells is the model's logits (linearity) |
| ``pool_head`` | torchvision ConvNeXt (LayerNorm head), MobileNetV3 (MLP head) | the whole head at every cell (the cell mean is close to, not equal to, the logits: the head is not linear) |
| ``timm_cnn`` | timm models whose ``forward_features`` gives ``[B, D, h, w]`` and whose ``forward_head`` pools it | ``forward_head`` of each cell as a 1x1 map (exact when the head is pool + linear) |
| ``timm_vit`` | timm ``VisionTransformer`` | ``head(fc_norm(token))`` of every patch token (TokenLabeling; never exact: the class token or a normalised mean decides) |

Any other head (VGG's and AlexNet's MLP over a flattened 7x7 map, SqueezeNet's, torchvision's ViT, ...) is a
one-line :class:`~pipeline.errors.UsageError` naming the supported kinds. :class:`LabelMapEnsemble` runs T map
models as :class:`~pipeline.models.ensemble.TeacherEnsemble` runs T teachers (class maps, input branches) and
resamples every map to ``S x S`` cells.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.errors import UsageError
from pipeline.models.ensemble import TeacherEnsemble

SUPPORTED = ("torchvision ResNet/RegNet/EfficientNet/ConvNeXt/MobileNetV2/MobileNetV3, this project's democnn, "
             "CIFAR resnet and mobilenet_v1, timm CNNs (forward_features -> [B, D, h, w] + forward_head) and timm "
             "VisionTransformers (patch tokens)")


class LabelMapModel(nn.Module):
    """``model`` as a map model: ``forward(x [B, 3, H, W]) -> [B, C, h, w]`` float32 logits per cell.

    ``kind``: the row of the module's table; ``body(x)`` -> the cells' features ``[B, D, h, w]``; ``head(f [M, D])``
    -> ``[M, C]``. Build it with :func:`label_map_model`."""

    def __init__(self, model: nn.Module, kind: str, body: Callable[[torch.Tensor], torch.Tensor],
                 head: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.model, self.kind = model, kind
        self._body, self._head = body, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self._body(x)
        b, d, h, w = f.shape
        cells = f.permute(0, 2, 3, 1).reshape(b * h * w, d)
        return self._head(cells).float().reshape(b, h, w, -1).permute(0, 3, 1, 2)


def _hooked_input(model: nn.Module, module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """body(x): run ``model`` and return the input ``module`` (the global pool) received."""
    def body(x: torch.Tensor) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        try:
            model(x)
        finally:
            handle.remove()
        return seen[-1]
    return body


def _torchvision_map(model: nn.Module) -> LabelMapModel | None:
    import torchvision.models as tvm

    if isinstance(model, (tvm.ResNet, tvm.RegNet)):
        return LabelMapModel(model, "pool_linear", _hooked_input(model, model.avgpool), model.fc)
    if isinstance(model, tvm.EfficientNet):
        return LabelMapModel(model, "pool_linear", _hooked_input(model, model.avgpool), model.classifier)
    if isinstance(model, tvm.MobileNetV2):
        return LabelMapModel(model, "pool_linear", model.features, model.classifier)
    if isinstance(model, tvm.MobileNetV3):
        return LabelMapModel(model, "pool_head", _hooked_input(model, model.avgpool), model.classifier)
    if isinstance(model, tvm.ConvNeXt):
        return LabelMapModel(model, "pool_head", _hooked_input(model, model.avgpool),
                             lambda c: model.classifier(c[:, :, None, None]))
    return None


def _own_map(model: nn.Module) -> LabelMapModel | None:
    from pipeline.models.cifar import CifarResNet, DemoCNN, MobileNetV1

    if isinstance(model, (DemoCNN, MobileNetV1)):
        return LabelMapModel(model, "pool_linear", model.features, model.fc)
    if isinstance(model, CifarResNet):
        return LabelMapModel(model, "pool_linear", lambda x: model.layers(F.relu(model.bn1(model.conv1(x)))),
                             model.fc)
    return None


def _timm_map(model: nn.Module) -> LabelMapModel | None:
    if not type(model).__module__.startswith("timm."):
        return None
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        def tokens(x: torch.Tensor) -> torch.Tensor:
            t = model.forward_features(x)[:, model.num_prefix_tokens:]
            gh, gw = model.patch_embed.dynamic_feat_size(x.shape[-2:]) if getattr(
                model, "dynamic_img_size", False) else model.patch_embed.grid_size
            return t.reshape(t.shape[0], gh, gw, -1).permute(0, 3, 1, 2)

        return LabelMapModel(model, "timm_vit", tokens, lambda c: model.head(model.head_drop(model.fc_norm(c))))
    if getattr(model, "output_fmt", "NCHW") != "NCHW" or not hasattr(model, "forward_head") \
            or not hasattr(model, "global_pool"):
        return None
    return LabelMapModel(model, "timm_cnn", model.forward_features,
                         lambda c: model.forward_head(c[:, :, None, None]).flatten(1))


def label_map_model(model: nn.Module, name: str = "") -> LabelMapModel:
    """The map model of ``model`` (kinds in the module docstring). ``name``: the teacher's name, for messages.

    Raises UsageError (one line, naming the supported kinds) for any other head."""
    for make in (_own_map, _torchvision_map, _timm_map):
        out = make(model)
        if out is not None:
            return out.eval()
    raise UsageError(f"teacher {name or type(model).__name__} ({type(model).__name__}) has no global-pooling "
                     f"classifier head to apply per cell: --format labelmap supports {SUPPORTED}")


def resample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """[B, C, h, w] -> [B, C, size, size]: unchanged at the native size; area-averaged
    (``adaptive_avg_pool2d``) when smaller, which keeps the cell mean when ``size`` divides h and w; bilinear
    (``align_corners=False``) when larger."""
    h, w = maps.shape[-2:]
    if (h, w) == (size, size):
        return maps
    if size <= min(h, w):
        return F.adaptive_avg_pool2d(maps, size)
    return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)


class LabelMapEnsemble(nn.Module):
    """T map models in one forward: ``images`` (one tensor per input branch) -> ``[B, T, S·S, C]`` float32, the
    cells in row-major (y, x) order on the third axis (a map bank's writer buffers them as S·S "views"),
    each teacher's map mapped onto the dataset's classes (``TeacherEnsemble``'s class maps) and resampled to S."""

    def __init__(self, ensemble: TeacherEnsemble, names: Sequence[str], size: int | None, crops: Sequence[int]):
        """``size``: S, or None for the teachers' native size (they must agree); ``crops``: each teacher's input
        size (to measure its native map). Raises UsageError for an unsupported head or disagreeing sizes."""
        super().__init__()
        self.ensemble = ensemble
        self.maps = nn.ModuleList([label_map_model(m, n) for m, n in zip(ensemble.models, names)])
        p = next(ensemble.parameters(), None)
        dev = p.device if p is not None else torch.device("cpu")
        with torch.inference_mode():
            self.native = [int(m(torch.zeros(1, 3, c, c, device=dev)).shape[-1]) for m, c in zip(self.maps, crops)]
        if size is None and len(set(self.native)) > 1:
            raise UsageError(f"the teachers' native label maps differ in size ({', '.join(map(str, self.native))} "
                             "cells): give --map-size S")
        self.size = int(size or self.native[0])
        if self.size < 1:
            raise UsageError(f"--map-size {self.size}: give a size >= 1")
        self.kinds = [m.kind for m in self.maps]
        self.features = None  # the dump reads it (no embeddings with maps)

    def train(self, mode: bool = True) -> "LabelMapEnsemble":
        return super().train(False)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        inputs = [images] if torch.is_tensor(images) else list(images)
        ens, outs = self.ensemble, []
        for t, m in enumerate(self.maps):
            z = m(inputs[ens.branch_of[t]])
            if ens.mapped[t]:
                z = z.index_select(1, getattr(ens, f"class_map_{t}"))
            z = resample(z, self.size)
            outs.append(z.flatten(2).transpose(1, 2))  # [B, S·S, C], row-major cells
        return torch.stack(outs, dim=1)
