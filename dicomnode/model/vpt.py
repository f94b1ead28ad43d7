"""Visual prompt tuning: learnable pixels and tokens that steer a frozen image tower.

Two kinds of prompt, as METHODS.md describes them. Pixel prompts are added to the normalised
image: border pads, a corner patch, or grids resized onto named boxes (both lung fields),
several grids per box learned together so coarse anatomy and fine lesions each get a scale.
Token prompts are inserted after the class token without positional embedding; shallow once,
deep before every block (replacing the previous layer's prompt outputs). Only these tensors
learn; the backbone stays frozen and is never written.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dicomnode.model.promptset import PixelPrompts, VptSpec
from dicomnode.model.towers import VisionShape, encode_image

PIXEL = "vpt.pixel"
TOKENS = "vpt.tokens"

#: The chest default of METHODS.md: both lung fields at two scales (grids 32 and 8) and six
#: deep token prompts; with a 14-class head about 0.07M parameters on ViT-B/16.
CHEST_DEFAULT = {
    "pixel": {
        "placement": "regions",
        "regions": {"right_lung": [0.1, 0.15, 0.48, 0.85], "left_lung": [0.52, 0.15, 0.9, 0.85]},
        "grids": [32, 8],
    },
    "tokens": {"count": 6, "depth": "deep"},
}


class VisualPrompts(nn.Module):
    """The learnable prompts of one VPT set for one image tower shape."""

    def __init__(self, spec: VptSpec, shape: VisionShape, patch_size: int) -> None:
        super().__init__()
        self.spec = spec
        self.image_size = shape.image_size
        self.pixel = nn.ParameterDict()
        if spec.pixel is not None:
            for name, tensor_shape in pixel_shapes(spec.pixel, shape.image_size).items():
                # Zero: an untrained pixel prompt leaves the image as it is.
                self.pixel[name] = nn.Parameter(torch.zeros(tensor_shape))
        self.tokens: nn.Parameter | None = None
        if spec.tokens is not None:
            depth = shape.layers if spec.tokens.depth == "deep" else 1
            # VPT's init: uniform(-v, v), v = sqrt(6 / (3 * patch^2 + width)).
            bound = math.sqrt(6.0 / (3 * patch_size * patch_size + shape.width))
            self.tokens = nn.Parameter(
                torch.empty(depth, spec.tokens.count, shape.width).uniform_(-bound, bound)
            )

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors as stored in prompts.safetensors."""
        named = {f"{PIXEL}.{key}": value for key, value in self.pixel.items()}
        if self.tokens is not None:
            named[TOKENS] = self.tokens
        return named

    def pixel_prompt(self) -> torch.Tensor | None:
        """The (3, S, S) image added to every input, or None without pixel prompts."""
        pixel = self.spec.pixel
        if pixel is None:
            return None
        size = self.image_size
        if pixel.placement == "border":
            p = pixel.size
            return (
                F.pad(self.pixel["top"], (0, 0, 0, size - p))
                + F.pad(self.pixel["bottom"], (0, 0, size - p, 0))
                + F.pad(self.pixel["left"], (0, size - p, p, p))
                + F.pad(self.pixel["right"], (size - p, 0, p, p))
            )
        if pixel.placement == "corner":
            p = pixel.size
            return F.pad(self.pixel["corner"], (0, size - p, 0, size - p))
        canvas = torch.zeros(3, size, size, device=next(iter(self.pixel.values())).device)
        for region, (x0, y0, x1, y1) in pixel.regions.items():
            left, top = round(x0 * size), round(y0 * size)
            right, bottom = max(left + 1, round(x1 * size)), max(top + 1, round(y1 * size))
            for grid in pixel.grids:
                patch = F.interpolate(
                    self.pixel[f"{region}_{grid}"][None],
                    size=(bottom - top, right - left),
                    mode="bilinear",
                    align_corners=False,
                )[0]
                canvas = canvas + F.pad(patch, (left, size - right, top, size - bottom))
        return canvas

    def image_features(self, visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings of `pixels` with every prompt applied."""
        prompt = self.pixel_prompt()
        if prompt is not None:
            pixels = pixels + prompt.to(pixels.dtype)
        return encode_image(visual, pixels, token_prompts=self.tokens)


def pixel_shapes(pixel: PixelPrompts, image_size: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of each pixel-prompt tensor for an input of `image_size` pixels."""
    p = pixel.size
    if pixel.placement in ("border", "corner") and (
        p > image_size or (pixel.placement == "border" and 2 * p >= image_size)
    ):
        raise ValueError(f"vpt.pixel.size {p} does not fit an input of {image_size} pixels")
    if pixel.placement == "border":
        inner = image_size - 2 * p
        return {
            "top": (3, p, image_size),
            "bottom": (3, p, image_size),
            "left": (3, inner, p),
            "right": (3, inner, p),
        }
    if pixel.placement == "corner":
        return {"corner": (3, p, p)}
    return {f"{region}_{grid}": (3, grid, grid) for region in pixel.regions for grid in pixel.grids}
