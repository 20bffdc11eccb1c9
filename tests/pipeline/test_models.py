"""The model registry (issue 2, point 3): names, architectures, checkpoint loading in every wrapping."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from pipeline.errors import UsageError
from pipeline.models import (available_models, create_model, file_sha256, load_checkpoint_state, register_model,
                             weights_identity)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name, params", [
    # He et al. 2016, Table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M (option-A shortcuts, CIFAR-10)
    ("resnet20", 269_722), ("resnet32", 464_154), ("resnet44", 658_586), ("resnet56", 853_018),
    ("resnet110", 1_727_962),
])
def test_cifar_resnets(name: str, params: int):
    m = create_model(name, 10, "none")
    assert _n_params(m) == params
    m.eval()
    with torch.no_grad():
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert create_model(name, 100).fc.out_features == 100


def test_mobilenet_v1_and_demo_cnns():
    mb = create_model("mobilenet_v1", 1000, None)
    assert _n_params(mb) == 4_231_976  # Howard et al. 2017: 4.2M
    mb.eval()
    with torch.no_grad():
        assert mb(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    for name in ("democnn", "democnn_s"):
        m = create_model(name, 7).eval()
        with torch.no_grad():
            assert m(torch.randn(3, 3, 28, 28)).shape == (3, 7)
    assert _n_params(create_model("democnn_s", 10)) < _n_params(create_model("democnn", 10))


def test_torchvision_names_with_dataset_classes():
    names = available_models()
    for n in ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "resnet20", "resnet56", "mobilenet_v1",
              "democnn_s"):
        assert n in names
    assert names == sorted(names)
    m = create_model("resnet18", 7, "none")
    assert m.fc.out_features == 7


def test_unknown_names_and_weights():
    with pytest.raises(UsageError) as e:
        create_model("resnet19", 10)
    msg = str(e.value)
    assert "resnet19" in msg and "resnet18" in msg and "resnet20" in msg and "democnn_s" in msg and "\n" not in msg
    with pytest.raises(UsageError) as e:
        create_model("resnet18", 1000, "IMAGENET1K_V9")
    assert "IMAGENET1K_V9" in str(e.value) and "IMAGENET1K_V1" in str(e.value) and "DEFAULT" in str(e.value)
    with pytest.raises(UsageError, match="no named weights"):
        create_model("resnet20", 10, "DEFAULT")
    with pytest.raises(UsageError, match="predict 1000 classes"):
        create_model("resnet18", 10, "IMAGENET1K_V1")  # refuses before any download
    with pytest.raises(UsageError, match="weights file not found"):
        create_model("democnn_s", 10, "/nonexistent/teacher.pt")


def test_register_duplicate_raises():
    with pytest.raises(ValueError, match="already registered"):
        register_model("democnn_s")(lambda num_classes=10: nn.Linear(1, num_classes))


@pytest.mark.parametrize("wrap", ["bare", "model", "state_dict", "model_state_dict"])
@pytest.mark.parametrize("prefix", ["", "module.", "module._orig_mod."])
def test_checkpoint_wrappings_and_prefixes(tmp_path: Path, wrap: str, prefix: str):
    torch.manual_seed(3)
    src = create_model("resnet8", 5, "none")
    with torch.no_grad():  # non-default BN buffers, so loading them matters in eval mode
        for mod in src.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    sd = {prefix + k: v for k, v in src.state_dict().items()}
    obj = sd if wrap == "bare" else {wrap: sd, "epoch": 7, "optimizer": {"lr": torch.tensor(0.1)}}
    path = tmp_path / "teacher.pth"
    torch.save(obj, path)
    loaded = load_checkpoint_state(path)
    assert set(loaded) == set(src.state_dict())
    m = create_model("resnet8", 5, str(path)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), src.eval()(x), rtol=0, atol=0)
    ident = weights_identity(str(path))
    assert ident == {"weights": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert file_sha256(path) == ident["sha256"]


def test_bad_checkpoints(tmp_path: Path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file at all")
    with pytest.raises(UsageError, match="cannot read checkpoint"):
        create_model("democnn_s", 10, str(junk))
    other = tmp_path / "other.pt"
    torch.save(create_model("resnet8", 10).state_dict(), other)
    with pytest.raises(UsageError, match="does not fit democnn_s"):
        create_model("democnn_s", 10, str(other))
    # a stage-2 checkpoint records its model: the message names it instead of listing missing keys
    for saved in ({"model": create_model("resnet8", 10).state_dict(), "arch": "resnet8"},  # best.pt
                  {"model": create_model("resnet8", 10).state_dict(), "config": {"student": "resnet8"}}):  # last.pt
        torch.save(saved, other)
        with pytest.raises(UsageError, match="holds a 'resnet8' model, not 'democnn_s': name resnet8 as the model"):
            create_model("democnn_s", 10, str(other))
    wrong_classes = tmp_path / "c5.pt"
    torch.save(create_model("democnn_s", 5).state_dict(), wrong_classes)
    with pytest.raises(UsageError, match="10 classes"):
        create_model("democnn_s", 10, str(wrong_classes))
    nodict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], nodict)
    with pytest.raises(UsageError, match="holds no state dict but a list"):
        load_checkpoint_state(nodict)
    assert weights_identity(None) == {"weights": "none"} and weights_identity("None") == {"weights": "none"}
    assert weights_identity("IMAGENET1K_V1") == {"weights": "IMAGENET1K_V1"}
