"""Model types out of FlashNorm's scope, read from transformers' own mappings (development time).

FlashNorm folds the norms of decoder language models. Two groups of transformers' model types are refused
with that reason (``refused`` families, one data file each):

- encoder-decoders: every type of the masked-LM, causal-LM, seq2seq and image-text-to-text mappings whose
  config class sets ``is_encoder_decoder`` (T5, BART, Whisper, Florence-2, ...);
- encoders: the types with a masked-LM head and neither a causal-LM nor a seq2seq one (ALBERT, DeBERTa,
  ModernBERT, ...). Types with both (BERT, RoBERTa: encoders transformers can also run as decoders) are
  left to the derivation, which says what folds in their causal-LM form.

Types another family file already covers are left out (its rules win).
"""
from __future__ import annotations

ENCODER_WHY = ("encoder model (transformers has a masked-LM head for it and no causal-LM or seq2seq one): "
               "FlashNorm folds the norms of decoder language models, encoders are out of streamfold's scope")
ENCODER_DECODER_WHY = ("encoder-decoder model (its transformers config sets is_encoder_decoder): FlashNorm folds "
                       "the norms of decoder-only language models, encoder-decoders are out of streamfold's scope")


def _is_encoder_decoder(model_type: str) -> bool:
    from transformers.models.auto import configuration_auto
    try:
        cfg = configuration_auto.CONFIG_MAPPING[model_type]()
    except Exception:  # a config class that cannot be built with its defaults says nothing
        return False
    return bool(getattr(cfg, "is_encoder_decoder", False))


def out_of_scope(known: set[str]) -> dict[str, dict]:
    """``{file name: family}``: the ``encoders`` and ``encoder_decoders`` refused families, without the
    model types in ``known`` (covered by other family files)."""
    import transformers
    from transformers.models.auto import modeling_auto as ma
    causal = set(ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    itt = set(getattr(ma, "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", {}))
    s2s = set(ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
    mlm = set(ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    enc_dec = sorted(mt for mt in (causal | itt | s2s | mlm) - known if _is_encoder_decoder(mt))
    enc = sorted(mlm - causal - s2s - itt - known - set(enc_dec))
    rec = {"transformers": transformers.__version__}
    return {"encoder_decoders": {"description": "Encoder-decoder models (out of scope: refused)",
                                 "model_types": enc_dec, "refused": ENCODER_DECODER_WHY, "folds": [], "derived": rec},
            "encoders": {"description": "Encoder models (out of scope: refused)", "model_types": enc,
                         "refused": ENCODER_WHY, "folds": [], "derived": rec}}
