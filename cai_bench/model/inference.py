"""Inference-only transformations of a built and loaded pcm-AstroMAE: the engine's fast path.

Each is exact up to float rounding (the accuracy guard test holds them to 2e-3 in redshift, and they stay
near 1e-7), and each was kept because it measurably helped on the 2-core dev CPU (figures in the README):

- BatchNorm folded into the convolution before it (ConvBlock, and the PCM's first convolution): one pass over
  the activations less per block;
- channels_last memory layout for the convolutional parts: oneDNN's convolutions and max pooling are much
  faster on NHWC than on NCHW here (+38% for the whole model, measured interleaved with the plain model).

Tried and not kept (see ``cai-bench bench`` in the README): bf16 autocast (this CPU's bf16 matmuls run at
about 60% of fp32 speed without AMX), merging the Inception 1x1 convolutions, TorchScript freezing.
``torch.compile`` with weight freezing is available (``compile_model``) but costs 25-35 s up front.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from cai_bench.model.astromae import AstroMAE, ConvBlock, NormalCell


def fold_batchnorm(model: AstroMAE) -> int:
    """Fold every BatchNorm of the model into its convolution (eval mode only); returns how many."""
    if model.training:
        raise ValueError("BatchNorm can only be folded in eval mode")
    folded = 0
    for module in model.modules():
        if isinstance(module, ConvBlock) and isinstance(module.bn, nn.BatchNorm2d):
            module.conv = fuse_conv_bn_eval(module.conv, module.bn)
            module.bn = nn.Identity()
            folded += 1
        elif isinstance(module, NormalCell) and isinstance(module.PCM[1], nn.BatchNorm2d):
            module.PCM[0] = fuse_conv_bn_eval(module.PCM[0], module.PCM[1])
            module.PCM[1] = nn.Identity()
            folded += 1
    return folded


class Float32Linear(nn.Linear):
    """A Linear that computes in float32 whatever autocast runs around it: the output layer under bf16 or fp16.

    bf16's step near z = 0.5 is about 0.004, so an output rounded to bf16 alone nearly spends the 2e-3 tolerance;
    one 1024 x 1 product in float32 costs nothing beside the network."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return super().forward(x.float())


def output_in_float32(model: AstroMAE) -> str:
    """Make the model's last layer (``concat_block[2]``, Linear(1024, 1)) a ``Float32Linear`` on the same weights,
    so the state dict keeps its names; returns which layer, for the run record."""
    last = model.concat_block[2]
    if not isinstance(last, Float32Linear):
        replacement = Float32Linear(last.in_features, last.out_features, device=last.weight.device)
        replacement.weight, replacement.bias = last.weight, last.bias
        model.concat_block[2] = replacement
    return "concat_block.2"


def prepare_for_inference(model: AstroMAE, channels_last: bool = True) -> dict:
    """Apply the fast path's transformations in place; returns what was done, for the run record."""
    folded = fold_batchnorm(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return {"fold_batchnorm": folded, "channels_last": channels_last}


def compile_model(model: nn.Module) -> nn.Module:
    """``torch.compile`` with Inductor weight freezing (constant-folded, prepacked weights for inference)."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    return torch.compile(model)
