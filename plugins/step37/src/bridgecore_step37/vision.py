"""The Step-3.7 Megatron model and its config: megatron-core's GPTModel (Step-3.5 spec) plus the
PE-G/14 tower. `Step37Config` (what `provider.py` makes of config.json) builds `Step37Model`.

`Step37Model` is a MegatronModule holding `language_model` (GPTModel), `vision_model` and
`image_insert_embedding.align_projector`; its default `sharded_state_dict` saves the tower and the
projector as replicated tensors beside the GPTModel's own sharded ones.

The tower and projector are plain torch modules (`nn.Conv2d`, `nn.LayerNorm`, `nn.Linear`), not
megatron-core ones: they run replicated with TP=1 semantics on every rank, while megatron-core's
parallel linears always split over the model's TP group (and bridgecore reads a param's TP split
from those classes). megatron-core also has no LayerScale, PE 2D rope or conv downsampler. Their
parameter names are the on-disk ones under `vision_model.`, as Megatron-Bridge keeps them.

PE's 2D rope is the complex (pairwise) form: within a head, pair p of dims (2p, 2p+1) turns by
col·f_p for the first head_dim/4 pairs and by row·f_p for the rest (W then H), f_p = θ^(-4p/head_dim).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from torch import nn

from bridgecore.plugin import BridgeError, ModelConfig
from bridgecore_step35.provider import Step35Config

#: The released image token id, used when config.json omits it.
DEFAULT_IMAGE_TOKEN_ID = 128001


@dataclass(frozen=True)
class VisionConfig:
    """The PE-G/14 vision tower (`vision_config`, model_type `perception_encoder`)."""

    width: int
    layers: int
    heads: int
    patch_size: int
    image_size: int
    intermediate_size: int
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    num_channels: int = 3

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def grid(self) -> int:
        """Patches per side of the native image size, which the positional embedding covers."""
        return self.image_size // self.patch_size


def rope_2d_angles(grid_h: int, grid_w: int, head_dim: int, theta: float) -> torch.Tensor:
    """Rotation angle of every (patch, pair): [grid_h·grid_w, head_dim/2], patches row-major."""
    quarter = head_dim // 4
    inv_freq = 1.0 / (theta ** (torch.arange(0, 2 * quarter, 2, dtype=torch.float) / (2 * quarter)))
    rows = torch.arange(grid_h).repeat_interleave(grid_w).float()
    cols = torch.arange(grid_w).repeat(grid_h).float()
    return torch.cat([cols[:, None] * inv_freq, rows[:, None] * inv_freq], dim=-1)


def rotate_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (2p, 2p+1) of the last dim of x [batch, patches, heads, head_dim], in fp32."""
    even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2).to(x.dtype)


class RopeAttention(nn.Module):
    """Bidirectional self-attention with a fused q|k|v projection (`in_proj_*`) and 2D rope on q, k."""

    def __init__(self, vision: VisionConfig, dtype: torch.dtype):
        super().__init__()
        self.heads = vision.heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * vision.width, vision.width, dtype=dtype))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * vision.width, dtype=dtype))
        self.out_proj = nn.Linear(vision.width, vision.width, dtype=dtype)

    def forward(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).unflatten(-1, (3, self.heads, -1)).unbind(2)
        q, k = rotate_pairs(q, angles), rotate_pairs(k, angles)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.out_proj(out.transpose(1, 2).flatten(2))


