"""Label maps vs stored views: size, dump time, stage-2 label cost (issue 26).

    python bench/label_maps.py                 # ImageNet shape (C = 1000), ResNet-18, < 2 min on 2 cores
    python bench/label_maps.py --batch 16 --steps 2

Prints (JSON lines, then a table):

1. bytes per image at ImageNet shape (C = 1000, one teacher) of a label map for S = 7 and 15 (dense float16,
   int8 with per-cell center/scale, per-cell top-5 / top-10 + tail: ``pipeline.bank.labelmap``'s arrays), next
   to 16 stored views (dense float16, int8, top-10 compact: ``pipeline.bank.compact.raw_bytes_per_vector``),
   and the ImageNet-1k total (1,281,167 images);
2. stage-1 CPU time per image of a ResNet-18 teacher at 224 px: the map model (features, then the classifier
   at all 7 x 7 cells) + encoding the map chunk, vs the plain teacher (one logit vector per image);
3. stage-2 CPU time per step of a ResNet-18 student (forward, backward, SGD at 224 px), and the label cost per
   step: from a top-5 map (gather, densify on the device, ``roi_align`` over the crop boxes) for S = 7 and 15,
   and from stored views (gather of [B, C] fp16 rows from a [N, 16, C] array): each as a share of the step.

Times are ``time.process_time`` (CPU time of this process, steadier than wall time on a shared machine); the
ratios are measured within one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

IMAGENET = 1_281_167


def map_bytes(s: int, c: int, form: str) -> int:
    """Raw payload bytes per image of one teacher's S x S map (the arrays of pipeline.bank.labelmap)."""
    from pipeline.bank.labelmap import labelmap_array_specs

    dtype, k = ("float16", int(form[3:])) if form.startswith("top") else (form, None)
    specs = labelmap_array_specs(1, 1, s, c, dtype, k)
    return sum(int(np.prod(shape[1:])) * np.dtype(dt).itemsize for name, (shape, dt, _) in specs.items()
               if name != "image_size")


def sizes(c: int = 1000) -> list[dict]:
    from pipeline.bank.compact import raw_bytes_per_vector

    rows = [{"what": f"map S={s} {form}", "bytes_per_image": map_bytes(s, c, form)}
            for s in (7, 15) for form in ("float16", "int8", "top5", "top10")]
    rows += [{"what": "16 views dense float16", "bytes_per_image": 16 * 2 * c},
             {"what": "16 views int8", "bytes_per_image": 16 * raw_bytes_per_vector("int8", c, None)},
             {"what": "16 views top-10", "bytes_per_image": 16 * raw_bytes_per_vector("topk", c, 10)}]
    for r in rows:
        r["imagenet_gb"] = round(r["bytes_per_image"] * IMAGENET / 1e9, 2)
    return rows


def cpu(fn, reps: int) -> float:
    """CPU seconds per call of ``fn`` (one warm-up call first)."""
    fn()
    t0 = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - t0) / reps


def dump_times(batch: int, reps: int) -> dict:
    from pipeline.bank.labelmap import encode_chunk
    from pipeline.models import create_model
    from pipeline.models.ensemble import TeacherEnsemble
    from pipeline.models.label_map import LabelMapEnsemble

    torch.manual_seed(0)
    ens = TeacherEnsemble([create_model("resnet18", 1000, "none")])
    maps = LabelMapEnsemble(ens, ["resnet18"], None, [224])
    x = torch.randn(batch, 3, 224, 224)
    skipped = np.zeros(batch, bool)

    def center() -> None:
        ens(x).to(torch.float16).numpy()

    def labelmap() -> None:
        z = maps(x).to(torch.float16).numpy()
        encode_chunk(z, skipped, maps.size, "float16", 5)

    tc, tm = cpu(center, reps), cpu(labelmap, reps)
    return {"teacher": "resnet18 224px", "map_size": maps.size, "center_s_per_image": tc / batch,
            "map_top5_s_per_image": tm / batch, "map_over_center": tm / tc}


def step_times(batch: int, steps: int, c: int = 1000) -> dict:
    from pipeline.bank.labelmap import densify
    from pipeline.bank.map_pool import crop_boxes, map_boxes, pool
    from pipeline.models import create_model

    torch.manual_seed(0)
    student = create_model("resnet18", c, "none")
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, c, (batch,))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(student(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    n = 2048
    rng = np.random.default_rng(0)
    idx = rng.choice(n, batch, replace=False)
    out = {"student": "resnet18 224px", "batch": batch, "step_s": cpu(step, steps)}
    views = rng.standard_normal((n, 16, c)).astype(np.float16)
    out["views_gather_s"] = cpu(lambda: torch.from_numpy(views[idx, rng.integers(0, 16, batch)]).float(), 20)
    for s in (7, 15):
        vals = torch.from_numpy(rng.standard_normal((n, 1, s, s, 5)).astype(np.float16))
        ind = torch.from_numpy(rng.integers(0, c, (n, 1, s, s, 5)).astype(np.int16))
        tail = torch.from_numpy(rng.standard_normal((n, 1, s, s)).astype(np.float16))
        sizes_ = np.tile([[375, 500]], (batch, 1))
        regions = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(batch, 1)

        def gather() -> torch.Tensor:
            rows = torch.from_numpy(idx)
            maps = densify({"map_topk_values": vals[rows], "map_topk_indices": ind[rows], "map_tail": tail[rows]}, c)
            crops = torch.from_numpy(crop_boxes(0, 0, idx, sizes_, (0.08, 1.0), (3 / 4, 4 / 3)))
            return pool(maps, map_boxes(crops, regions, s))

        out[f"map{s}_top5_s"] = cpu(gather, 10)
    for k in [k for k in out if k.endswith("_s") and k != "step_s"]:
        out[k.replace("_s", "_share_of_step")] = out[k] / out["step_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16, help="stage-2 batch (default 16)")
    ap.add_argument("--steps", type=int, default=2, help="timed stage-2 steps (default 2)")
    ap.add_argument("--dump-batch", type=int, default=8, help="stage-1 images per timed batch (default 8)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    rows = sizes()
    for r in rows:
        print(json.dumps(r))
    d = dump_times(args.dump_batch, 2)
    print(json.dumps(d))
    s = step_times(args.batch, args.steps)
    print(json.dumps(s))
    print("\n| stored labels | bytes / image | ImageNet-1k |\n|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['bytes_per_image']:,} | {r['imagenet_gb']} GB |")
    print(f"\nstage 1 ({d['teacher']}, map {d['map_size']}x{d['map_size']}, top-5): "
          f"{d['map_top5_s_per_image'] * 1e3:.1f} ms/image vs center {d['center_s_per_image'] * 1e3:.1f} ms/image "
          f"({d['map_over_center']:.2f}x)")
    print(f"stage 2 ({s['student']}, batch {s['batch']}): step {s['step_s']:.2f} s; labels per step: "
          + "; ".join(f"{k[:-2]} {s[k] * 1e3:.1f} ms ({s[k.replace('_s', '_share_of_step')] * 100:.2f}%)"
                      for k in s if k.endswith("_s") and k != "step_s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
