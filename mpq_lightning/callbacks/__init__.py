"""Lightning callbacks."""

from mpq_lightning.callbacks.memory_queue import MemoryQueue

__all__ = ["MemoryQueue"]
