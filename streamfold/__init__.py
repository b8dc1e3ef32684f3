"""streamfold: streaming, torch-free FlashNorm conversion of Hugging Face safetensors checkpoints.

>>> import streamfold
>>> report = streamfold.convert("Llama-3.2-1B", "Llama-3.2-1B-FlashNorm")   # doctest: +SKIP
>>> print(report.summary())                                                 # doctest: +SKIP

Hub repo ids work as sources, and the output can be pushed (huggingface_hub is imported only then):

>>> print(streamfold.inspect("HuggingFaceTB/SmolLM2-135M").describe())      # doctest: +SKIP
>>> streamfold.convert("HuggingFaceTB/SmolLM2-135M", "SmolLM2-135M-FlashNorm",
...                    push_to_hub="me/SmolLM2-135M-FlashNorm")            # doctest: +SKIP
"""
__version__ = "0.1.0"

from .convert import ConversionReport, convert, load_plan  # noqa: E402
from .errors import AlreadyFlashNorm, StreamfoldError  # noqa: E402
from .hub import Inspection, inspect  # noqa: E402
from .verify import VerifyReport, verify  # noqa: E402

__all__ = ["convert", "load_plan", "inspect", "Inspection", "verify", "VerifyReport", "ConversionReport",
           "StreamfoldError", "AlreadyFlashNorm", "__version__"]
