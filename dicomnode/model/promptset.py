"""Prompt sets: a folder with promptset.yaml (classes, codes, templates) and learned tensors.

A prompt set is data, not code: a new domain is a new folder. Its sha256 covers every file
that defines it, goes into every result, and seeds the result UIDs, so re-processing with
the same prompt set replaces earlier results and a changed prompt set makes new ones.

The hash is taken from the very bytes that are parsed: each file is read once, so a copy in
progress can never give a set whose hash names one version and whose tensors are another.
Methods: `zeroshot` (templates only), `linear-probe` (a linear head on the frozen image
embedding), `vpt` (visual prompts and a head) and `dpt` (learned text context and a
zero-initialised vision prompt); their shapes live in the `vpt`/`dpt` sections and their
learned tensors in prompts.safetensors.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors

from dicomnode.config import ConfigError, parse_validated, read_bytes
from dicomnode.flow import AGGREGATIONS, Aggregation, Code, Finding
from dicomnode.imaging import DOMAINS

PROMPTSET_FILE = "promptset.yaml"
TENSORS_FILE = "prompts.safetensors"
METHODS = ("zeroshot", "linear-probe", "vpt", "dpt")
#: Methods whose prompt set carries learned tensors fitted to one backbone's weights.
LEARNED_METHODS = ("linear-probe", "vpt", "dpt")


class PromptSetError(ValueError):
    """A prompt set folder is missing, invalid or unusable; the message names file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Code(_Strict):
    value: str = Field(min_length=1, max_length=64)
    scheme: str = Field(min_length=1, max_length=16)
    meaning: str = Field(min_length=1, max_length=64)


class _Class(_Strict):
    name: str = Field(min_length=1, max_length=64)
    text: str = Field(min_length=1)
    code: _Code
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    descriptions: tuple[str, ...] = ()


