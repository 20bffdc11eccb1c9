"""What the result suites run: the scale, the teachers, each suite's arms, each method's hyperparameter grid, and
the claims they test.

Everything here is data; :mod:`pipeline.experiments.runner` turns it into training jobs and bank dumps, and
:mod:`pipeline.experiments.report` into RESULTS.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Scale:
    """How big the suites run (the embedded Fashion-MNIST; ``*_per_class`` are images per class).

    The student trains on the first ``student`` training images of each class; hyperparameters are chosen on
    ``holdout`` further training images (never the test set); the big teacher trains on ``teacher`` images per
    class (the student's among them, never the held-out ones); every model is evaluated on ``val`` images per class
    of the test set.

    The full scale runs the whole plan in 2.53 hours on 2 cores (measured 2026-12-06; docs/DESIGN.md, "Result
    suites"): evaluation every 3rd epoch and each of the last 3, each after precise BN over 20 training batches,
    grids at a third of the arms' epochs, the 100-class method and format suites at 2 seeds. Batch 128 and 30
    epochs were chosen by CE probes of ``democnn_s`` (batch 64 kept moving 0.4-0.6 pt at a near-zero learning rate).
    """

    student: int = 500
    holdout: int = 300
    teacher: int = 2000
    val: int = 500
    teacher_epochs: int = 24
    small_teacher_epochs: int = 30
    student_epochs: int = 30
    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 128
    lr: float = 0.05
    labeled: int = 50  # per class, label-efficiency suite
    views: tuple[int, ...] = (4, 16)
    recipe_views: int = 8  # stored views of the modern-recipe suite's banks (cycled over the epochs)
    topk: tuple[int, ...] = (1, 2, 4)
    jobs: int = 2  # training processes at once (0: one after another in this process)
    max_steps: int = 0  # > 0: cap the steps per epoch (tiny scale)
    grid: bool = True  # False: every method at its published defaults (tiny scale)
    pairs: tuple[int, int, int] = (100, 20, 50)  # pairs100 images per class: train, held-out, val
    pairs_teacher_epochs: int = 24
    pairs_student_epochs: int = 30
    grid_fraction: float = 1 / 3  # grid runs train this fraction of the arms' epochs, evaluated once at the end
    eval_every: int = 3  # arms evaluate every 3rd epoch and each of the last ``eval_last`` (the convergence check)
    eval_last: int = 3
    precise_bn: int = 20  # batches re-estimating BN statistics before each evaluation (0: the running averages)

    def epochs(self, task: str) -> int:
        """A student's epochs on ``task``."""
        return self.pairs_student_epochs if task == "pairs100" else self.student_epochs

    def grid_epochs(self, task: str) -> int:
        """A grid run's epochs on ``task`` (a shorter schedule chooses the setting; every arm then trains the
        full one)."""
        return max(1, round(self.epochs(task) * self.grid_fraction))


SCALES = {
    "full": Scale(),
    "tiny": Scale(student=12, holdout=6, teacher=24, val=6, teacher_epochs=1, small_teacher_epochs=1,
                  student_epochs=1, seeds=(0,), batch_size=32, labeled=4, views=(2,), topk=(2,), max_steps=2,
                  grid=False, jobs=0, pairs=(1, 1, 1), pairs_teacher_epochs=1, pairs_student_epochs=1,
                  recipe_views=2, eval_every=1, eval_last=1, precise_bn=1),
}

BIG, SMALL = "democnn", "democnn_s"


@dataclass(frozen=True)
class Task:
    """A classification task the suites run on: ``fmnist10`` (the embedded Fashion-MNIST, 10 classes) or
    ``pairs100`` (two items stacked, 100 classes: ``prepare-demo --task pairs100``).

    ``tree``: the data tree students train on (its ``val`` split is the test set); ``grid_tree`` / ``grid_val``:
    where hyperparameters are chosen (train split, held-out split); ``teachers``: the task's teacher for each
    name the grids use (the grids are written with the 10-class names); ``classes``: the number of classes."""

    name: str
    tree: str
    grid_tree: str
    grid_val: str
    classes: int
    teachers: tuple[tuple[str, str], ...] = ()

    def teacher(self, name: str) -> str:
        return dict(self.teachers).get(name, name)


TASKS = {t.name: t for t in (
    Task("fmnist10", "student", "grid", "val", 10),
    Task("pairs100", "pairs", "pairs", "heldout", 100, (("big", "big100"),)),
)}


@dataclass(frozen=True)
class TeacherJob:
    """A teacher trained with plain cross-entropy. ``data``: ``teacher`` (the big teacher's training set),
    ``student`` (the student's) or ``pairs`` (the 100-class task's training set, as its students'); ``epochs``:
    None = the scale's for its size and task."""

    name: str
    arch: str
    data: str = "student"
    epochs: int | None = None
    seed: int = 100


TEACHERS = {t.name: t for t in (
    TeacherJob("big", BIG, data="teacher"),
    TeacherJob("self", SMALL),  # Tf-KD's self-teacher: the student's architecture, trained normally
    TeacherJob("poor", BIG, epochs=1),  # De-KD's poorly trained teacher
    TeacherJob("r8", "resnet8"),
    TeacherJob("r14", "resnet14"),
    TeacherJob("big100", BIG, data="pairs"),
)}


@dataclass(frozen=True)
class Arm:
    """One row of a suite: a student recipe, run once per seed.

    ``teachers``: names in :data:`TEACHERS` whose banks are stacked on T; ``live``: run this teacher instead of
    its bank; ``bank``: bank options (``views``, ``format``, ``topk``, ``samples``, ``features``); ``loss``: fixed
    loss hyperparameters (the grid's choice fills the rest); ``extra``: other config keys; ``ranks``: processes of
    the run (torchrun, gloo on CPU; ``extra`` then gives the per-rank batch size).
    """

    label: str
    method: str
    student: str = SMALL
    teachers: tuple[str, ...] = ()
    live: str | None = None
    bank: dict[str, Any] = field(default_factory=dict)
    loss: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    preset: str = "demo"
    ranks: int = 1


@dataclass(frozen=True)
class Suite:
    """A table of arms on one task; ``kind`` ``time`` also plots top-1 against training time."""

    name: str
    title: str
    arms: tuple[Arm, ...]
    note: str = ""
    task: str = "fmnist10"
    kind: str = "table"
    seeds: int = 0  # > 0: only the scale's first ``seeds`` seeds (a suite cut to fit the budget; RESULTS.md says so)

    def seeds_of(self, scale: Scale) -> tuple[int, ...]:
        """The seeds this suite's arms run with at ``scale``."""
        return scale.seeds[:self.seeds] if self.seeds else scale.seeds


def _ce() -> Arm:
    return Arm("ce", "ce")


def _kd(**kw: Any) -> Arm:
    return Arm(kw.pop("label", "kd"), "kd", teachers=("big",), **kw)


def suites(scale: Scale) -> dict[str, Suite]:
    """Every suite at ``scale``, in the order RESULTS.md lists them."""
    ratio = max(1, scale.student // max(scale.labeled, 1))  # as many steps as the all-images arms, as many evals
    few = {"train_subset": 10 * scale.labeled, "epochs": scale.student_epochs * ratio, "eval_every": ratio * scale.eval_every}
    half = {"batch_size": scale.batch_size // 2}  # per rank, on 2 ranks
    # Seeds cut to fit the budget: the suites of the earlier claims (tfkd, label-opt, label-efficiency, embedding,
    # views) run one seed, the 100-class method and format suites two (measured phases: docs/DESIGN.md).
    out = [
        Suite("methods", "Logit methods from one bank", (
            _ce(), Arm("ls", "ls"), _kd(), Arm("wsld", "wsld", teachers=("big",)), Arm("tfkd_reg", "tfkd_reg"),
            Arm("dkd", "dkd", teachers=("big",)), Arm("dist", "dist", teachers=("big",)))),
        Suite("tfkd", "Tf-KD: self-teacher, manual teacher, Re-KD, De-KD", (
            _ce(), Arm("tfkd_self (self-teacher)", "tfkd_self", teachers=("self",)),
            Arm("tfkd_self (big teacher)", "tfkd_self", teachers=("big",)), Arm("tfkd_reg (manual teacher)", "tfkd_reg"),
            Arm("De-KD: kd from a 1-epoch teacher", "kd", teachers=("poor",)),
            Arm("big student, ce", "ce", student=BIG),
            Arm("Re-KD: big student, kd from the small self-teacher", "kd", student=BIG, teachers=("self",))), seeds=1),
        Suite("label-opt", "Label optimization: SL, SL-Ens, SL-KD, SL-Enc vs vanilla, LS, KD", (
            _ce(), Arm("ls", "ls"), _kd(), Arm("sl", "sl", teachers=("big",)),
            Arm("sl_enc", "sl_enc", teachers=("big",)),
            Arm("sl_ens (3 teachers)", "sl_ens", teachers=("big", "r8", "r14")),
            Arm("sl_kd (3 teachers)", "sl_kd", teachers=("big", "r8", "r14"))), seeds=1),
        Suite("label-efficiency", "Label efficiency: teacher labels on unlabelled images vs few labels", (
            Arm(f"ce, {scale.labeled} labels per class (as many steps)", "ce", extra=few),
            _kd(label="teacher labels only (kd, alpha 1), every image", loss={"alpha": 1.0}),
            _ce()), seeds=1),
        Suite("offline-vs-live", "Offline bank vs live teacher", (
            _kd(label="kd, bank"), _kd(label="kd, live", live="big"),
            Arm("wsld, bank", "wsld", teachers=("big",)), Arm("wsld, live", "wsld", live="big"))),
        Suite("views", "Consistent views: center bank vs K replayed views vs live teacher (random-resized crops)",
              tuple(a for m in ("kd", "wsld") for a in (
                  Arm(f"{m}, center bank", m, teachers=("big",), preset="demo_rrc"),
                  *[Arm(f"{m}, {k} views", m, teachers=("big",), bank={"views": k}, preset="demo_rrc",
                        extra={"replay_views": True}) for k in scale.views],
                  Arm(f"{m}, live", m, live="big", preset="demo_rrc"))), seeds=1),
        Suite("formats", "Bank formats: dense vs top-k (compact on write) vs int8", (
            _kd(label="dense fp16"),
            *[_kd(label=f"top-{k}", bank={"format": "topk", "topk": k}) for k in scale.topk],
            _kd(label="int8", bank={"format": "int8"}))),
        Suite("embedding", "Embedding-level methods from stored embeddings", (
            _ce(), _kd(),
            *[Arm(m, m, teachers=("big",), bank={"features": True}) for m in ("rkd", "pkt", "sp", "crd", "fitnet")]),
              seeds=1),
        *_recipes_and_maps(scale),
        *_hundred_classes(),
        Suite("ranks", "One run on many ranks: 2 processes at half the batch vs 1 process (same global batch)", (
            _kd(label="kd, 1 rank"), _kd(label="kd, 2 ranks, --sync-bn", ranks=2, extra={**half, "sync_bn": True}),
            _kd(label="kd, 2 ranks, per-rank BN", ranks=2, extra=half),
            Arm("ce, 1 rank", "ce"), Arm("ce, 2 ranks, --sync-bn", "ce", ranks=2, extra={**half, "sync_bn": True}),
            Arm("ce, 2 ranks, per-rank BN", "ce", ranks=2, extra=half)),
              note="Both ranks run on this machine's CPU over gloo; each rank has 1 thread. With --sync-bn the "
                   "student's batch norm normalizes by both ranks' 64 images, as one rank's 128; without it, by "
                   "each rank's own 64 (DDP's default)."),
        Suite("time-to-accuracy", "Time to accuracy: CE, KD from a bank, KD with a live teacher", (
            _ce(), _kd(label="kd, bank"), _kd(label="kd, live", live="big")), kind="time",
              note="Training time is the sum of the epochs' training time (evaluation excluded), each run on one "
                   "thread; the bank arm's curve is also drawn shifted by the time its dump took (paid once, "
                   "shared by every student of the bank)."),
    ]
    return {s.name: s for s in out}


RECIPE = "rrc+flip+randaug(2,9)+mixup(0.8)+cutmix(1.0)"
MIXING = "mixup(0.8)+cutmix(1.0)"
RECIPE_BLEND = "kd, center bank, stage-2 mixup/cutmix, blended labels (FKD/ReLabel)"
MAP_ARM, MAP_CENTER = "kd, label map (fresh crops, RoIAlign-pooled)", "kd, center bank (one label per image)"


def recipe_exact(scale: Scale) -> str:
    """Arm labels that depend on the scale (used by the suites and their claims)."""
    return f"kd, {scale.recipe_views} views {RECIPE} (exact replay)"


def recipe_none(scale: Scale) -> str:
    return f"kd, {scale.recipe_views} views rrc+flip (no mixing)"


def map_views(scale: Scale) -> str:
    return f"kd, {max(scale.views)} stored views"


def _recipes_and_maps(scale: Scale) -> list[Suite]:
    """The modern recipe (RandAugment + Mixup/CutMix: the teacher's label on the very mixed image, replayed from
    the bank, vs the two images' stored labels blended by lambda, vs no mixing) and label maps (a map pooled over
    each fresh crop vs stored views vs one center label vs a live teacher), all KD from the big teacher on random
    crops (``demo_rrc``)."""
    v = scale.recipe_views
    rrc = {"preset": "demo_rrc"}
    replay = {"replay_views": True}
    return [
        Suite("recipes", "Modern recipe: RandAugment + Mixup/CutMix replayed exactly vs blended labels vs none", (
            Arm("ce, no mixing", "ce", **rrc),
            _kd(label=recipe_none(scale), bank={"views": v, "view_policy": "rrc+flip"}, extra=replay, **rrc),
            _kd(label=recipe_exact(scale), bank={"views": v, "view_policy": RECIPE}, extra=replay, **rrc),
            _kd(label=RECIPE_BLEND, extra={"mix_labels": "blend", "mix_policy": MIXING}, **rrc)),
              note=f"Exact replay: the teacher's logits on each stored mixed view, the student trains on the same "
                   f"view rebuilt from its stored parameters ({v} views, a fresh one each epoch while they last). "
                   "Blend: the loader mixes two random-resized crops and the label is lambda times the one "
                   "image's center-bank label plus (1 - lambda) times the other's, the approximation FKD and "
                   "ReLabel use. A live-teacher arm would see the same images as exact replay (to float16)."),
        Suite("maps", "Label maps: a map pooled over every fresh crop vs stored views vs a center bank vs live", (
            _kd(label=MAP_CENTER, **rrc),
            _kd(label=map_views(scale), bank={"views": max(scale.views)}, extra=replay, **rrc),
            _kd(label=MAP_ARM, bank={"format": "labelmap"}, **rrc),
            _kd(label="kd, live teacher on every crop", live="big", **rrc)),
              note="The map is the big teacher's classifier at every cell of its last feature map (democnn: 4x4 "
                   "cells of a 32 px input, region = the eval view). Stored views replay their crops; the map and "
                   "live arms draw a fresh random-resized crop every epoch."),
    ]


FORMATS100 = (("dense fp16", {}), ("int8", {"format": "int8"}), ("top-5", {"format": "topk", "topk": 5}),
              ("top-10", {"format": "topk", "topk": 10}), ("sampled 5+5", {"format": "sampled", "topk": 5,
                                                                            "samples": 5}))


def _hundred_classes() -> list[Suite]:
    """The suites on the 100-class task: the logit methods, and every bank format under KD at T = 4 (where a
    top-k bank's missing tail matters most: the target is flat) and WSLD at its chosen temperature."""
    t = ("big100",)
    return [
        Suite("methods100", "Logit methods at 100 classes (pairs100)", (
            _ce(), Arm("ls", "ls"), Arm("kd", "kd", teachers=t), Arm("wsld", "wsld", teachers=t),
            Arm("dkd", "dkd", teachers=t), Arm("dist", "dist", teachers=t)), task="pairs100", seeds=2),
        Suite("formats100", "Bank formats at 100 classes: dense, int8, top-k, sampled (pairs100)", (
            _ce(), *[Arm(f"kd T=4, {lab}", "kd", teachers=t, bank=b, loss={"T": 4.0, "alpha": 0.9})
                     for lab, b in FORMATS100],
            *[Arm(f"wsld, {lab}", "wsld", teachers=t, bank=b) for lab, b in FORMATS100]), task="pairs100",
              note="KD runs at T = 4 and alpha 0.9 for every format (fixed, not chosen: the setting where formats "
                   "differ most); WSLD at its temperature chosen on the held-out images with the dense bank. "
                   "Top-10 and sampled 5+5 store the same number of classes per sample (equal bytes).",
              seeds=2),
    ]


# Per method: a grid of at most 4 settings around the published values (the first is the published default), the
# teachers it is chosen with, and the bank it reads. Chosen once on the held-out images, used by every arm.
GRIDS: dict[str, tuple[tuple[dict[str, Any], ...], tuple[str, ...], dict[str, Any]]] = {
    "ls": (({"eps": 0.1}, {"eps": 0.05}, {"eps": 0.2}), (), {}),
    "kd": (({"alpha": 0.9, "T": 4.0}, {"alpha": 0.5, "T": 4.0}, {"alpha": 0.9, "T": 2.0}, {"alpha": 0.5, "T": 2.0}),
           ("big",), {}),
    "wsld": (({"alpha": 2.25, "T": 4.0}, {"alpha": 2.5, "T": 2.0}, {"alpha": 1.0, "T": 4.0}, {"alpha": 1.0, "T": 2.0}),
             ("big",), {}),
    "dkd": (({"beta": 8.0, "T": 4.0}, {"beta": 2.0, "T": 4.0}, {"beta": 8.0, "T": 2.0}, {"beta": 2.0, "T": 2.0}),
            ("big",), {}),
    "dist": (({"beta": 1.0, "gamma": 1.0, "T": 1.0}, {"beta": 2.0, "gamma": 2.0, "T": 1.0},
              {"beta": 1.0, "gamma": 1.0, "T": 4.0}, {"beta": 2.0, "gamma": 2.0, "T": 4.0}), ("big",), {}),
    "tfkd_reg": (({"alpha": 0.1, "T": 20.0}, {"alpha": 0.5, "T": 20.0}, {"alpha": 0.1, "T": 40.0}), (), {}),
    "tfkd_self": (({"alpha": 0.95, "T": 6.0}, {"alpha": 0.5, "T": 6.0}, {"alpha": 0.95, "T": 2.0},
                   {"alpha": 0.5, "T": 2.0}), ("self",), {}),
    "sl": (({"alpha": 0.1, "T": 3.0}, {"alpha": 0.3, "T": 3.0}, {"alpha": 1.0, "T": 3.0}), ("big",), {}),
    "sl_enc": (({"alpha": 0.1, "T": 3.0}, {"alpha": 0.3, "T": 3.0}, {"alpha": 1.0, "T": 3.0}), ("big",), {}),
    "sl_ens": (({"alpha": 0.1, "T": 3.0}, {"alpha": 0.3, "T": 3.0}, {"alpha": 1.0, "T": 3.0}),
               ("big", "r8", "r14"), {}),
    "sl_kd": (({"alpha": 0.1, "T": 3.0}, {"alpha": 0.3, "T": 3.0}, {"alpha": 1.0, "T": 3.0}),
              ("big", "r8", "r14"), {}),
    "rkd": (({"weight": 1.0}, {"weight": 0.1}, {"weight": 10.0}), ("big",), {"features": True}),
    "pkt": (({"weight": 30000.0}, {"weight": 1000.0}, {"weight": 100.0}), ("big",), {"features": True}),
    "sp": (({"weight": 3000.0}, {"weight": 300.0}, {"weight": 30.0}), ("big",), {"features": True}),
    "crd": (({"weight": 0.8}, {"weight": 0.4}, {"weight": 1.6}), ("big",), {"features": True}),
    "fitnet": (({"weight": 1.0}, {"weight": 0.1}, {"weight": 10.0}), ("big",), {"features": True}),
}


def fixed_loss(method: str, scale: Scale, epochs: int) -> dict[str, Any]:
    """Loss settings that follow the scale rather than a grid: DKD's KD-weight warm-up (20 of 240 epochs in the
    paper) is a quarter of the run's ``epochs``; CRD draws at most 1024 negatives per sample (the paper's 16384 of CIFAR's 50000
    is a third of the images; here a tenth, because gathering [B, nce_k, 128] from both memories every step dominated
    the step on CPU: 4096 made a CRD epoch 10x slower than a KD epoch)."""
    if method == "dkd":
        return {"warmup_epochs": max(1, epochs // 4)}
    if method == "crd":
        return {"nce_k": min(1024, 10 * scale.student - 1)}
    return {}


@dataclass(frozen=True)
class Comparison:
    """``a`` vs ``b`` (arm labels of ``suite``) on ``metric``: ``expect`` ``>`` (a's value higher), ``<`` (lower:
    a lower ECE is a better calibration) or ``~`` (equal within noise)."""

    suite: str
    a: str
    b: str
    expect: str = ">"
    metric: str = "top1"


@dataclass(frozen=True)
class Claim:
    claim: str
    source: str
    published: str
    comparisons: tuple[Comparison, ...]


def claims(scale: Scale) -> list[Claim]:
    k = max(scale.views)
    return [
        Claim("WSLD > KD > CE", "seeds 000, 001 (Zhou et al. 2021)",
              "R34→R18 ImageNet: CE 69.75, KD 71.03–71.37, WSLD 72.04 top-1",
              (Comparison("methods", "wsld", "kd"), Comparison("methods", "kd", "ce"),
               Comparison("methods100", "wsld", "kd"), Comparison("methods100", "kd", "ce"))),
        Claim("SL-family students are better calibrated than KD; SL-KD is the best SL variant", "seed 002",
              "CIFAR-100 R20: KD 68.20 / ECE .061, SL 69.17 / .021, SL-KD 69.67 / .014",
              (Comparison("label-opt", "sl_kd (3 teachers)", "kd", "<", "ece"),
               Comparison("label-opt", "sl", "kd", "<", "ece"),
               Comparison("label-opt", "sl_kd (3 teachers)", "sl", ">"))),
        Claim("Tf-KD self-training and the manually designed teacher help; Re-KD and De-KD still help", "seed 004",
              "ImageNet R18 self-KD 70.42 vs 69.76; CIFAR-100 ResNeXt29 81.03 → 82.08",
              (Comparison("tfkd", "tfkd_self (self-teacher)", "ce"),
               Comparison("tfkd", "tfkd_reg (manual teacher)", "ce"),
               Comparison("tfkd", "De-KD: kd from a 1-epoch teacher", "ce"),
               Comparison("tfkd", "Re-KD: big student, kd from the small self-teacher", "big student, ce"))),
        Claim("An offline bank gives the live teacher's accuracy at a fraction of the time", "mission; FKD (Shen & "
              "Xing 2022)", "FKD: same accuracy, epoch 487 s vs 579 s",
              (Comparison("offline-vs-live", "kd, bank", "kd, live", "~"),
               Comparison("offline-vs-live", "wsld, bank", "wsld, live", "~"),
               Comparison("time-to-accuracy", "kd, bank", "kd, live", "<", "time_s"))),
        Claim(f"Replayed views ({k}) beat a single center-view label and match a live teacher on random crops",
              "Beyer et al. 2022; FKD", "consistent teaching: precomputed single labels overfit",
              (Comparison("views", f"kd, {k} views", "kd, center bank"), Comparison("views", f"kd, {k} views",
                                                                                     "kd, live", "~"),
               Comparison("views", f"wsld, {k} views", "wsld, center bank"),
               Comparison("views", f"wsld, {k} views", "wsld, live", "~"))),
        Claim("With Mixup/CutMix, the teacher's label on the very mixed image beats blending the two images' "
              "stored labels", "Beyer et al. 2022 (consistency); TinyViT (replays every augmentation); FKD and "
              "ReLabel blend by lambda", "consistent teaching: the teacher must see the student's view",
              (Comparison("recipes", recipe_exact(scale), RECIPE_BLEND),)),
        Claim("A label map pooled over each fresh crop beats one label per image and matches stored views",
              "ReLabel (Yun et al. 2021)", "ImageNet R50: +1.4 pt top-1 over hard labels; 12 GB of 15x15 top-5 maps",
              (Comparison("maps", MAP_ARM, MAP_CENTER), Comparison("maps", MAP_ARM, map_views(scale), "~"),
               Comparison("maps", MAP_ARM, "kd, live teacher on every crop", "~"))),
        Claim("Top-k and int8 banks train students as well as the dense bank", "FKD (top-5 per crop); this project",
              "FKD: top-5 soft labels reach the full-label accuracy",
              tuple(Comparison("formats", lab, "dense fp16", "~")
                    for lab in [f"top-{max(scale.topk)}", "int8"])
              + tuple(Comparison("formats100", f"{m}, {lab}", f"{m}, dense fp16", "~")
                      for m in ("kd T=4", "wsld") for lab in ("top-10", "int8"))),
        Claim("Sampled (unbiased) soft labels beat top-k at equal bytes, in accuracy and calibration",
              "Sparse Logit Sampling (Anshumann et al. 2025)", "LLM vocabularies: random-sampling KD beats top-k KD "
              "and matches full KD (accuracy and calibration)",
              tuple(Comparison("formats100", f"{m}, sampled 5+5", f"{m}, top-10", e, metric)
                    for m in ("kd T=4", "wsld") for e, metric in ((">", "top1"), ("<", "ece")))),
        Claim("A run on 2 ranks with --sync-bn equals a run on 1 rank with the same global batch", "this project "
              "(DDP, per-rank seeds, synchronised batch norm)", "—",
              tuple(Comparison("ranks", f"{m}, 2 ranks, --sync-bn", f"{m}, 1 rank", "~") for m in ("kd", "ce"))),
        Claim("Without --sync-bn, 2 ranks still equal 1 rank", "DDP's default (torchvision and timm make sync BN "
              "an option)", "—",
              tuple(Comparison("ranks", f"{m}, 2 ranks, per-rank BN", f"{m}, 1 rank", "~") for m in ("kd", "ce"))),
        Claim("Teacher labels on unlabelled images beat few labels alone", "seed 004 (label efficiency); "
              "semi-supervised KD", "—",
              (Comparison("label-efficiency", "teacher labels only (kd, alpha 1), every image",
                          f"ce, {scale.labeled} labels per class (as many steps)"),)),
        Claim("Embedding-level methods (RKD, PKT, SP, CRD, FitNet) improve on CE; CRD is competitive with KD",
              "REFERENCE.md (RepDistiller tables)", "ImageNet R34→R18: CRD 70.93, KD 71.03–71.37, CE 69.75",
              tuple(Comparison("embedding", m, "ce") for m in ("rkd", "pkt", "sp", "crd", "fitnet"))
              + (Comparison("embedding", "crd", "kd", "~"),)),
    ]
