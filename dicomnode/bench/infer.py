"""`dicomnode bench infer`: each prompting method against the bare backbone, same device, same run.

For every batch size the bare image tower (open_clip's `encode_image`) is timed first, then
the node's own pass through the same frozen tower without prompts (`tower`: the fused blocks
of serving, see `towers.serve_block`), then each method
as the engine runs it (image features with the method's prompts, then its logits), on the
same device-resident batch. A last row times the whole engine path for zero-shot: host
samples through the queue, pinned copy, batch and back, with four requests in flight as
concurrent studies would keep it. The ratio to the bare backbone is
the cost of the method; the fraction of the device's limit compares the FLOP rate reached
with a large bf16 matrix product measured in the same run.

Prompt sets are made here, for the backbone in use, with seeded random prompts: the speed of
a method does not depend on what it learned. Nothing here is a clinical figure.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from dicomnode.engine import Engine
from dicomnode.flow import Sample
from dicomnode.model.backbone import Backbone
from dicomnode.model.classifier import PromptedClassifier, build_classifier, save_prompts
from dicomnode.model.promptset import LEARNED_METHODS, PROMPTSET_FILE, load_prompt_set
from dicomnode.model.towers import encode_image, vision_shape
from dicomnode.model.vpt import CHEST_DEFAULT

#: The methods measured, with the prompt-set sections that define them. vpt-deep is the
#: default chest set of METHODS.md (both lung fields at two scales, deep token prompts).
METHODS: dict[str, tuple[str, dict | None]] = {
    "zeroshot": ("zeroshot", None),
    "linear-probe": ("linear-probe", None),
    "vpt-shallow": ("vpt", {"tokens": {"count": 8, "depth": "shallow"}}),
    "vpt-deep": ("vpt", CHEST_DEFAULT),
    "dpt": ("dpt", {"context_tokens": 16, "class_specific": False, "vision_prompt": True}),
}
ALL_METHODS = ("backbone", "tower", *METHODS, "engine-zeroshot")
#: Requests the engine row keeps in flight, as concurrent studies would.
ENGINE_IN_FLIGHT = 4


@dataclass(frozen=True)
class InferResult:
    """Throughput and per-batch latency of one method at one batch size."""

    method: str
    batch: int
    images_per_s: float
    p50_ms: float
    p95_ms: float
    ratio_to_backbone: float | None
    learned_parameters: int


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(run: Callable[[], object], device: torch.device, iterations: int, warmup: int) -> list[float]:
    """Seconds per call, each call synchronised so latencies are real."""
    for _ in range(warmup):
        run()
    _synchronise(device)
    seconds = []
    for _ in range(iterations):
        started = time.perf_counter()
        run()
        _synchronise(device)
        seconds.append(time.perf_counter() - started)
    return seconds


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def make_prompt_sets(backbone: Backbone, folder: Path, template: Path, seed: int = 0) -> dict[str, Path]:
    """One prompt set per method for `backbone`, with the classes of the shipped set `template`."""
    base = yaml.safe_load((template / PROMPTSET_FILE).read_text())
    identity = {"architecture": backbone.architecture}
    identity.update({"sha256": backbone.sha256} if backbone.sha256 else {"seed": backbone.seed})
    folders = {}
    for name, (method, section) in METHODS.items():
        content = {**base, "name": name, "method": method}
        learned = method in LEARNED_METHODS
        if section is not None:
            content[method] = section
        if learned:
            content["backbone"] = identity
        target = folder / name
        target.mkdir(parents=True)
        (target / PROMPTSET_FILE).write_text(yaml.safe_dump(content, sort_keys=False))
        if learned:
            classifier = build_classifier(
                backbone, load_prompt_set(target, require_tensors=False), initialise=True
            )
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for tensor in classifier.named_tensors().values():
                    tensor.add_(0.02 * torch.randn(tensor.shape, generator=generator).to(tensor.device))
            save_prompts(classifier, target)
        folders[name] = target
    return folders


def flops_per_image(backbone: Backbone, extra_tokens: int = 0) -> float:
    """Forward FLOPs of the ViT image tower for one image (matrix products and attention)."""
    shape = vision_shape(backbone.model)
    patch = backbone.model.visual.patch_size[0]
    tokens = (shape.image_size // patch) ** 2 + 1 + extra_tokens
    width, layers = shape.width, shape.layers
    per_layer = 24 * width * width * tokens + 4 * tokens * tokens * width
    embed = 2 * (tokens - 1 - extra_tokens) * 3 * patch * patch * width
    return float(layers * per_layer + embed + 2 * width * shape.output_dim)


def matmul_peak(device: torch.device) -> float | None:
    """FLOP/s of a large bf16 matrix product on a CUDA device: the limit to compare with."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = time_calls(lambda: a @ b, device, iterations=10, warmup=3)
    return 2 * n**3 / statistics.median(seconds)


def served_deviation(backbone: Backbone, classifier: PromptedClassifier, count: int = 64) -> float:
    """Largest difference of a probability between the served image tower and open_clip's
    `encode_image`, same device and precision, on `count` seeded random images."""
    size = backbone.input_spec.image_size
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(count, 3, size, size, generator=generator)
    pixels = pixels.to(backbone.device, backbone.input_dtype)
    with torch.inference_mode(), backbone_autocast(backbone):
        reference = F.normalize(backbone.model.encode_image(pixels).float(), dim=-1)
        served = classifier.image_features(pixels)
        difference = classifier.probabilities(served) - classifier.probabilities(reference)
    return float(difference.abs().max())


