"""Dual prompt tuning (after Biomed-DPT): learned text context plus a zero-initialised vision prompt.

Text: CoOp-style context tokens (shared by all classes, or one context per class) take the
place of the template words: [SOS][context...][class words .][EOS], run through the frozen
text tower and pooled at EOT. For multi-label sets a positive and a negative context are
learned. The learned text feature enters through a gate that starts at zero:

    t_c = normalise(z_c + gate * normalise(coop_c))

where z_c is the zero-shot feature of the set's own templates. An untrained set therefore
gives exactly the zero-shot probabilities, and learning moves away from them only as far as
the data asks (the templates and class descriptions stay the distillation teacher).

Vision: a shift of the class token before every block, initialised at zero, so that the
frozen tower is untouched until training re-weights where the class token attends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dicomnode.model.promptset import DptSpec
from dicomnode.model.towers import TextTower, VisionShape, encode_image

CONTEXT = "dpt.context"
GATE = "dpt.gate"
CLASS_SHIFT = "dpt.vision.class_shift"
#: Stands for one context token while tokenising; replaced by the learned embedding.
_PLACEHOLDER = "X"


class DualPrompts(nn.Module):
    """The learnable text context, gates and vision prompt of one DPT set."""

    def __init__(
        self, spec: DptSpec, shape: VisionShape, text_width: int, classes: int, polarities: tuple[str, ...]
    ) -> None:
        super().__init__()
        self.spec = spec
        self.polarities = polarities
        self.context = nn.ParameterDict()
        self.gate = nn.ParameterDict()
        leading = (classes,) if spec.class_specific else ()
        for polarity in polarities:
            # CoOp's init: normal, std 0.02.
            self.context[polarity] = nn.Parameter(
                torch.randn(*leading, spec.context_tokens, text_width) * 0.02
            )
            self.gate[polarity] = nn.Parameter(torch.zeros(()))
        self.class_shift: nn.Parameter | None = None
        if spec.vision_prompt:
            self.class_shift = nn.Parameter(torch.zeros(shape.layers, shape.width))

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors as stored in prompts.safetensors."""
        named: dict[str, torch.Tensor] = {}
        for polarity in self.polarities:
            named[f"{CONTEXT}.{polarity}"] = self.context[polarity]
            named[f"{GATE}.{polarity}"] = self.gate[polarity]
        if self.class_shift is not None:
            named[CLASS_SHIFT] = self.class_shift
        return named

    @property
    def changes_image_tower(self) -> bool:
        """Whether image features differ from the frozen tower's (a non-zero vision prompt)."""
        return self.class_shift is not None and bool(self.class_shift.detach().abs().max() > 0)

    def image_features(self, visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings with the class-token shift applied."""
        return encode_image(visual, pixels, class_shift=self.class_shift)

    def context_features(
        self, tower: TextTower, tokenizer, class_texts: tuple[str, ...], polarity: str, negation: str
    ) -> torch.Tensor:
        """(classes, dim) normalised text features of the learned context for each class.

        `negation` is put before the class words for the negative polarity ("no"), so the
        negative context starts from a prompt that already says the finding is absent.
        """
        count = self.spec.context_tokens
        words = [f"{negation} {text}".strip() for text in class_texts]
        tokens = tokenizer([" ".join([_PLACEHOLDER] * count) + f" {w}." for w in words])
        tokens = tokens.to(tower.token_embedding.weight.device)
        embedded = tower.token_embedding(tokens)
        context = self.context[polarity].to(embedded.dtype)
        if context.dim() == 2:
            context = context.expand(len(class_texts), -1, -1)
        embedded = torch.cat([embedded[:, :1], context, embedded[:, 1 + count :]], dim=1)
        return F.normalize(tower.encode_embedded(embedded, tokens).float(), dim=-1)

    def text_features(
        self, tower: TextTower, tokenizer, class_texts: tuple[str, ...], zero_shot: torch.Tensor
    ) -> torch.Tensor:
        """(classes, polarities, dim) gated text features; equal to `zero_shot` while the gates are 0."""
        parts = []
        for index, polarity in enumerate(self.polarities):
            learned = self.context_features(
                tower, tokenizer, class_texts, polarity, "no" if polarity == "negative" else ""
            )
            parts.append(F.normalize(zero_shot[:, index] + self.gate[polarity] * learned, dim=-1))
        return torch.stack(parts, dim=1)
