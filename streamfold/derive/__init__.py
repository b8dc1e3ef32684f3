"""Rule derivation from transformers (development-time; imports torch/transformers)."""
