"""Adapter I/O: reading PEFT LoRA adapters (directories or bare safetensors files, lazily, one
module at a time) or held in memory (MemoryAdapter), and writing merged ones as PEFT LoRA adapters
with scale 1.
Stable Diffusion LoRAs in kohya / sd-scripts or diffusers format are read and written too (formats.py).

Pickle files (.bin/.pt/.pth) are never opened, and only regular files are. Every problem with the
input or the output is an AdapterError whose message is one line, "<path>: <problem>". The writer
never replaces a folder it did not write (see _output.py; check_output tests an output path alone).
"""

from ._common import AdapterError, file_name
from ._output import MANIFEST_NAME, check_output
from .adapter import Adapter, check_compatible, load_adapter
from .formats import FORMATS, OutputLayout
from .memory import MemoryAdapter
from .save import AdapterWriter, save_adapter

__all__ = [
    "FORMATS",
    "MANIFEST_NAME",
    "Adapter",
    "AdapterError",
    "AdapterWriter",
    "MemoryAdapter",
    "OutputLayout",
    "check_compatible",
    "check_output",
    "file_name",
    "load_adapter",
    "save_adapter",
]
