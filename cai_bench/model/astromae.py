"""pcm-AstroMAE: the fine-tuned galaxy-redshift model every backend runs.

The shapes and the order of operations are the upstream model's (docs/data-and-models.md). Module names are
chosen so that ``state_dict()`` keys equal the upstream checkpoint's keys one for one, which keeps checkpoint
loading a plain strict ``load_state_dict`` (see ``checkpoint.py``).

Structure:
    encoder (frozen at fine-tuning): PatchEmbed -> cls token + pos embed -> 12 x NormalCell
    heads (learnable): ViT head, Inception image branch, magnitude MLP, fusion MLP -> redshift [B, 1]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SIZE = 32
BANDS = 5
EMBED_DIM = 192
DEPTH = 12
NUM_HEADS = 3
MLP_RATIO = 4
PATCH_SIZE = 8
LN_EPS = 1e-6
BRANCH_WIDTH = 1096
MAGNITUDE_WIDTH = 1024

# The encoder is frozen in the fine-tuned model; these prefixes name its parameters.
ENCODER_PREFIXES = ("patch_embed.", "cls_token", "pos_embed", "blocks.")


def trunc_normal_(tensor: torch.Tensor, std: float, bound: float = 2.0) -> torch.Tensor:
    """Fill ``tensor`` from a normal(0, std) truncated to [-bound, bound] by the inverse of its CDF: a uniform draw
    between the CDF's values at the bounds, mapped back through erfinv. One uniform draw per element, as timm's
    ``trunc_normal_`` (which built this model before) draws, so a seed's random-init weights stay what they were;
    torch 2.14's own ``trunc_normal_`` redraws by rejection instead."""
    low, high = (math.erf(x / (std * math.sqrt(2.0))) for x in (-bound, bound))
    with torch.no_grad():
        return tensor.uniform_(low, high).erfinv_().mul_(std * math.sqrt(2.0)).clamp_(-bound, bound)


class PatchEmbed(nn.Module):
    """Image to patch tokens: one strided convolution, ``[B, C, H, W] -> [B, (H/p)(W/p), dim]`` (timm's
    ``PatchEmbed``, its ``proj`` key, written here: importing timm loads torchvision and torch's compiler stack,
    about 3 s of every worker's start-up, for this and ``Mlp``)."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.image_size = image_size
        self.num_patches = (image_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"image of {tuple(x.shape[-2:])} pixels, the model takes {self.image_size}x{self.image_size}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """The transformer block's MLP: ``fc1`` -> GELU -> ``fc2`` (no dropout at inference)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with a q and v bias but no k bias (BEiT/ViTAE style)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # The k third of the bias is a constant zero, so it is not a parameter.
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


def parallel_conv_module(dim: int, hidden: int, groups: int) -> nn.Sequential:
    """PCM: grouped 1x1 convolutions over the patch grid; indices match the upstream ``PCM.{0,1,3}`` keys."""
    return nn.Sequential(
        nn.Conv2d(dim, hidden, kernel_size=1, groups=groups),
        nn.BatchNorm2d(hidden),
        nn.SiLU(),
        nn.Conv2d(hidden, dim, kernel_size=1, groups=groups),
    )


