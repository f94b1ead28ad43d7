"""Prompt sets: a folder with promptset.yaml (classes, codes, templates) and learned tensors.

A prompt set is data, not code: a new domain is a new folder. Its sha256 covers every file
that defines it, goes into every result, and seeds the result UIDs, so re-processing with
the same prompt set replaces earlier results and a changed prompt set makes new ones.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dicomnode.config import read_validated
from dicomnode.flow import Code, Finding

PROMPTSET_FILE = "promptset.yaml"
TENSORS_FILE = "prompts.safetensors"
SUPPORTED_METHODS = ("zeroshot",)


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
    sha256: str | None = None


class _PromptSetFile(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    version: str = Field(min_length=1, max_length=16)
    description: str = ""
    domain: Literal["cxr"]
    procedure: _Code
    method: Literal["zeroshot", "vpt", "dpt"]
    task: Literal["multi-label", "multi-class"]
    templates: _Templates
    classes: tuple[_Class, ...] = Field(min_length=1)
    backbone: _BackboneRef | None = None


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


def folder_sha256(folder: Path) -> str:
    """sha256 over the files that define a prompt set, names included, in a fixed order."""
    digest = hashlib.sha256()
    for name in (PROMPTSET_FILE, TENSORS_FILE):
        path = folder / name
        if path.is_file():
            digest.update(name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def load_prompt_set(folder: Path) -> PromptSet:
    """Read and validate `folder/promptset.yaml`; refuses methods this version cannot run."""
    path = Path(folder) / PROMPTSET_FILE
    spec = read_validated(path, _PromptSetFile, PromptSetError, what="prompt set")
    if spec.name != Path(folder).name:
        raise PromptSetError(f"{path}: name: {spec.name!r} differs from its folder {Path(folder).name!r}")
    if spec.method not in SUPPORTED_METHODS:
        raise PromptSetError(
            f"{path}: method: {spec.method!r} cannot be served by this version "
            f"(supported: {', '.join(SUPPORTED_METHODS)})"
        )
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
        sha256=folder_sha256(Path(folder)),
        folder=Path(folder),
    )
