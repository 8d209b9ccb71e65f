"""Small shared utilities: thread control, atomic file writes, run directories, seeding."""

from .threads import set_threads
from .io import atomic_write_bytes, atomic_save_json, atomic_save_safetensors, atomic_torch_save, RunDir

__all__ = ["set_threads", "atomic_write_bytes", "atomic_save_json", "atomic_save_safetensors", "atomic_torch_save", "RunDir"]
