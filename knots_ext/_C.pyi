# The compiled extension (python/bindings.cpp), untyped for the type checker.
from typing import Any

def __getattr__(name: str) -> Any: ...
