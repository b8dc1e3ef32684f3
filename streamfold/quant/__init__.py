"""Quantized sources: classification of their tensors (``formats``), decoders and the dequantize kernel.

Floor: just above ``streamfold.core`` (imports nothing else of streamfold), so the planner, ``check``
and the executors can all use it.
"""
