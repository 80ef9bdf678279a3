"""Lightning callbacks."""

from mpq_lightning.callbacks.final_report import FinalReport
from mpq_lightning.callbacks.memory_queue import MemoryQueue
from mpq_lightning.callbacks.progress import StepRichProgressBar
from mpq_lightning.callbacks.run_checkpoint import RunCheckpoint
from mpq_lightning.callbacks.samples import SampleLogger
from mpq_lightning.callbacks.timestep_error import PerTimestepError

__all__ = ["FinalReport", "MemoryQueue", "PerTimestepError", "RunCheckpoint", "SampleLogger", "StepRichProgressBar"]
