"""Stand-ins for towers transformers cannot build in a tiny model (development time only; torch).

Gemma 3n's vision tower is a ``TimmWrapperModel`` around timm's MobileNetV5: building it needs timm (which
imports torchvision; torch 2.13's only torchvision wheels here are CUDA builds that fail to import), and
its smallest architecture is ~300M parameters, not tiny. A rule derivation never looks inside a vision
tower (it is kept whole, ``keep {under}``), so for tiny models that tower is replaced by a small module
with the real checkpoint's name shapes (``timm_model.conv_stem.conv``, ``timm_model.msfa.ffn.pw_proj.conv``,
``timm_model.msfa.norm``: a norm, so the tests prove a tower norm is kept byte-identical too). Only the
point where transformers builds that tower is patched (``AutoModel.from_config(config.vision_config)`` in
``modeling_gemma3n``); the language model, the audio tower, the embedders and the wrapper's forward stay
stock transformers code.

``towers(model_type)``: a context manager under which models of ``model_type`` are built with their
stand-ins (a no-op for every other type). ``STAND_INS`` is the data: model type -> (module whose
``AutoModel`` to patch, config class name that gets the stand-in, stand-in class).
"""
from __future__ import annotations

import contextlib
import importlib

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.gemma3n.configuration_gemma3n import Gemma3nVisionConfig


class StandInRMSNorm(nn.Module):
    """RMS norm over the last axis, scale ``w`` (timm's RmsNorm2d normalizes the channel axis of NCHW;
    the stand-in is applied channels-last so the numerical norm probe sees a plain norm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class _Conv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, bias: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=bias)


class _MobileNetStandIn(nn.Module):
    """conv stem -> 1x1 projection -> average pool to the soft-token grid -> norm; NCHW out."""

    def __init__(self, hidden: int, grid: int):
        super().__init__()
        self.grid = grid
        self.conv_stem = _Conv(3, 8, 3, stride=2)
        self.msfa = nn.Module()
        self.msfa.ffn = nn.Module()
        self.msfa.ffn.pw_proj = _Conv(8, hidden, 1, bias=False)
        self.msfa.norm = StandInRMSNorm(hidden)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.msfa.ffn.pw_proj.conv(self.conv_stem.conv(pixel_values))
        x = nn.functional.adaptive_avg_pool2d(x, self.grid)
        return self.msfa.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Gemma3nVisionStandIn(PreTrainedModel):
    """Stand-in for Gemma 3n's ``TimmWrapperModel`` vision tower: same parameter prefix
    (``timm_model.``), same output layout ([batch, hidden, grid, grid]), a few parameters."""

    config_class = Gemma3nVisionConfig
    base_model_prefix = "standin"
    main_input_name = "pixel_values"

    def __init__(self, config: Gemma3nVisionConfig, grid: int = 16):  # 16 x 16 = Gemma3nConfig's 256 soft tokens
        super().__init__(config)
        self.timm_model = _MobileNetStandIn(config.hidden_size, grid)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, do_pooling: bool = False, return_dict: bool = True, **kwargs):
        h = self.timm_model(pixel_values)
        return BaseModelOutputWithPooling(last_hidden_state=h, pooler_output=h.mean((2, 3)))


STAND_INS: dict[str, tuple[str, str, type]] = {
    "gemma3n": ("transformers.models.gemma3n.modeling_gemma3n", "Gemma3nVisionConfig", Gemma3nVisionStandIn),
}


class _AutoModelShim:
    """``AutoModel`` as one modeling module sees it: configs of one class get the stand-in."""

    def __init__(self, real, config_name: str, cls: type):
        self._real, self._config_name, self._cls = real, config_name, cls

    def from_config(self, config, **kwargs):
        if type(config).__name__ == self._config_name:
            return self._cls(config)
        return self._real.from_config(config, **kwargs)

    def __getattr__(self, name):
        return getattr(self._real, name)


@contextlib.contextmanager
def towers(model_type: str | None):
    """Build (and load) ``model_type`` models with the stand-ins of ``STAND_INS``; no-op for other types."""
    if model_type not in STAND_INS:
        yield
        return
    mod_name, config_name, cls = STAND_INS[model_type]
    mod = importlib.import_module(mod_name)
    real = mod.AutoModel
    if isinstance(real, _AutoModelShim):  # nested: already patched
        yield
        return
    mod.AutoModel = _AutoModelShim(real, config_name, cls)
    try:
        yield
    finally:
        mod.AutoModel = real