def backbone_autocast(backbone: Backbone):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=backbone.autocast)


def bench_infer(
    backbone: Backbone,
    template: Path,
    batches: Sequence[int],
    methods: Sequence[str],
    iterations: int,
    report: Callable[[str], None],
    compile_model: bool = False,
) -> dict:
    """Measure every method at every batch size; returns the JSON document of the figures."""
    device = backbone.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    weights = " (DEMO weights)" if backbone.demo else ""
    precision = f", {backbone.precision}" if device.type == "cuda" else ""
    report(f"infer: {backbone.architecture} on {name}{weights}{precision}")
    peak = matmul_peak(device)
    if peak:
        report(f"  bf16 matrix product limit measured now: {peak / 1e12:.0f} TFLOP/s")
    results: list[InferResult] = []
    with tempfile.TemporaryDirectory(prefix="dicomnode-bench-") as tmp:
        folders = make_prompt_sets(backbone, Path(tmp), template)
        classifiers: dict[str, PromptedClassifier] = {
            m: build_classifier(backbone, load_prompt_set(folders[m])) for m in METHODS if m in methods
        }
        engine = (
            Engine(backbone, max_batch=max(batches), max_wait_s=0.002)
            if "engine-zeroshot" in methods
            else None
        )
        size = backbone.input_spec.image_size
        deviation = None
        if "zeroshot" in classifiers:
            deviation = served_deviation(backbone, classifiers["zeroshot"])
            report(f"  served tower vs open_clip encode_image: probabilities differ by <= {deviation:.4f}")
        for batch in batches:
            pixels = torch.randn(batch, 3, size, size, device=device).to(backbone.input_dtype)
            baseline: float | None = None
            for method in [m for m in ALL_METHODS if m in methods]:
                extra_tokens = 0
                if method == "backbone":
                    forward = backbone.model.encode_image
                    learned = 0
                elif method == "tower":
                    forward = partial(encode_image, backbone.model.visual)
                    learned = 0
                elif method == "engine-zeroshot":
                    host = pixels.float().cpu().numpy()
                    samples = [Sample(str(i), host[i], np.zeros((1, 1), np.uint8)) for i in range(batch)]
                    prompt_set = load_prompt_set(folders["zeroshot"])
                    engine.max_batch = batch
                    engine.prepare(prompt_set)

                    def forward(_, samples=samples, prompt_set=prompt_set):
                        futures = [engine.submit(prompt_set, samples) for _ in range(ENGINE_IN_FLIGHT)]
                        return [future.result() for future in futures]

                    learned = 0
                else:
                    classifier = classifiers[method]
                    forward = classifier
                    learned = classifier.trainable_parameters()
                    prompts = classifier.visual_prompts
                    extra_tokens = prompts.tokens.shape[1] if prompts and prompts.tokens is not None else 0
                if compile_model and method != "engine-zeroshot":
                    forward = torch.compile(forward)

                def run(forward=forward, pixels=pixels):
                    with torch.inference_mode(), backbone_autocast(backbone):
                        return forward(pixels)

                warmup = 3 if device.type == "cuda" else 2
                seconds = time_calls(run, device, iterations, warmup)
                images = batch * (ENGINE_IN_FLIGHT if method == "engine-zeroshot" else 1)
                rate = images * len(seconds) / sum(seconds)
                if method == "backbone":
                    baseline = rate
                results.append(
                    InferResult(
                        method=method,
                        batch=batch,
                        images_per_s=rate,
                        p50_ms=_percentile(seconds, 50) * 1e3,
                        p95_ms=_percentile(seconds, 95) * 1e3,
                        ratio_to_backbone=rate / baseline if baseline else None,
                        learned_parameters=learned,
                    )
                )
                flops = flops_per_image(backbone, extra_tokens) if method != "engine-zeroshot" else None
                _report_row(report, results[-1], peak, flops)
        if engine is not None:
            engine.stop()
    return {
        "device": name,
        "architecture": backbone.architecture,
        "demo_weights": backbone.demo,
        "matmul_tflops": peak / 1e12 if peak else None,
        "compiled": compile_model,
        "precision": backbone.precision if device.type == "cuda" else "fp32",
        "engine_requests_in_flight": ENGINE_IN_FLIGHT,
        "served_tower_max_probability_difference": deviation,
        "results": [asdict(r) for r in results],
    }


def _report_row(
    report: Callable[[str], None], row: InferResult, peak: float | None, flops: float | None
) -> None:
    ratio = f"{row.ratio_to_backbone:5.2f}x backbone" if row.ratio_to_backbone else ""
    limit = f"  {row.images_per_s * flops / peak:5.1%} of limit" if peak and flops else ""
    report(
        f"  {row.method:16s} batch {row.batch:5d}  {row.images_per_s:10.1f} img/s  "
        f"p50 {row.p50_ms:8.2f} ms  p95 {row.p95_ms:8.2f} ms  {ratio}{limit}"
    )
