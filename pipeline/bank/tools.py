"""Label-bank tools on dask: ``python -m pipeline.labels {ensemble,compact,stats} …``.

- ``ensemble A B … -o OUT --mode mean-logits|mean-probs|stack``: combine banks of the same samples, views and
  classes. ``mean-logits``: mean of the logits of all teachers of all inputs (each teacher weighs the same) -> T=1;
  ``mean-probs``: log of the mean of their probabilities (log-probabilities are valid logits) -> T=1;
  ``stack``: concatenate on the teacher axis. The result is a normal dense, complete bank.
- ``compact SRC -o OUT --format topk --topk K`` | ``--format sampled --topk K --samples S`` | ``--format int8``: a compact bank (see
  :mod:`pipeline.bank.compact`), read back transparently by :class:`pipeline.bank.reader.LabelBank`; its
  attrs carry ``fidelity`` (mean KL(p || p^) at T = 1, 2, 4, top-1 agreement) against the source. It encodes
  each row chunk exactly as ``dump_logits --format`` does (:func:`pipeline.bank.compact.encode_chunk`).
- ``stats BANK [--plots DIR]``: teacher metrics, entropy, per-class accuracy and agreement between teachers on
  stdout; with ``--plots``, the entropy distribution, reliability diagram, per-class accuracy and confusion matrix
  as PNGs and ``stats.json`` in DIR.

All three run as dask graphs over the zarr chunks (:mod:`pipeline.bank.daskio`): threaded by default,
``--scheduler tcp://HOST:PORT`` for a dask.distributed cluster, ``--scheduler local-cluster`` for a 2-process
LocalCluster. Outputs are built under ``<OUT>.tmp-<pid>`` and renamed when complete; an existing OUT is only
replaced with ``--overwrite``. Bad input (missing / incomplete / mismatched banks, bad mode, format or K) exits 2
with a one-line message.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr

from pipeline import __version__, storage
from pipeline.bank import compact as cp
from pipeline.bank import daskio, jobs, stats as st
from pipeline.bank.reader import LabelBank, class_index, teacher_preprocessing
from pipeline.bank.writer import format_attrs
from pipeline.bank.schema import SCHEMA_VERSION, TOPK_TAILS, compact_array_specs, create_bank_arrays
from pipeline.errors import BankError, UsageError

log = logging.getLogger(__name__)

ENSEMBLE_MODES = ("mean-logits", "mean-probs", "stack")


def _open_complete(path: str) -> LabelBank:
    bank = LabelBank(path)
    bank.require_complete()
    return bank


def _view_param_inputs(bank: LabelBank, rows: int) -> dict[str, Any]:
    """The stored view parameters of an augmenting view policy (``view_params``, ``view_partner``) as job inputs,
    copied row for row into the output (without them its views would replay unaugmented); {} for other banks."""
    if "view_params" not in bank.group:
        return {}
    return {name: daskio.rows_array(bank.group[name], rows) for name in ("view_params", "view_partner")}


def _source_record(bank: LabelBank) -> dict[str, Any]:
    return {"path": storage.absolute(bank.path), "key": bank.attrs.get("key"), "format": bank.format,
            "teachers": [t.get("name", t.get("arch")) for t in bank.teachers]}


def _derived_key(kind: str, params: dict[str, Any], sources: list[dict[str, Any]]) -> str:
    payload = {"schema_version": SCHEMA_VERSION, "tool": kind, "params": params,
               "sources": [s.get("key") for s in sources]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# --- ensemble -----------------------------------------------------------------------------------------------
def check_compatible(banks: list[LabelBank]) -> None:
    """Refuse banks that do not describe the same samples, classes and views (one line naming the field)."""
    ref = banks[0]
    ds0 = ref.attrs.get("dataset", {})
    for b in banks[1:]:
        ds = b.attrs.get("dataset", {})
        checks = [
            ("num_samples", ref.num_samples, b.num_samples),
            ("num_classes", ref.num_classes, b.num_classes),
            ("classes", ds0.get("classes"), ds.get("classes")),
            ("fingerprint", ds0.get("fingerprint"), ds.get("fingerprint")),
            ("num_views", ref.num_views, b.num_views),
            ("views", ref.attrs.get("views"), b.attrs.get("views")),
        ]
        for field, a, c in checks:
            if a != c:
                sa, sc = _short(a), _short(c)
                if field == "classes":
                    sa, sc = f"{len(a or [])} names", f"{len(c or [])} names"
                    diff = next((i for i, (x, y) in enumerate(zip(a or [], c or [])) if x != y), None)
                    if diff is not None:
                        sa, sc = f"{a[diff]!r} at {diff}", f"{c[diff]!r} at {diff}"
                raise BankError(f"cannot combine banks: field '{field}' differs: {sa} in {ref.path}, {sc} in {b.path}")


def _warn_features_dropped(banks: list[LabelBank], tool: str) -> None:
    """The derived bank holds soft labels only: stored embeddings are not copied (their attribute is dropped)."""
    for b in banks:
        if b.feature_meta is not None:
            log.warning("%s: %s stores teacher embeddings; the %s bank keeps soft labels only (embedding KD reads "
                        "the source bank)", tool, b.path, tool)


def _member_attrs(banks: list[LabelBank], mode: str, c: int) -> dict[str, Any]:
    """The per-teacher attrs of an ensemble: ``stack`` keeps each member's preprocessing, its source and the
    output feeding each class (``per_teacher``, ``preprocessing_source``, ``class_index``, ``class_maps``); a mean
    is one virtual teacher over logits already in the dataset's class order (one to one), with the first bank's
    preprocessing. Banks dumped with other preprocessing are named in a warning: a student reads one
    preprocessing (``--preset auto`` takes the first teacher's)."""
    pres = [p for b in banks for p in teacher_preprocessing(dict(b.attrs))]
    plain = [{k: v for k, v in p.items() if k not in ("source", "teacher_amp")} for p in pres]
    if any(p != plain[0] for p in plain[1:]):
        names = ", ".join(f"{b.path}: '{p.get('name')}' (crop {p.get('crop')})" for b in banks
                          for p in teacher_preprocessing(dict(b.attrs)))
        log.warning("ensemble of banks dumped with different preprocessing (%s): the teachers saw the images "
                    "differently; the bank records each teacher's, and stage 2's --preset auto takes the first "
                    "(give --preset to choose)", names)
    first = dict(banks[0].attrs.get("preprocessing") or {})
    first.pop("per_teacher", None)
    if mode != "stack":
        return {"preprocessing": first, "class_index": [list(range(c))], "class_maps": None,
                "preprocessing_source": [f"ensemble ({mode}): the first bank's, {pres[0].get('source') or '?'}"]}
    index = [m for b in banks for m in class_index(dict(b.attrs))]
    out: dict[str, Any] = {"class_index": index,
                           "class_maps": [m if m != list(range(c)) else None for m in index],
                           "preprocessing_source": [p.get("source") for p in pres]}
    if any(p != plain[0] for p in plain[1:]):
        out["preprocessing"] = {**first, "per_teacher": [{k: v for k, v in p.items() if k != "source"} for p in pres]}
    return out


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return s if len(s) <= 70 else s[:67] + "..."


def _run_job(g: zarr.Group, job, scheduler: str | None, progress: bool, desc: str, what: str):
    """Compute a per-chunk job on ``scheduler``, then mark every chunk of ``g`` done; returns the job's sums."""
    with daskio.scheduler(scheduler) as client:
        try:
            (vec,) = daskio.compute([job], client, progress, desc=desc)
        except (BankError, UsageError):
            raise
        except Exception as e:
            raise daskio.job_error(what, e) from None
    with zarr.config.set({"array.write_empty_chunks": True}):
        g["done"][:] = True
    return vec


def ensemble_banks(paths: Sequence[str], out: str, mode: str = "mean-logits", overwrite: bool = False,
                   scheduler: str | None = None, dtype: str | None = None, rows_per_chunk: int | None = None,
                   progress: bool = True) -> str:
    """Combine the banks at ``paths`` into a new complete dense bank at ``out``; returns ``out``."""
    if mode not in ENSEMBLE_MODES:
        raise UsageError(f"unknown --mode '{mode}'; valid: {', '.join(ENSEMBLE_MODES)}")
    if not paths:
        raise UsageError("ensemble needs at least one input bank")
    if dtype not in (None, "float16", "float32"):
        raise UsageError(f"unknown --dtype '{dtype}'; valid: float16, float32")
    banks = [_open_complete(p) for p in paths]
    check_compatible(banks)
    _warn_features_dropped(banks, "ensemble")
    daskio.check_output(out, overwrite)
    ref = banks[0]
    n, _, v, c = ref.shape
    t_all = sum(b.num_teachers for b in banks)
    t_out = t_all if mode == "stack" else 1
    dtype = dtype or ("float32" if any(b.attrs.get("dtype") == "float32" for b in banks) else "float16")
    if rows_per_chunk is not None and rows_per_chunk < 1:
        raise UsageError(f"--rows-per-chunk {rows_per_chunk} must be >= 1")
    rows = int(rows_per_chunk or ref.rows_per_chunk)
    members = [{**t, "source": i} for i, b in enumerate(banks) for t in b.teachers]
    if mode == "stack":
        teachers = members
    else:
        label = f"{mode}({'+'.join(t.get('name', t.get('arch', '?')) for t in members)})"
        teachers = [{"name": label, "arch": label, "weights": "ensemble", "mode": mode, "members": members}]
    sources = [_source_record(b) for b in banks]
    key = _derived_key("ensemble", {"mode": mode, "dtype": dtype}, sources)

    import dask.array as da

    with daskio.atomic_output(out, overwrite) as tmp:
        attrs = {k: val for k, val in ref.attrs.items()
                 if k not in ("format", "metric_sums", "compact_arrays", "topk", "tail", "chunk_sums_layout", "fidelity",
                              "metrics", "source_metrics", "raw_bytes_per_vector", "features")}
        attrs.update({"key": key, "teachers": teachers, "sources": sources, **_member_attrs(banks, mode, c),
                      "ensemble": {"mode": mode, "num_members": t_all},
                      "config": {"tool": "ensemble", "mode": mode, "inputs": [s["path"] for s in sources]}})
        from pipeline.bank.writer import create_bank, mark_complete

        g = create_bank(tmp, attrs, (n, t_out, v, c), dtype, rows)
        rows = daskio.block_rows(g["logits"])
        x = da.concatenate([daskio.logits_array(b, rows) for b in banks], axis=1)
        skipped = da.stack([daskio.rows_array(b.group["skipped"], rows) for b in banks], axis=1)
        inputs = {"x": x, "labels": daskio.rows_array(ref.group["labels"], rows),
                  "views": daskio.rows_array(ref.group["views"], rows), "skipped": skipped,
                  **_view_param_inputs(ref, rows)}
        job = daskio.block_job(jobs.ensemble_block, inputs, rows, n, out=daskio.Output(tmp), mode=mode,
                               fp16=dtype == "float16")
        vec = _run_job(g, job, scheduler, progress, f"ensemble ({mode}) of {len(banks)} banks", f"ensemble into {out}")
        metrics = st.metrics_from_states(vec, st.entry_names(teachers, t_out))
        mark_complete(g, {"metrics": metrics})
    log.info("ensemble (%s) of %d banks -> %s  %s", mode, len(banks), out, metrics)
    return out


# --- compact ------------------------------------------------------------------------------------------------
def _create_compact(path: str, src: LabelBank, fmt: str, k: int | None, rows: int,
                    samples: int | None) -> zarr.Group:
    n, t, v, c = src.shape
    g = zarr.open_group(str(path), mode="w")
    # float arrays fill with NaN and top-k indices with -1: a missing chunk is refused by the stage-2 loader
    create_bank_arrays(g, n, t, v, c, str(src.attrs.get("dtype", "float16")), rows, fmt, k, cp.sums_width(t),
                       samples, len(src.attrs.get("views", {}).get("params_columns", [])))
    return g


def compact_bank(src: str, out: str, fmt: str = "topk", k: int | None = None, overwrite: bool = False,
                 scheduler: str | None = None, rows_per_chunk: int | None = None, progress: bool = True,
                 samples: int | None = None, sample_seed: int = 0) -> str:
    """Write a compact copy of the dense bank ``src`` at ``out``; returns ``out``. ``sampled`` draws with
    ``sample_seed`` exactly as ``dump_logits --format sampled --sample-seed`` does (the draws are seeded by row)."""
    if fmt not in cp.FORMATS:
        raise UsageError(f"unknown --format '{fmt}'; valid: {', '.join(cp.FORMATS)}")
    cp.check_format_args(fmt, k, samples)
    bank = _open_complete(src)
    n, t, v, c = bank.shape
    _warn_features_dropped([bank], "compact")
    if bank.format != "dense":
        raise BankError(f"{src} is already compact (format {bank.format}); compact its dense source instead")
    cp.check_format_args(fmt, k, samples, c)
    k = None if k is None else int(k)
    sample_seed = int(sample_seed) if fmt == "sampled" else 0
    daskio.check_output(out, overwrite)
    if rows_per_chunk is not None and rows_per_chunk < 1:
        raise UsageError(f"--rows-per-chunk {rows_per_chunk} must be >= 1")
    rows = int(rows_per_chunk or bank.rows_per_chunk)
    sources = [_source_record(bank)]
    params = {"format": fmt, **({"topk": k, "tail": TOPK_TAILS[0]} if fmt in ("topk", "sampled") else {}),
              **({"samples": samples, "sample_seed": sample_seed} if fmt == "sampled" else {})}
    names = list(compact_array_specs(fmt, bank.shape, k, samples))
    t_names = st.entry_names(bank.teachers, t)

    with daskio.atomic_output(out, overwrite) as tmp:
        g = _create_compact(tmp, bank, fmt, k, rows, samples)
        rows = daskio.block_rows(g[names[0]])
        inputs = {"x": daskio.logits_array(bank, rows), "labels": daskio.rows_array(bank.group["labels"], rows),
                  "views": daskio.rows_array(bank.group["views"], rows),
                  "skipped": daskio.rows_array(bank.group["skipped"], rows), **_view_param_inputs(bank, rows)}
        job = daskio.block_job(jobs.compact_block, inputs, rows, n, out=daskio.Output(tmp), fmt=fmt, k=k, c=c,
                               dtype=str(bank.attrs.get("dtype", "float16")), samples=samples, seed=sample_seed)
        vec = _run_job(g, job, scheduler, progress, f"compact ({fmt}) {src}", f"compact into {out}")
        lay = {key: slice(*span) for key, span in cp.sums_layout(t).items()}
        fidelity = cp.fidelity_from_sums(vec[lay["fidelity"]], fmt)
        metrics = st.metrics_from_states(vec[lay["metrics"]], t_names)
        attrs = {key: val for key, val in bank.attrs.items()
                 if key not in ("metrics", "metric_sums", "complete", "created", "features")}
        attrs.update({
            "schema_version": SCHEMA_VERSION, **format_attrs(fmt, bank.shape, k, samples, sample_seed),
            "shape": [n, t, v, c], "rows_per_chunk": int(g["labels"].chunks[0]),
            "key": _derived_key("compact", params, sources), "sources": sources,
            "source_metrics": bank.attrs.get("metrics"), "fidelity": fidelity,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "package_version": __version__, "complete": False,
        })
        g.attrs.update(attrs)
        from pipeline.bank.writer import mark_complete

        mark_complete(g, {"metrics": metrics})
    log.info("compact (%s) %s -> %s  fidelity %s", fmt, src, out, fidelity)
    return out


# --- stats --------------------------------------------------------------------------------------------------
def bank_stats(path: str, plots: str | None = None, overwrite: bool = False, scheduler: str | None = None,
               view: int = 0, progress: bool = True) -> dict[str, Any]:
    """Statistics of the bank at ``path`` (the summary dict); with ``plots``, PNGs and ``stats.json`` are written
    into that directory."""
    bank = _open_complete(path)
    n, t, v, c = bank.shape
    if not 0 <= view < v:
        raise UsageError(f"--view {view} out of range: the bank has {v} view(s)")
    if plots is not None:
        daskio.check_output(plots, overwrite)
    rows = bank.rows_per_chunk
    inputs = {"x": daskio.logits_array(bank, rows), "labels": daskio.rows_array(bank.group["labels"], rows),
              "skipped": daskio.rows_array(bank.group["skipped"], rows)}
    job = daskio.block_job(jobs.stats_block, inputs, rows, n, view=view)
    with daskio.scheduler(scheduler) as client:
        try:
            (vec,) = daskio.compute([job], client, progress, desc=f"stats {path}")
        except (BankError, UsageError):
            raise
        except Exception as e:
            raise daskio.job_error(f"stats of {path}", e) from None
    names = st.entry_names(bank.teachers, t)
    s = st.summarize(vec, names, t, c, bank.attrs.get("dataset", {}).get("classes"), view)
    s["bank"] = storage.absolute(path)
    s["format"] = bank.format
    if plots is None:
        return s
    with daskio.atomic_output(plots, overwrite) as tmp:
        Path(tmp).mkdir(parents=True)
        s["plots"] = st.plot_stats(s, tmp)
        if c > 100:  # keep stats.json readable: big confusion matrices go to .npy files
            for name, e in s["entries"].items():
                f = f"confusion_{st._slug(name)}.npy"
                np.save(Path(tmp) / f, np.asarray(e["confusion"], np.int64))
                e["confusion"] = f
        st.write_json(s, Path(tmp) / "stats.json")
    return s


# --- CLI ----------------------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, out_flag: bool = True) -> None:
    if out_flag:
        p.add_argument("-o", "--out", required=True, help="output bank (path or fsspec URL)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--scheduler", default="threads",
                   help="threads (default), sync, local-cluster (2 worker processes) or tcp://HOST:PORT")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _add_ensemble(p: argparse.ArgumentParser) -> None:
    p.add_argument("banks", nargs="+", help="input banks (same samples, classes and views)")
    p.add_argument("--mode", default="mean-logits", help="mean-logits (default), mean-probs or stack")
    p.add_argument("--dtype", default=None, help="float16 or float32 (default: float32 if any input is)")
    p.add_argument("--rows-per-chunk", type=int, default=None, dest="rows_per_chunk",
                   help="row chunk of the output (default: the first input's)")
    _common(p)


def _run_ensemble(args: argparse.Namespace) -> int:
    out = ensemble_banks(args.banks, args.out, args.mode, args.overwrite, args.scheduler, args.dtype,
                         args.rows_per_chunk, args.progress)
    print(out)
    return 0


def _add_compact(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="dense source bank")
    p.add_argument("--format", default=None,
                   help="topk, sampled or int8 (default: topk when --topk is given, sampled with --samples too)")
    p.add_argument("--topk", type=int, default=None, help="K classes kept per vector (formats topk, sampled)")
    p.add_argument("--samples", type=int, default=None,
                   help="S classes importance-sampled per vector from the rest (format sampled)")
    p.add_argument("--sample-seed", type=int, default=0, dest="sample_seed", help="seed of the draws (default 0)")
    p.add_argument("--rows-per-chunk", type=int, default=None, dest="rows_per_chunk",
                   help="row chunk of the output (default: the source's)")
    _common(p)


def _run_compact(args: argparse.Namespace) -> int:
    fmt = args.format or ("sampled" if args.samples is not None else "topk" if args.topk is not None else None)
    if fmt is None:
        raise UsageError("give --format topk --topk K, --format sampled --topk K --samples S, or --format int8")
    out = compact_bank(args.src, args.out, fmt, args.topk, args.overwrite, args.scheduler, args.rows_per_chunk,
                       args.progress, args.samples, args.sample_seed)
    info = LabelBank(out).attrs
    f = info["fidelity"]
    print(f"{out}\nformat {fmt}  fidelity: {cp.format_fidelity(f, fmt)}")
    return 0


def _add_stats(p: argparse.ArgumentParser) -> None:
    p.add_argument("bank")
    p.add_argument("--plots", default=None, help="also write the PNGs and stats.json into this directory")
    p.add_argument("--view", type=int, default=0, help="view measured (default 0)")
    _common(p, out_flag=False)


def _run_stats(args: argparse.Namespace) -> int:
    s = bank_stats(args.bank, args.plots, args.overwrite, args.scheduler, args.view, args.progress)
    print(st.format_summary(s))
    if args.plots is not None:
        print(f"wrote {len(s['plots'])} plots and stats.json to {args.plots}")
    return 0


def register(commands: dict) -> None:
    commands["ensemble"] = (_add_ensemble, _run_ensemble, "combine banks: mean-logits, mean-probs or stack")
    commands["compact"] = (_add_compact, _run_compact, "compact copy of a bank: top-k, sampled or int8")
    commands["stats"] = (_add_stats, _run_stats, "teacher statistics and plots of a bank")
