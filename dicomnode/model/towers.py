"""Prompted passes through open_clip's frozen towers, built from the towers' own submodules.

VPT and DPT need to reach inside the encoders: token prompts go between the class token and
the patch tokens, deep prompts replace the previous layer's prompt outputs before each block,
a class-token shift is added before each block, and learned text context replaces word
embeddings. These functions run the frozen submodules (conv1, class and positional
embeddings, ln_pre, resblocks, pooling, projections) in the towers' own order instead of
forking open_clip's code, and with every prompt absent they compute exactly what
`encode_image` and `encode_text` compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class TowerError(ValueError):
    """The backbone's tower cannot take prompts (an architecture this code does not know)."""


@dataclass(frozen=True)
class VisionShape:
    """What a prompt needs to know of the image tower."""

    width: int
    layers: int
    image_size: int
    output_dim: int


def vision_shape(model: Any) -> VisionShape:
    """Width, depth, input side and embedding size of an open_clip ViT image tower."""
    visual = model.visual
    if not hasattr(visual, "transformer") or not hasattr(visual, "class_embedding"):
        raise TowerError(
            f"image tower {type(visual).__name__} is not an open_clip VisionTransformer: "
            "visual prompts need a ViT backbone"
        )
    size = visual.image_size
    return VisionShape(
        width=int(visual.class_embedding.shape[-1]),
        layers=len(visual.transformer.resblocks),
        image_size=int(size[0] if isinstance(size, tuple | list) else size),
        output_dim=int(visual.output_dim),
    )


def servable(block: nn.Module) -> bool:
    """Whether `block` is open_clip's plain ResidualAttentionBlock, which `serve_block` computes.

    Plain: self-attention with one packed input projection, no layer scale, a GELU or QuickGELU
    MLP. Any other block (an architecture with layer scale, cross attention, custom blocks)
    runs its own forward.
    """
    attn = getattr(block, "attn", None)
    mlp = getattr(block, "mlp", None)
    return (
        type(block).__name__ == "ResidualAttentionBlock"
        and isinstance(attn, nn.MultiheadAttention)
        and attn._qkv_same_embed_dim
        and attn.in_proj_bias is not None
        and attn.out_proj.bias is not None
        and not hasattr(block, "ln_1_kv")
        and isinstance(block.ls_1, nn.Identity)
        and isinstance(block.ls_2, nn.Identity)
        and isinstance(mlp, nn.Sequential)
        and list(getattr(mlp, "_modules", {})) == ["c_fc", "gelu", "c_proj"]
        and mlp.c_fc.bias is not None
        and mlp.c_proj.bias is not None
    )


def _fused_gelu(block: nn.Module) -> bool:
    gelu = block.mlp.gelu
    return isinstance(gelu, nn.GELU) and gelu.approximate == "none" and hasattr(torch, "_addmm_activation")


