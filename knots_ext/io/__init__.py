"""Adapter I/O: reading PEFT LoRA adapters (directories or bare safetensors files, lazily, one
module at a time) and writing merged ones as PEFT LoRA adapters with scale 1.

Pickle files (.bin/.pt/.pth) are never opened. Every problem with the input or the output is an
AdapterError whose message is one line, "<path>: <problem>".
"""
from ._common import AdapterError
from .adapter import Adapter, check_compatible, load_adapter
from .save import save_adapter

__all__ = ["AdapterError", "Adapter", "load_adapter", "check_compatible", "save_adapter"]
