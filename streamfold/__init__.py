"""streamfold: streaming, torch-free FlashNorm conversion of Hugging Face safetensors checkpoints.

>>> import streamfold
>>> report = streamfold.convert("Llama-3.2-1B", "Llama-3.2-1B-FlashNorm")   # doctest: +SKIP
>>> print(report.summary())                                                 # doctest: +SKIP
"""
__version__ = "0.1.0"

from .convert import ConversionReport, convert, load_plan  # noqa: E402
from .errors import StreamfoldError  # noqa: E402

__all__ = ["convert", "load_plan", "ConversionReport", "StreamfoldError", "__version__"]