def serve_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One plain block on batch-first `x` (B, T, W) with fewer passes over memory, for serving.

    The same arithmetic as the block's forward, in fewer kernels: the packed q, k, v are
    viewed, not copied, into PyTorch's fused attention (nn.MultiheadAttention's inference
    path copies them apart first); the GELU is applied in the epilogue of the first MLP
    product (cuBLASLt's GELU, the tanh form, on CUDA: within bf16 rounding of the exact one;
    the exact GELU on the CPU); residuals are added in place to fresh products. Measured by
    `dicomnode bench infer` (the `tower` row against open_clip's `encode_image`). Only for
    passes without gradients: training runs the block's own forward.
    """
    batch, tokens, width = x.shape
    attn = block.attn
    heads = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    mixed = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch * tokens, width)
    x = torch.addmm(attn.out_proj.bias, mixed, attn.out_proj.weight.t()).view_as(x).add_(x)
    fc, proj = block.mlp.c_fc, block.mlp.c_proj
    hidden = block.ln_2(x).reshape(batch * tokens, width)
    if _fused_gelu(block):
        hidden = torch._addmm_activation(fc.bias, hidden, fc.weight.t(), use_gelu=True)
    else:
        hidden = block.mlp.gelu(F.linear(hidden, fc.weight, fc.bias))
    return torch.addmm(proj.bias, hidden, proj.weight.t()).view_as(x).add_(x)


def embed_patches(conv: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Patch tokens (B, patches, width) of `pixels` through the tower's patch convolution.

    Without gradients, a convolution whose stride is its kernel (a ViT's) runs as one matrix
    product over the image cut into patches: the same sums, and on CUDA in bf16 several times
    faster than the convolution kernels (a copy to channels-last and a kernel of the previous
    GPU generation, 8% of a ViT-B/16 pass measured on an H100).
    """
    plain = (
        not torch.is_grad_enabled()
        and isinstance(conv, nn.Conv2d)
        and conv.bias is None
        and conv.groups == 1
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.kernel_size == conv.stride
        and pixels.shape[-2] % conv.stride[0] == 0
        and pixels.shape[-1] % conv.stride[1] == 0
    )
    if not plain:
        x = conv(pixels)
        return x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    batch, channels, height, width = pixels.shape
    ph, pw = conv.kernel_size
    rows, columns = height // ph, width // pw
    patches = pixels.reshape(batch, channels, rows, ph, columns, pw).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(batch * rows * columns, channels * ph * pw)
    tokens = patches @ conv.weight.reshape(conv.out_channels, -1).t()
    return tokens.view(batch, rows * columns, conv.out_channels)


def _blocks(x: torch.Tensor, transformer: nn.Module, before_block) -> torch.Tensor:
    """Run the resblocks batch-first, calling `before_block(index, x)` ahead of each.

    Without gradients (serving, evaluation) plain blocks take `serve_block`.
    """
    batch_first = getattr(transformer, "batch_first", True)
    serving = not torch.is_grad_enabled()
    for index, block in enumerate(transformer.resblocks):
        x = before_block(index, x)
        if serving and servable(block):
            x = serve_block(block, x)
        else:
            x = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
    return x


def encode_image(
    visual: nn.Module,
    pixels: torch.Tensor,
    *,
    token_prompts: torch.Tensor | None = None,
    class_shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """The image embedding of `pixels` (B, 3, S, S) with optional prompts in the token stream.

    `token_prompts` (depth, n, width): depth 1 is shallow VPT (inserted once, after the class
    token, without positional embedding); depth == layers is deep VPT (before every block
    the previous layer's prompt outputs are replaced). `class_shift` (layers, width) is added
    to the class token before each block (DPT's zero-initialised vision prompt). Prompt
    tokens are removed before pooling, so an average pool sees patches only.
    """
    x = embed_patches(visual.conv1, pixels)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    count = 0 if token_prompts is None else token_prompts.shape[1]
    if count:
        first = token_prompts[0].to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :1], first, x[:, 1:]], dim=1)
    x = visual.ln_pre(x)

    def before_block(index: int, x: torch.Tensor) -> torch.Tensor:
        if count and index > 0 and index < token_prompts.shape[0]:
            deep = token_prompts[index].to(x.dtype).expand(x.shape[0], -1, -1)
            if torch.is_grad_enabled():
                x = torch.cat([x[:, :1], deep, x[:, 1 + count :]], dim=1)
            else:  # serving: overwrite in place instead of copying the whole token stream
                x[:, 1 : 1 + count] = deep
        if class_shift is not None:
            x = torch.cat([x[:, :1] + class_shift[index].to(x.dtype), x[:, 1:]], dim=1)
        return x

    x = _blocks(x, visual.transformer, before_block)
    if count:
        x = torch.cat([x[:, :1], x[:, 1 + count :]], dim=1)
    pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled


@dataclass(frozen=True)
class TextTower:
    """The parts of an open_clip text tower that learned context needs, whatever the model class."""

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: Any
    attn_mask: torch.Tensor | None
    pool_type: str

    @classmethod
    def of(cls, model: Any) -> TextTower:
        """The text tower of a CLIP (towers on the model) or CustomTextCLIP (`model.text`)."""
        owner = getattr(model, "text", model)
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final")
        if not all(hasattr(owner, name) for name in needed) or getattr(owner, "cls_emb", None) is not None:
            raise TowerError(
                f"text tower {type(owner).__name__} is not an open_clip text transformer: "
                "learned text context needs one"
            )
        pool_type = getattr(owner, "pool_type", None) or getattr(model, "text_pool_type", "argmax")
        if pool_type != "argmax":
            raise TowerError(f"text tower pools with {pool_type!r}; learned context needs 'argmax' (EOT)")
        return cls(
            token_embedding=owner.token_embedding,
            positional_embedding=owner.positional_embedding,
            transformer=owner.transformer,
            ln_final=owner.ln_final,
            text_projection=owner.text_projection,
            attn_mask=owner.attn_mask,
            pool_type=pool_type,
        )

    @property
    def width(self) -> int:
        """Width of the word embeddings, which learned context tokens share."""
        return int(self.token_embedding.weight.shape[1])

    def encode_embedded(self, embedded: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Text embeddings of word embeddings `embedded` (B, L, width), pooled at each EOT.

        `tokens` (B, L) are token ids whose argmax marks the EOT position, as in CLIP.
        """
        dtype = self.transformer.get_cast_dtype() if hasattr(self.transformer, "get_cast_dtype") else None
        x = embedded.to(dtype or embedded.dtype) + self.positional_embedding.to(dtype or embedded.dtype)
        # open_clip's Transformer takes batch-first input whatever its internal layout.
        x = self.transformer(x, attn_mask=self.attn_mask)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        if self.text_projection is None:
            return x
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection
