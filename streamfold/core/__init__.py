"""Floor 0: bytes and numbers. Safetensors reading and writing, dtypes, the fold kernel, errors, the
file policy and the manifest. Imports nothing of streamfold above it."""
