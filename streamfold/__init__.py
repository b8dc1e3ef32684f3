"""streamfold: streaming, torch-free FlashNorm conversion of Hugging Face safetensors checkpoints.

>>> import streamfold
>>> report = streamfold.convert("Llama-3.2-1B", "Llama-3.2-1B-FlashNorm")   # doctest: +SKIP
>>> print(report.summary())                                                 # doctest: +SKIP

The same, step by step (each task is one output shard, a JSON-serialisable value):

>>> p = streamfold.plan("Llama-3.2-1B")                                     # doctest: +SKIP
>>> results = [streamfold.run_task(task, "out", src=p.src) for task in p.tasks]  # doctest: +SKIP
>>> streamfold.finish(p, "out", results=results)                            # doctest: +SKIP

Hub repo ids work as sources, and the output can be pushed (huggingface_hub is imported only then):

>>> print(streamfold.inspect("HuggingFaceTB/SmolLM2-135M").describe())      # doctest: +SKIP
>>> streamfold.convert("HuggingFaceTB/SmolLM2-135M", "SmolLM2-135M-FlashNorm",
...                    push_to_hub="me/SmolLM2-135M-FlashNorm")            # doctest: +SKIP
"""
from .core.version import __version__  # noqa: E402
from .run.conversion import ConversionPlan, ShardResult, finish, load_plan, plan, run_task  # noqa: E402
from .convert import ConversionReport, convert  # noqa: E402
from .core.errors import AlreadyFlashNorm, NothingToFold, StreamfoldError  # noqa: E402
from .inspection import Inspection, inspect  # noqa: E402
from .planning.planner import Kind  # noqa: E402
from .planning.tasks import Chunk, Op, Task  # noqa: E402
from .check.verify import VerifyReport, verify  # noqa: E402

# ``streamfold.plan`` is the function; the planner module is ``streamfold.planning.planner``.

__all__ = ["convert", "plan", "run_task", "finish", "ConversionPlan", "ShardResult", "Task", "Chunk", "Op",
           "Kind", "load_plan", "inspect", "Inspection", "verify", "VerifyReport", "ConversionReport",
           "StreamfoldError", "AlreadyFlashNorm", "NothingToFold", "__version__"]
