"""All file access: checkpoint discovery and lazy reading, the Zarr run store."""

from farcast.storage.checkpoints import Checkpoint, Discovery, TensorInfo, discover, open_checkpoint, step_of
from farcast.storage.store import RunStore, TensorMeta

__all__ = ["Checkpoint", "Discovery", "TensorInfo", "discover", "open_checkpoint", "step_of", "RunStore", "TensorMeta"]
