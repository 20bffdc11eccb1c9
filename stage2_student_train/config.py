"""Stage-2 configuration: frozen dataclasses, YAML recipes in ``configs/``, dotted overrides.

Precedence: dataclass defaults < ``--config`` YAML < CLI flags < ``key=value`` overrides. Unknown keys
are errors. The resolved config is written to ``<output_dir>/config.yaml`` and stored in checkpoints.

Every key is declared once, here (:func:`pipeline.config.key`): its help, CLI flags, what ``--resume`` does when
it changes (``match``: refused; ``apply``: applied from the first resumed step and logged; ``free``) and whether
``--test-only`` reads it. ``pipeline.train_student``'s parser, the resume check
(``stage2_student_train.checkpoint``) and the ``--test-only`` warning are generated from these declarations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pipeline.config import RESUME_APPLY, RESUME_MATCH, key

_OPT, _DATA, _MODELS, _LABELS, _RUN = "optimisation", "data", "method and models", "soft labels", "run"


@dataclass(frozen=True)
class OptimConfig:
    """``name``: sgd | adamw. ``no_wd_bn_bias``: no weight decay on BN weights and biases (1-D params)."""

    name: str = key("sgd", help="optimizer: sgd or adamw", flags=("--opt",), resume=RESUME_MATCH, group=_OPT)
    lr: float = key(0.1, help="base learning rate", flags=("--lr",), resume=RESUME_APPLY, group=_OPT)
    momentum: float = key(0.9, help="SGD momentum", flags=("--momentum",), resume=RESUME_APPLY, group=_OPT)
    nesterov: bool = key(False, help="Nesterov momentum (SGD)", resume=RESUME_APPLY)
    weight_decay: float = key(1e-4, help="weight decay", flags=("--wd", "--weight-decay"), resume=RESUME_APPLY,
                              group=_OPT)
    no_wd_bn_bias: bool = key(False, help="no weight decay on 1-D parameters (BN weights, biases): another "
                                          "parameter grouping", resume=RESUME_MATCH)
    betas: tuple[float, float] = key((0.9, 0.999), help="AdamW betas", resume=RESUME_APPLY)
    clip_grad: float = key(0.0, help="gradient clipping threshold (0: off): the max norm (norm), max |g| (value) or "
                                     "the clipping factor (agc), timm's dispatch_clip_grad", flags=("--clip-grad",),
                           resume=RESUME_APPLY, group=_OPT)
    clip_mode: str = key("norm", help="gradient clipping mode: norm, value or agc (adaptive, NFNets)",
                         flags=("--clip-mode",), choices=("norm", "value", "agc"), resume=RESUME_APPLY, group=_OPT)
    accum_steps: int = key(1, help="micro-batches per optimizer update (gradient accumulation; the effective batch "
                                   "is batch_size x accum_steps x processes)",
                           flags=("--accum-steps", "--grad-accum-steps"),
                           resume=RESUME_MATCH, group=_OPT)


@dataclass(frozen=True)
class ScheduleConfig:
    """``name``: step | multistep | cosine | constant; linear warm-up over ``warmup_epochs`` (may be fractional).

    ``warmup_start_factor``: the warm-up's first lr as a fraction of the base lr (``optim.lr``);
    ``min_lr_factor``: the cosine schedule's final lr as a fraction of the base lr.
    """

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"warmup_start": "warmup_start_factor", "min_lr": "min_lr_factor"}

    name: str = key("cosine", help="lr schedule: cosine, step, multistep, constant", resume=RESUME_APPLY)
    warmup_epochs: float = key(0.0, help="linear warm-up epochs (may be fractional)", flags=("--lr-warmup-epochs",),
                               resume=RESUME_APPLY, group=_OPT)
    warmup_start_factor: float = key(0.1, help="the warm-up's first lr as a fraction of optim.lr",
                                     resume=RESUME_APPLY)
    step_size: int = key(30, help="epochs per step of the step schedule", flags=("--lr-step-size",),
                         resume=RESUME_APPLY, group=_OPT)
    milestones: tuple[int, ...] = key((), help="epochs at which the multistep schedule multiplies by gamma",
                                      resume=RESUME_APPLY)
    gamma: float = key(0.1, help="lr factor per step (step, multistep)", flags=("--lr-gamma",), resume=RESUME_APPLY,
                       group=_OPT)
    min_lr_factor: float = key(0.0, help="the cosine schedule's final lr as a fraction of optim.lr",
                               resume=RESUME_APPLY)


@dataclass(frozen=True)
class TrainConfig:
    """One student run. ``loss`` holds the method's hyperparameters (validated against the loss signature)."""

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"labels": "banks"}

    method: str = key("ce", help="loss: {losses}",
                      flags=("--method",), resume=RESUME_MATCH, group=_MODELS)
    loss: dict[str, Any] = key(default_factory=dict, help="the method's hyperparameters (loss.T=4, loss.alpha=0.9)",
                               resume=RESUME_MATCH)
    student: str = key("resnet18", help="student model name", flags=("--student", "--model"), resume=RESUME_MATCH,
                       test_only=True, group=_MODELS)
    student_weights: str | None = key(None, help="initial student weights: DEFAULT, an enum name or a checkpoint",
                                      flags=("--student-weights",), test_only=True, group=_MODELS)
    # Label banks: --labels paths (several = ensemble on the T axis), or --teacher names found in the cache.
    banks: tuple[str, ...] = key((), help="label bank path or URL (repeatable: ensemble on T)", flags=("--labels",),
                                 action="append", resume=RESUME_MATCH, group=_LABELS,
                                 default_text="found by --teacher")
    teacher: tuple[str, ...] = key((), help="find the cached bank of this teacher (repeatable)",
                                   flags=("--teacher",), action="append", group=_LABELS,
                                   default_text="none: give --labels")
    teacher_weights: tuple[str, ...] = key((), help="weights the bank's teacher was dumped with, one per --teacher",
                                           flags=("--teacher-weights",), action="append", group=_LABELS,
                                           default_text="DEFAULT")
    # Live-teacher mode (comparisons only): the same batch key filled by running the teacher each step.
    live_teacher: tuple[str, ...] = key((), help="run this teacher every step instead of reading a bank "
                                                 "(comparisons only)", flags=("--live-teacher",), action="append",
                                        resume=RESUME_MATCH, group=_LABELS)
    live_teacher_weights: tuple[str, ...] = key((), help="one per --live-teacher", flags=("--live-teacher-weights",),
                                                action="append", resume=RESUME_MATCH, group=_LABELS,
                                                default_text="DEFAULT")
    replay_views: bool = key(False, help="replay the bank's stored views: crops and flips, and the stored "
                             "augmentations and mixing of an augmenting --view-policy (exact)",
                             flags=("--replay-views",), action="store_true", resume=RESUME_MATCH, group=_LABELS)
    view_order: str = key("cycle", help="which stored view each sample replays per epoch (--replay-views): cycle "
                                        "(epoch e: view (e + offset(i)) mod V, a fresh view every epoch until all V "
                                        "are used, offset(i) a seeded hash of the sample) or hash (an independent "
                                        "seeded draw per epoch, repeats possible: the order before this key)",
                          flags=("--view-order",), choices=("cycle", "hash"), resume=RESUME_MATCH, group=_LABELS)
    mix_labels: str = key("", help="'blend': Mixup/CutMix (--mix-policy) in stage 2 with the two images' stored "
                          "soft labels blended by lambda (FKD/ReLabel; approximate, warned)",
                          flags=("--mix-labels",), resume=RESUME_MATCH, group=_LABELS, default_text="off")
    mix_policy: str = key("mixup(0.8)+cutmix(1.0)", help="the mixing of --mix-labels blend (view-policy syntax)",
                          flags=("--mix-policy",), resume=RESUME_MATCH, group=_LABELS)
    cutmix: float = key(0.0, help="CutMix with lambda ~ Beta(ALPHA, ALPHA), one box per batch, with a label-map bank: "
                                   "each region's soft label pooled from its own image's map (0: off)",
                        flags=("--cutmix",), resume=RESUME_MATCH, group=_LABELS)
    data: str = key("", help="dataset root (folders, file lists, CIFAR pickles, packed shards; `make demo` prepares "
                             "data/fashion-mnist)", flags=("--data", "--data-path"), resume=RESUME_MATCH,
                    test_only=True, group=_DATA, default_text="none, required")
    layout: str = key("auto", help="dataset layout: auto, imagefolder, filelist, cifar, shards", flags=("--layout",),
                      resume=RESUME_MATCH, test_only=True, group=_DATA)
    preset: str = key("auto", help="preprocessing: auto (the bank's, else by layout), {presets}", flags=("--preset",),
                      resume=RESUME_MATCH,
                      test_only=True, group=_DATA)
    train_split: str = key("train", help="the split trained on", resume=RESUME_MATCH)
    val_split: str = key("val", help="the split evaluated", test_only=True)
    augment: bool = key(True, help="train on the eval transform (deterministic views)", flags=("--no-augment",),
                        action="store_false", resume=RESUME_MATCH, group=_DATA, default_text="augment")
    skip_corrupt: bool = key(False, help="leave out undecodable images (named in a warning) instead of stopping",
                             flags=("--skip-corrupt",), action="store_true", test_only=True, group=_DATA)
    # Train on a seeded random subset of this many training samples (0 = all); the bank still covers all.
    train_subset: int = key(0, help="train on a seeded random subset of this many samples (0: all)",
                            resume=RESUME_MATCH)
    epochs: int = key(90, help="epochs", flags=("--epochs",), resume=RESUME_APPLY, group=_OPT)
    batch_size: int = key(256, help="per process", flags=("--batch-size", "-b"), resume=RESUME_MATCH,
                          test_only=True, group=_OPT)
    workers: int | None = key(None, help="loader threads/processes", flags=("--workers", "-j"), test_only=True,
                              group=_DATA, default_text="the cores available to this process / LOCAL_WORLD_SIZE, "
                                                        "at most 4")
    device: str = key("cpu", help="cpu or cuda", flags=("--device",), choices=("cpu", "cuda"), test_only=True,
                      group=_OPT)
    seed: int = key(0, help="seed of initialisation, order, augmentation and every random stream", flags=("--seed",),
                    test_only=True, group=_OPT)
    amp: str = key("none", help="autocast (fp16: CUDA only)", flags=("--amp",), choices=("none", "bf16", "fp16"),
                   test_only=True, group=_OPT)
    channels_last: bool = key(False, help="channels_last student and inputs", flags=("--channels-last",),
                              action="store_true", test_only=True, group=_OPT)
    deterministic: bool = key(False, help="deterministic cuDNN kernels (cudnn.benchmark off): bit-reproducible GPU "
                                          "runs, slower; without it cuDNN picks the fastest kernels",
                              flags=("--deterministic",), action="store_true", test_only=True, group=_OPT)
    sync_bn: bool = key(False, help="batch-norm statistics over all ranks' batches under torchrun (torchvision's "
                                    "and timm's --sync-bn): n ranks then train what one rank with the global batch "
                                    "trains; without it each rank normalizes by its own batch",
                        flags=("--sync-bn",), action="store_true", resume=RESUME_APPLY, group=_OPT)
    loader: str = key("auto", help="image loader: dali (NVIDIA DALI, default where installed) or torch",
                      flags=("--loader",), choices=("auto", "dali", "torch"), test_only=True, group=_DATA)
    hw_decoder_load: float = key(0.65, help="share of JPEGs DALI's mixed decoding (--device cuda) gives the "
                                            "hardware decoder, in [0, 1]", flags=("--hw-decoder-load",),
                                 test_only=True, group=_DATA)
    max_steps_per_epoch: int = key(0, help="at most this many steps per epoch (0: the whole split)",
                                   resume=RESUME_APPLY)
    eval_every: int = key(1, help="evaluate every k epochs (and after the last)", flags=("--eval-every",),
                          group=_RUN)
    eval_last: int = key(1, help="also evaluate each of the last N epochs whatever eval_every (the convergence of "
                                 "a run's end: its last 3 epochs' top-1)", flags=("--eval-last",), group=_RUN)
    precise_bn: int = key(0, help="before each evaluation, re-estimate the batch-norm running statistics over this "
                                  "many training batches (precise BN, Wu & Johnson 2021: the same images and "
                                  "augmentation every time, so evaluations differ only by the weights; 0: off, "
                                  "the running averages of the last batches)", flags=("--precise-bn",),
                          resume=RESUME_APPLY, group=_OPT)
    log_every: int = key(50, help="steps between TensorBoard step logs")
    output_dir: str = key("", help="run directory", flags=("--output-dir",), test_only=True, group=_RUN,
                          default_text="runs/<method>-<student>-seed<seed>, or the --resume file's folder")
    resume: bool = key(False, help="continue the run in output_dir (--resume [PATH] on the command line)",
                       test_only=True)
    resume_from: str = key("", help="a checkpoint file to resume from (default: <output_dir>/last.pt)",
                           test_only=True)
    test_only: bool = key(False, help="evaluate a checkpoint (--resume PATH, --student-weights, or --output-dir's "
                                      "last.pt) on the val split, print and write test.json; no training",
                          flags=("--test-only",), action="store_true", test_only=True, group=_RUN)
    overwrite: bool = key(False, help="replace an existing --output-dir", flags=("--overwrite",),
                          action="store_true", group=_RUN)
    ema_decay: float = key(0.0, help="model EMA decay per optimizer update (timm ModelEmaV3; 0: off); the EMA is "
                                     "evaluated each epoch (ema_top1, ...) and saved in last.pt and ema_best.pt",
                           flags=("--model-ema-decay",), resume=RESUME_MATCH, group=_OPT)
    optim: OptimConfig = key(default_factory=OptimConfig, help="optimizer settings (optim.*)")
    sched: ScheduleConfig = key(default_factory=ScheduleConfig, help="lr schedule (sched.*)")
