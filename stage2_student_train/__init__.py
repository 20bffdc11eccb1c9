"""Stage 2: one training loop for every method, from images plus a label bank (no live teacher)."""

from stage2_student_train.config import TrainConfig
from stage2_student_train.run import run_training

__all__ = ["TrainConfig", "run_training"]