class NormalCell(nn.Module):
    """Transformer block with a parallel convolution module on the patch tokens (ViTAE's NormalCell)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.PCM = parallel_conv_module(dim, dim * mlp_ratio, groups=dim // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        side = int((n - 1) ** 0.5)
        # PCM reads the block input (not the attention output): the two paths run in parallel.
        grid = x[:, 1:].transpose(1, 2).reshape(b, c, side, side)
        conv = self.PCM(grid).flatten(2).transpose(1, 2)
        x = x + self.attn(self.norm1(x))
        x = torch.cat((x[:, :1], x[:, 1:] + conv), dim=1)
        return x + self.mlp(self.norm2(x))


class ConvBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class InceptionBlock(nn.Module):
    """Four parallel branches (1x1, 1x1->3x3, 1x1->5x5, maxpool->1x1) concatenated on channels.

    ``use_5x5=False`` reproduces the last upstream block, whose 5x5 branch exists (and is in the checkpoint)
    but is not part of the forward pass.
    """

    def __init__(self, in_ch: int, w1: int, w3: int, w5: int, wp: int, use_5x5: bool = True):
        super().__init__()
        self.use_5x5 = use_5x5
        self.branch1 = ConvBlock(in_ch, w1, 1)
        self.branch2 = nn.Sequential(ConvBlock(in_ch, w3, 1), ConvBlock(w3, w3, 3, padding=1))
        self.branch3 = nn.Sequential(ConvBlock(in_ch, w5, 1), ConvBlock(w5, w5, 5, padding=2))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), ConvBlock(in_ch, wp, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.branch1(x), self.branch2(x)]
        if self.use_5x5:
            branches.append(self.branch3(x))
        branches.append(self.branch4(x))
        return torch.cat(branches, dim=1)


class InceptionMagnitudeModel(nn.Module):
    """The image Inception branch and the magnitude MLP (upstream ``inception_model``)."""

    def __init__(self):
        super().__init__()
        self.conv2d_init = nn.Conv2d(BANDS, 32, kernel_size=1)
        self.vis_inception = nn.Sequential(
            self.conv2d_init,  # the same module: upstream's state dict holds it under both names
            nn.AvgPool2d(2),
            InceptionBlock(32, 16, 16, 16, 16),
            InceptionBlock(64, 16, 16, 16, 16),
            nn.AvgPool2d(2),
            InceptionBlock(64, 8, 8, 8, 8),
            InceptionBlock(32, 8, 8, 8, 8),
            nn.AvgPool2d(2),
            InceptionBlock(32, 4, 4, 4, 4, use_5x5=False),
            nn.Flatten(),
            nn.Linear(12 * 4 * 4, BRANCH_WIDTH),
            nn.ReLU(),
            nn.Linear(BRANCH_WIDTH, BRANCH_WIDTH),
        )
        layers: list[nn.Module] = [nn.Linear(BANDS, MAGNITUDE_WIDTH), nn.ReLU()]
        for _ in range(3):
            layers += [nn.Linear(MAGNITUDE_WIDTH, MAGNITUDE_WIDTH), nn.ReLU()]
        layers.append(nn.Linear(MAGNITUDE_WIDTH, MAGNITUDE_WIDTH))
        self.magnitude_block = nn.Sequential(*layers)


class AstroMAE(nn.Module):
    """pcm-AstroMAE: ``forward(image [B,5,32,32], magnitude [B,5]) -> redshift [B,1]``."""

    def __init__(self):
        super().__init__()
        self.patch_embed = PatchEmbed(IMAGE_SIZE, PATCH_SIZE, BANDS, EMBED_DIM)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, EMBED_DIM))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, EMBED_DIM))
        self.blocks = nn.Sequential(*[NormalCell(EMBED_DIM, NUM_HEADS, MLP_RATIO) for _ in range(DEPTH)])
        self.fc_norm = nn.LayerNorm(EMBED_DIM, eps=LN_EPS)
        self.head = nn.Linear(EMBED_DIM, EMBED_DIM)
        self.vit_block = nn.Sequential(
            nn.Linear(EMBED_DIM, BRANCH_WIDTH), nn.ReLU(), nn.Linear(BRANCH_WIDTH, BRANCH_WIDTH)
        )
        self.inception_model = InceptionMagnitudeModel()
        self.concat_block = nn.Sequential(
            nn.Linear(2 * BRANCH_WIDTH + MAGNITUDE_WIDTH, 1024), nn.ReLU(), nn.Linear(1024, 1)
        )

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(image)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        return self.blocks(x)

    def forward(self, image: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
        tokens = self.encode(image)
        vit = self.vit_block(self.head(self.fc_norm(tokens[:, 1:].mean(dim=1))))
        inception = self.inception_model.vis_inception(image)
        # Magnitudes arrive as float64 (the data's dtype); the network runs in the image's dtype.
        magnitude = self.inception_model.magnitude_block(magnitude.to(image.dtype))
        return self.concat_block(torch.cat((vit, inception, magnitude), dim=1))


def _init_weights(model: AstroMAE) -> None:
    trunc_normal_(model.pos_embed, std=0.02)
    trunc_normal_(model.cls_token, std=0.02)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def build_model(seed: int = 0, freeze_encoder: bool = True) -> AstroMAE:
    """Build pcm-AstroMAE in eval mode, initialised from ``seed`` (weights are loaded over this separately).

    The global torch RNG is left untouched, so building a model never changes what other code draws.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AstroMAE()
        _init_weights(model)
    if freeze_encoder:
        for name, param in model.named_parameters():
            param.requires_grad_(not name.startswith(ENCODER_PREFIXES))
    return model.eval()


def flops_per_sample(model: nn.Module) -> int:
    """FLOPs of one sample's forward pass as torch counts them (matmuls, convolutions, attention; 2 per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    image = torch.zeros(1, BANDS, IMAGE_SIZE, IMAGE_SIZE, device=device)
    magnitude = torch.zeros(1, BANDS, dtype=torch.float64, device=device)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(image, magnitude)
    return int(counter.get_total_flops())
