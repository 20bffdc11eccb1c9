"""Structural rules of the code base (docs/DESIGN.md, "Rules"): one place for each concept.

Each rule reads the library sources as text or AST; each can fail when someone adds a second copy.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIBRARY = ("pipeline", "stage1_teacher_logits", "stage2_student_train", "kd_losses")


def _sources() -> list[Path]:
    return sorted(p for d in LIBRARY for p in (REPO / d).rglob("*.py"))


def test_no_library_function_over_80_lines():
    long = []
    for p in _sources():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{p.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def _calls(name: str) -> list[str]:
    out = []
    for p in _sources():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                if called == name:
                    out.append(str(p.relative_to(REPO)))
    return out


def test_bank_key_is_computed_only_in_pipeline_bank():
    assert _calls("bank_key") and all(p.startswith("pipeline/bank/") for p in _calls("bank_key")), _calls("bank_key")


def test_url_handling_only_in_storage():
    """Only pipeline/storage.py tells paths from URLs (``"://"``) and calls fsspec."""
    offenders = [str(p.relative_to(REPO)) for p in _sources()
                 if p.name != "storage.py" and ('"://"' in p.read_text() or "fsspec." in p.read_text())]
    assert not offenders, offenders


def test_layout_names_are_only_tested_in_layouts():
    """No module but pipeline/data/layouts.py branches on ``manifest.layout``."""
    offenders = []
    for p in _sources():
        if p.name == "layouts.py":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) and node.left.attr == "layout":
                offenders.append(f"{p.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders


def test_no_private_cross_module_imports():
    """``from pipeline.x import _private`` between library modules is not allowed."""
    offenders = []
    for p in _sources():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in LIBRARY:
                offenders += [f"{p.relative_to(REPO)}: {a.name}" for a in node.names
                              if a.name.startswith("_") and a.name != "__version__"]
    assert not offenders, offenders


def _data_import_graph() -> dict[str, set[str]]:
    """pipeline.data module -> the pipeline.data modules it imports (at any level, lazy imports included)."""
    graph: dict[str, set[str]] = {}
    for p in sorted((REPO / "pipeline" / "data").glob("*.py")):
        mod = f"pipeline.data.{p.stem}"
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline.data."):
                deps.add(node.module)
            elif isinstance(node, ast.ImportFrom) and node.module == "pipeline.data":  # from pipeline.data import shards
                deps |= {f"pipeline.data.{a.name}" for a in node.names
                         if (REPO / "pipeline" / "data" / f"{a.name}.py").is_file()}
        graph[mod] = deps
    return graph


def test_no_import_cycle_in_pipeline_data():
    """Lazy imports included: the manifest core knows no layout, and no two data modules import each other
    (directly or around a cycle)."""
    graph = _data_import_graph()
    assert not graph["pipeline.data.manifest"], graph["pipeline.data.manifest"]

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for d in graph.get(todo.pop(), ()):
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    cycles = [m for m in graph if m in reach(m)]
    assert not cycles, cycles


def test_collectives_only_in_pipeline_distributed():
    """Every collective goes through pipeline/distributed.py, which hands each backend what it accepts."""
    offenders = [str(p.relative_to(REPO)) for p in _sources()
                 if p.name != "distributed.py" and ("torch.distributed" in p.read_text() or "dist." in p.read_text())]
    assert not offenders, offenders


def test_cuda_runs_use_the_mixed_backend():
    """NCCL accepts only CUDA tensors: a CUDA run's group also has gloo for CPU tensors and object collectives."""
    from pipeline.distributed import DistInfo, backend_for

    assert backend_for("cuda") == "cpu:gloo,cuda:nccl" and backend_for("cpu") == "gloo"
    assert str(DistInfo(1, 2, 1, "cuda").torch_device) == "cuda:1" and str(DistInfo().torch_device) == "cpu"


def test_dali_is_imported_only_where_images_are_loaded_through_it():
    """Importing every library module does not import DALI (it is imported inside the functions that build
    DALI pipelines)."""
    mods = [".".join(p.relative_to(REPO).with_suffix("").parts) for p in _sources()]
    mods = [m.removesuffix(".__init__") for m in mods if not m.endswith("__main__")]
    code = ("import importlib, sys\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.startswith('nvidia.dali')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
