"""Training: objectives and their steps (steps), the one loop (loop), checkpoint and
resume (checkpoint), schedules and torchrun set-up; ``python -m madflow.train`` (__main__)."""

from madflow.train.loop import train

__all__ = ["train"]
