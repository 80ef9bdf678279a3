"""Distillation losses: ε-MSE (EfficientDM/MPQ-DM), TRD (MPQ-DM), MTRD + time-aware pixel queue (MPQ-DMv2),
TMD (Q-VDiT)."""

from mpq_lightning.losses.distill import output_mse, split_learned_sigma
from mpq_lightning.losses.memory import TimeAwarePixelQueue
from mpq_lightning.losses.relation import (
    MemoryRelationLoss,
    TimeSmoothedRelationLoss,
    memory_relation_kl,
    relation_kl,
)
from mpq_lightning.losses.temporal import frame_vectors, tmd_loss

__all__ = [
    "output_mse",
    "split_learned_sigma",
    "relation_kl",
    "memory_relation_kl",
    "TimeSmoothedRelationLoss",
    "MemoryRelationLoss",
    "TimeAwarePixelQueue",
    "tmd_loss",
    "frame_vectors",
]