class _Templates(_Strict):
    positive: tuple[str, ...] = Field(min_length=1)
    negative: tuple[str, ...] = ()

    @field_validator("positive", "negative")
    @classmethod
    def _has_slot(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for template in value:
            if "{finding}" not in template:
                raise ValueError(f"template {template!r} has no {{finding}} slot")
        return value


class _BackboneRef(_Strict):
    architecture: str
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    # A set learned on the seeded random DEMO weights names the seed instead of a sha256.
    seed: int | None = None

    @model_validator(mode="after")
    def _one_identity(self) -> _BackboneRef:
        if self.sha256 is not None and self.seed is not None:
            raise ValueError("give either sha256 (a checkpoint) or seed (DEMO weights), not both")
        return self


class PixelPrompts(_Strict):
    """Learnable pixels added to the normalised image (VPT's input adaptation).

    `border`: four pads of `size` pixels around the image; `corner`: one `size` x `size`
    patch at the top left; `regions`: for each named box (fractions x0, y0, x1, y1 of the
    image, e.g. both lung fields) one learnable grid per entry of `grids`, resized to the
    box and summed, so coarse and fine scales are learned together.
    """

    placement: Literal["border", "corner", "regions"]
    size: int = Field(default=32, ge=1, le=512)
    regions: dict[str, tuple[float, float, float, float]] = Field(default_factory=dict)
    grids: tuple[int, ...] = Field(default=(32,), min_length=1)

    @model_validator(mode="after")
    def _regions_fit(self) -> PixelPrompts:
        if self.placement == "regions" and not self.regions:
            raise ValueError("placement 'regions' needs at least one box in regions")
        if self.placement != "regions" and self.regions:
            raise ValueError(f"regions are only used with placement 'regions', not {self.placement!r}")
        for name, (x0, y0, x1, y1) in self.regions.items():
            if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
                raise ValueError(f"region {name!r}: need 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
        if any(g < 1 for g in self.grids):
            raise ValueError("grids must be positive")
        return self


class TokenPrompts(_Strict):
    """Learnable tokens after the class token: once (shallow) or before every block (deep)."""

    count: int = Field(ge=1, le=256)
    depth: Literal["shallow", "deep"] = "shallow"


class VptSpec(_Strict):
    """Visual prompt tuning: pixel prompts and/or token prompts, then a linear head."""

    pixel: PixelPrompts | None = None
    tokens: TokenPrompts | None = None

    @model_validator(mode="after")
    def _some_prompt(self) -> VptSpec:
        if self.pixel is None and self.tokens is None:
            raise ValueError("a vpt set needs pixel prompts, token prompts or both")
        return self


class DptSpec(_Strict):
    """Dual prompt tuning: CoOp-style learned text context plus a zero-initialised vision prompt."""

    context_tokens: int = Field(default=16, ge=1, le=64)
    class_specific: bool = False
    vision_prompt: bool = True


class _Aggregate(_Strict):
    """How a study's samples (images, B-scans, tiles) make one probability per finding."""

    method: Literal[AGGREGATIONS] = "max"  # type: ignore[valid-type]
    k: int = Field(default=1, ge=1, le=4096)

    @model_validator(mode="after")
    def _k_for_top_k(self) -> _Aggregate:
        if self.k != 1 and self.method != "top-k":
            raise ValueError(f"k is only used with method 'top-k', not {self.method!r}")
        return self


class _PromptSetFile(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    version: str = Field(min_length=1, max_length=16)
    description: str = ""
    domain: Literal["cxr", "oct", "pathology"]
    procedure: _Code
    method: Literal["zeroshot", "linear-probe", "vpt", "dpt"]
    task: Literal["multi-label", "multi-class"]
    templates: _Templates
    classes: tuple[_Class, ...] = Field(min_length=1)
    backbone: _BackboneRef | None = None
    vpt: VptSpec | None = None
    dpt: DptSpec | None = None
    aggregate: _Aggregate = _Aggregate()
    # Options of the domain's imaging (oct: max_frames; pathology: magnification, tiles...).
    imaging: dict[str, int | float | str | bool] = Field(default_factory=dict)


@dataclass(frozen=True)
class PromptSet:
    """A validated prompt set, ready for the engine and the results writers."""

    name: str
    version: str
    domain: str
    method: str
    task: str
    positive_templates: tuple[str, ...]
    negative_templates: tuple[str, ...]
    class_texts: tuple[str, ...]
    findings: tuple[Finding, ...]
    procedure: Code
    backbone_architecture: str | None
    backbone_sha256: str | None
    sha256: str
    folder: Path
    backbone_seed: int | None = None
    vpt: VptSpec | None = None
    dpt: DptSpec | None = None
    class_descriptions: tuple[tuple[str, ...], ...] = ()
    aggregation: Aggregation = Aggregation()
    imaging: dict[str, int | float | str | bool] = field(default_factory=dict, compare=False)
    #: The learned tensors, exactly as hashed; empty for zero-shot sets.
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)


def _hash(files: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in (PROMPTSET_FILE, TENSORS_FILE):
        if name in files:
            digest.update(name.encode())
            digest.update(files[name])
    return digest.hexdigest()


def _read_files(folder: Path) -> dict[str, bytes]:
    files = {}
    try:
        files[PROMPTSET_FILE] = read_bytes(folder / PROMPTSET_FILE, "prompt set")
    except ConfigError as exc:
        raise PromptSetError(str(exc)) from None
    tensors = folder / TENSORS_FILE
    try:
        files[TENSORS_FILE] = tensors.read_bytes()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise PromptSetError(f"{tensors}: cannot read learned prompts: {exc.strerror}") from exc
    return files


def _check_method(path: Path, spec: _PromptSetFile) -> None:
    """A learned method needs its own section and the identity of the backbone it learned on."""
    for section in ("vpt", "dpt"):
        if getattr(spec, section) is not None and spec.method != section:
            raise PromptSetError(f"{path}: {section}: given, but method is {spec.method!r}")
    if spec.method in ("vpt", "dpt") and getattr(spec, spec.method) is None:
        raise PromptSetError(f"{path}: {spec.method}: method {spec.method!r} needs this section")
    if spec.method in LEARNED_METHODS and (
        spec.backbone is None or (spec.backbone.sha256 is None and spec.backbone.seed is None)
    ):
        raise PromptSetError(
            f"{path}: backbone: method {spec.method!r} is learned on one backbone; give its "
            "architecture and sha256 (or seed, for DEMO weights)"
        )


def _check_imaging(path: Path, spec: _PromptSetFile) -> None:
    """Imaging options must be ones the domain reads: a typo must not be ignored silently."""
    known = DOMAINS[spec.domain].options if spec.domain in DOMAINS else None
    if known is None:
        return  # a domain without imaging here fails its studies with that reason
    for key in spec.imaging:
        if key not in known:
            raise PromptSetError(
                f"{path}: imaging.{key}: not an option of domain {spec.domain!r} (known: {sorted(known)})"
            )


def folder_sha256(folder: Path) -> str:
    """sha256 over the files that define a prompt set, names included, in a fixed order."""
    return _hash(_read_files(Path(folder)))


def load_prompt_set(folder: Path, *, require_tensors: bool = True) -> PromptSet:
    """Read and validate a prompt set folder; its hash covers exactly the bytes parsed.

    `require_tensors=False` reads a learned set that has no tensors yet: what training
    starts from.
    """
    folder = Path(folder)
    path = folder / PROMPTSET_FILE
    files = _read_files(folder)
    spec = parse_validated(path, files[PROMPTSET_FILE], _PromptSetFile, PromptSetError)
    # prompts/<name>/promptset.yaml, or a learned version in prompts/<name>/<version>/.
    if spec.name not in (folder.name, folder.parent.name):
        raise PromptSetError(f"{path}: name: {spec.name!r} differs from its folder {folder.name!r}")
    _check_method(path, spec)
    _check_imaging(path, spec)
    tensors: dict[str, torch.Tensor] = {}
    if TENSORS_FILE in files:
        try:
            tensors = load_tensors(files[TENSORS_FILE])
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise PromptSetError(f"{folder / TENSORS_FILE}: not a readable safetensors file: {exc}") from None
    if spec.method in LEARNED_METHODS and not tensors and require_tensors:
        raise PromptSetError(f"{folder / TENSORS_FILE}: method {spec.method!r} needs its learned tensors")
    if spec.task == "multi-label" and not spec.templates.negative:
        raise PromptSetError(f"{path}: templates.negative: a multi-label set needs negative templates")
    return PromptSet(
        name=spec.name,
        version=spec.version,
        domain=spec.domain,
        method=spec.method,
        task=spec.task,
        positive_templates=spec.templates.positive,
        negative_templates=spec.templates.negative,
        class_texts=tuple(c.text for c in spec.classes),
        findings=tuple(
            Finding(
                name=c.name,
                code=Code(c.code.value, c.code.scheme, c.code.meaning),
                threshold=c.threshold,
            )
            for c in spec.classes
        ),
        procedure=Code(spec.procedure.value, spec.procedure.scheme, spec.procedure.meaning),
        backbone_architecture=spec.backbone.architecture if spec.backbone else None,
        backbone_sha256=spec.backbone.sha256 if spec.backbone else None,
        sha256=_hash(files),
        folder=folder,
        backbone_seed=spec.backbone.seed if spec.backbone else None,
        vpt=spec.vpt,
        dpt=spec.dpt,
        class_descriptions=tuple(c.descriptions for c in spec.classes),
        aggregation=Aggregation(spec.aggregate.method, spec.aggregate.k),
        imaging=dict(spec.imaging),
        tensors=tensors,
    )