class LayerScale(nn.Module):
    def __init__(self, width: int, dtype: torch.dtype):
        super().__init__()
        self.gamma = nn.Parameter(torch.empty(width, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class QuickGeluMLP(nn.Module):
    def __init__(self, vision: VisionConfig, dtype: torch.dtype):
        super().__init__()
        self.c_fc = nn.Linear(vision.width, vision.intermediate_size, dtype=dtype)
        self.c_proj = nn.Linear(vision.intermediate_size, vision.width, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.c_fc(x)
        return self.c_proj(hidden * torch.sigmoid(1.702 * hidden))


class VisionBlock(nn.Module):
    """x + ls_1·attn(ln_1 x), then + ls_2·mlp(ln_2 x)."""

    def __init__(self, vision: VisionConfig, dtype: torch.dtype):
        super().__init__()
        self.ln_1 = nn.LayerNorm(vision.width, eps=vision.layer_norm_eps, dtype=dtype)
        self.attn = RopeAttention(vision, dtype)
        self.ls_1 = LayerScale(vision.width, dtype)
        self.ln_2 = nn.LayerNorm(vision.width, eps=vision.layer_norm_eps, dtype=dtype)
        self.mlp = QuickGeluMLP(vision, dtype)
        self.ls_2 = LayerScale(vision.width, dtype)

    def forward(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        x = x + self.ls_1(self.attn(self.ln_1(x), angles))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class VisionTransformer(nn.Module):
    def __init__(self, vision: VisionConfig, dtype: torch.dtype):
        super().__init__()
        self.resblocks = nn.ModuleList(VisionBlock(vision, dtype) for _ in range(vision.layers))

    def forward(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, angles)
        return x


class VisionTower(nn.Module):
    """Patches -> absolute positions -> ln_pre -> blocks -> two stride-2 3×3 convs: [B, tokens, 4·width]."""

    def __init__(self, vision: VisionConfig, dtype: torch.dtype):
        super().__init__()
        self.vision = vision
        w = vision.width
        self.conv1 = nn.Conv2d(
            vision.num_channels, w, vision.patch_size, stride=vision.patch_size, bias=False, dtype=dtype
        )
        self.positional_embedding = nn.Parameter(torch.empty(vision.grid**2, w, dtype=dtype))
        self.ln_pre = nn.LayerNorm(w, eps=vision.layer_norm_eps, dtype=dtype)
        self.transformer = VisionTransformer(vision, dtype)
        self.vit_downsampler1 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, dtype=dtype)
        self.vit_downsampler2 = nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1, dtype=dtype)

    def positions(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """The absolute positional embedding for a grid, bilinearly resized from the native one."""
        native = self.vision.grid
        if (grid_h, grid_w) == (native, native):
            return self.positional_embedding
        table = self.positional_embedding.reshape(1, native, native, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(table, size=(grid_h, grid_w), mode="bilinear", align_corners=False)
        return resized.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.conv1(pixel_values.to(self.conv1.weight.dtype))
        batch, width, grid_h, grid_w = patches.shape
        x = self.ln_pre(patches.flatten(2).transpose(1, 2) + self.positions(grid_h, grid_w))
        angles = rope_2d_angles(grid_h, grid_w, self.vision.head_dim, self.vision.rope_theta).to(x.device)
        x = self.transformer(x, angles)
        x = x.transpose(1, 2).reshape(batch, width, grid_h, grid_w)
        x = self.vit_downsampler2(self.vit_downsampler1(x))
        return x.flatten(2).transpose(1, 2)


class ImageInsertEmbedding(nn.Module):
    """The projector from the tower's tokens to the text hidden size (HF `vit_large_projector`)."""

    def __init__(self, config: Step37Config):
        super().__init__()
        self.align_projector = nn.Linear(
            config.projector_input_size, config.hidden_size, bias=config.projector_bias, dtype=config.params_dtype
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.align_projector(tokens)


class Step37Model(MegatronModule):
    """One pipeline stage of Step-3.7: the tower and projector live on the first stage only."""

    def __init__(
        self,
        config: Step37Config,
        spec: object,
        mtp_spec: object,
        *,
        pre_process: bool,
        post_process: bool,
        vp_stage: int | None,
    ):
        super().__init__(config)
        self.language_model = ModelConfig.build_model(
            config, spec, mtp_spec, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage
        )
        if pre_process:
            self.vision_model = VisionTower(config.vision, config.params_dtype)
            self.image_insert_embedding = ImageInsertEmbedding(config)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image tokens [images, tokens, hidden] for pixel_values [images, C, H, W]."""
        return self.image_insert_embedding(self.vision_model(pixel_values))

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=position_ids)
        if pixel_values is not None:
            embeddings = insert_image_features(
                embeddings, input_ids, self.image_features(pixel_values), self.config.image_token_id
            )
        return self.language_model(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, decoder_input=embeddings
        )


def insert_image_features(
    embeddings: torch.Tensor, input_ids: torch.Tensor, features: torch.Tensor, image_token_id: int
) -> torch.Tensor:
    """Put the image tokens' features in place of their embeddings, images in (batch, position) order.

    `embeddings` are Megatron's [seq, batch, hidden]; `input_ids` [batch, seq].
    """
    slots = input_ids == image_token_id
    tokens = features.reshape(-1, features.shape[-1])
    if int(slots.sum()) != tokens.shape[0]:
        raise BridgeError(
            f"input has {int(slots.sum())} image tokens (id {image_token_id}) but the images give"
            f" {tokens.shape[0]} features"
        )
    batch_first = embeddings.transpose(0, 1).clone()
    batch_first[slots] = tokens.to(batch_first.dtype)
    return batch_first.transpose(0, 1).contiguous()


def multimodal_logits(model: Step37Model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
    """Logits [batch, seq, vocab] of a single-stage model, with the causal mask and positions 0..seq-1,
    the vocab gathered over TP."""
    from bridgecore.plugin import gather_vocab

    batch, seq = input_ids.shape
    position_ids = torch.arange(seq).unsqueeze(0).expand(batch, seq)
    mask = torch.ones(seq, seq, dtype=torch.bool).triu(1).view(1, 1, seq, seq)
    language = model.language_model
    # GPTModel runs its MTP block only to add a training loss, which needs labels; logits do not.
    mtp = (language.mtp_process, language.config.mtp_num_layers)
    language.mtp_process, language.config.mtp_num_layers = False, None
    try:
        return gather_vocab(model(input_ids, position_ids, mask, pixel_values=pixel_values))
    finally:
        language.mtp_process, language.config.mtp_num_layers = mtp


@dataclass
class Step37Config(Step35Config):
    """The Step-3.5 text decoder's config plus the vision tower and the projector."""

    vision: VisionConfig | None = None
    image_token_id: int = DEFAULT_IMAGE_TOKEN_ID
    projector_bias: bool = False

    @property
    def projector_input_size(self) -> int:
        """Width of the tower's output tokens: each stride-2 downsampler doubles the channels."""
        return self.vision.width * 4

    def build_model(
        self, spec: Any, mtp_spec: Any, *, pre_process: bool, post_process: bool, vp_stage: int | None
    ) -> torch.nn.Module:
        return Step37Model(self, spec, mtp_spec, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)

    def forward_logits(
        self, model: torch.nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [batch, seq, vocab]; with `pixel_values` the image tokens carry image features."""
        return multimodal_logits(model, input_ids, pixel_values)
