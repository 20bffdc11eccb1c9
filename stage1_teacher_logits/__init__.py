"""Stage 1: teachers (single, ensembles, self-teachers, any checkpoint) -> label bank, with DALI decoding."""

from stage1_teacher_logits.dump import DumpConfig, run_dump

__all__ = ["DumpConfig", "run_dump"]
