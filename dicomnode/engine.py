"""Inference: Samples in, Predictions out, batched across studies near the device's limit.

The engine knows nothing of DICOM. Callers (the per-study pipeline, `infer`, `eval`) hand it
a prompt set and prepared samples; one worker per device (each CUDA GPU, else the CPU)
takes requests from a shared queue and gathers those of different studies and prompt sets
into one batch, up to `max_batch` images or `max_wait_s` after the first arrived. Sets that
leave the image tower untouched (zero-shot, linear probe, DPT without a vision prompt)
share one pass of the frozen tower; VPT sets run their own prompted pass.

On CUDA: a staging thread per device that stacks the next batch into pinned host memory and
copies it on a stream of its own while the previous batch computes, bf16 weights (or
autocast), `inference_mode`, the towers' served blocks (fused attention on viewed q/k/v, GELU
in the GEMM epilogue, patches embedded by one matrix product: `model.towers`), a warm-up pass
per prompt set at start-up. Each prompt-set version's classifier (its text features,
prompts, head) is built once per device, cached by the set's sha256, and evicted once no
study in flight uses it and it is no longer the version served.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from dicomnode.config import ModelConfig
from dicomnode.flow import InputSpec, ModelIdentity, Prediction, Sample
from dicomnode.health import Heartbeat
from dicomnode.model.backbone import Backbone, load_backbone
from dicomnode.model.classifier import (
    PromptedClassifier,
    build_classifier,
    encode_texts,
    zero_shot_features,
)
from dicomnode.model.promptset import PromptSet

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """A prompt set cannot run on this backbone; the message says which and why."""


@dataclass
class _Request:
    """Images of one study for one prompt set, and where their predictions go."""

    prompt_set: PromptSet
    samples: Sequence[Sample]
    future: Future


#: Put on the queue once per worker to stop it.
_STOP = object()


@dataclass
class _Staged:
    """A batch on its way through one device: requests grouped by the image pass they need."""

    batch: list[_Request]
    classifiers: list[PromptedClassifier]
    groups: list[list[int]]
    pixels: torch.Tensor
    copied: torch.cuda.Event | None = None
    probabilities: list[torch.Tensor] = dataclasses.field(default_factory=list)
    started: float = dataclasses.field(default_factory=time.perf_counter)


def devices_for(backbone: Backbone) -> list[torch.device]:
    """One inference device per CUDA GPU when the backbone is on CUDA, else the CPU."""
    if backbone.device.type == "cuda":
        return [torch.device("cuda", index) for index in range(torch.cuda.device_count())]
    return [backbone.device]


class _DeviceWorker(threading.Thread):
    """Runs batches on one device with its own replica of the frozen backbone.

    Two threads per device: a stager gathers the next batch and copies its pixels into a
    pinned buffer and on to the device on a stream of its own, while this thread queues the
    image passes and hands out the results. Stacking a batch of float32 images is host memory
    traffic (154 MB for 256 images at 224 px, 12-20 ms on a lent H100's host) that, done
    between batches by the thread that launches them, left the GPU idle for part of each batch
    (py-spy: 56% of this thread's samples); on its own thread it overlaps both the launches
    and the device. One staged batch waits at most, so a request never sits behind more than
    the batch in flight and the next.
    """

    #: Pinned buffers in rotation: one being filled, one staged and waiting, one in flight
    #: (on CUDA a buffer is refilled only once the event of its last copy has passed).
    BUFFERS = 3

    def __init__(self, engine: Engine, backbone: Backbone) -> None:
        super().__init__(name=f"inference-{backbone.device}", daemon=True)
        self.engine = engine
        self.backbone = backbone
        self.device = backbone.device
        self.cuda = backbone.device.type == "cuda"
        self._buffers: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []
        self._turn = 0
        self._copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._staged: queue.Queue = queue.Queue(maxsize=1)
        self.heartbeat = engine.heartbeats[self.device]
        self.stager = threading.Thread(target=self._stage_loop, name=f"staging-{self.device}", daemon=True)

    def run(self) -> None:
        if self.cuda:
            torch.cuda.set_device(self.device)
        self.stager.start()
        in_flight: _Staged | None = None
        while True:
            try:
                staged = self._staged.get(block=in_flight is None)
            except queue.Empty:  # nothing more staged: hand out what the device is finishing
                self._guard(in_flight.batch, self.finish, in_flight)
                in_flight = None
                continue
            launched = None if staged is _STOP else self._guard(staged.batch, self.launch, staged)
            # The next batch is queued on the device before this thread waits for the previous.
            if in_flight is not None:
                self._guard(in_flight.batch, self.finish, in_flight)
            in_flight = launched
            if staged is _STOP:
                return

    def _stage_loop(self) -> None:
        if self.cuda:
            torch.cuda.set_device(self.device)
        while True:
            batch = self.engine._next_batch(wait=True)
            if batch is None:
                self._staged.put(_STOP)
                return
            staged = self._guard(batch, self.stage, batch, beat=False)
            if staged is not None:
                self._staged.put(staged)

    def _guard(self, batch: list[_Request], step, argument, beat: bool = True):
        """Run one step; on failure every request of the batch learns why, and None is returned.

        Steps that wait on the device beat the device's heartbeat, so a hung GPU shows as stuck.
        """
        try:
            if not beat:
                return step(argument)
            with self.heartbeat.step():
                return step(argument)
        except Exception as exc:
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(exc)
            return None

    def _pinned(self, count: int) -> tuple[torch.Tensor, int]:
        """The next host buffer in turn, once the device has finished copying from it."""
        size = self.backbone.input_spec.image_size
        self._turn = (self._turn + 1) % self.BUFFERS
        while len(self._buffers) < self.BUFFERS:
            self._buffers.append((torch.empty(0), None))
        buffer, copied = self._buffers[self._turn]
        if copied is not None:
            copied.synchronize()
        if buffer.shape[0] < count:
            buffer = torch.empty((count, 3, size, size), dtype=torch.float32, pin_memory=self.cuda)
            self._buffers[self._turn] = (buffer, None)
        return buffer[:count], self._turn

    def stage(self, batch: list[_Request]) -> _Staged:
        """Group the requests by image pass and send their pixels to the device."""
        classifiers = [self.engine.classifier(r.prompt_set, self.device) for r in batch]
        by_vision: dict[str, list[int]] = {}
        for index, classifier in enumerate(classifiers):
            by_vision.setdefault(classifier.vision_key, []).append(index)
        groups = list(by_vision.values())
        samples = [s for group in groups for i in group for s in batch[i].samples]
        host, turn = self._pinned(len(samples))
        # One stack into the pinned buffer: torch copies in parallel, a row loop would not.
        torch.stack([torch.from_numpy(sample.pixels) for sample in samples], out=host)
        copied = None
        if self.cuda:
            # On a stream of its own, so the copy overlaps the batch the device is computing.
            with torch.cuda.stream(self._copy_stream):
                pixels = host.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self._copy_stream)
            self._buffers[turn] = (self._buffers[turn][0], copied)
        else:  # the CPU computes a batch as it is launched, before its buffer comes round again
            pixels = host
        self.engine.recent_batches.append((len(batch), len(samples), len(groups)))
        return _Staged(batch, classifiers, groups, pixels, copied)

    def launch(self, staged: _Staged) -> _Staged:
        """Queue the image passes and the per-set scoring on the device (no waiting here)."""
        max_batch = self.engine.max_batch
        if staged.copied is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(staged.copied)
            staged.pixels.record_stream(compute)
        staged.pixels = staged.pixels.to(self.backbone.input_dtype)
        start = 0
        by_request: dict[int, torch.Tensor] = {}
        with (
            torch.inference_mode(),
            torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.backbone.autocast),
        ):
            for group in staged.groups:
                count = sum(len(staged.batch[i].samples) for i in group)
                pixels = staged.pixels[start : start + count]
                start += count
                # Within a group every member's image pass is the same: use the first.
                encode = staged.classifiers[group[0]].image_features
                features = torch.cat([encode(pixels[s : s + max_batch]) for s in range(0, count, max_batch)])
                offset = 0
                for i in group:
                    size = len(staged.batch[i].samples)
                    scores = staged.classifiers[i].probabilities(features[offset : offset + size])
                    by_request[i] = scores.float()
                    offset += size
        staged.probabilities = [by_request[i] for i in range(len(staged.batch))]
        return staged

    def finish(self, staged: _Staged) -> None:
        """Wait for the device, then hand each request its predictions."""
        for request, rows in zip(staged.batch, staged.probabilities, strict=True):
            values = rows.cpu().tolist()
            request.future.set_result(
                [
                    Prediction(sample.sop_instance_uid, tuple(float(p) for p in row), sample.frame)
                    for sample, row in zip(request.samples, values, strict=True)
                ]
            )
        self.engine.observe_batch(len(staged.pixels), time.perf_counter() - staged.started)


class Engine:
    """Batched classification of samples with any served prompt set."""

    def __init__(
        self,
        backbone: Backbone,
        max_batch: int = 16,
        algorithm_name: str = "dicomnode",
        max_wait_s: float = 0.005,
        compile_model: bool = False,
    ) -> None:
        """`max_batch` images at most per image pass; a partial batch waits `max_wait_s` for more.

        `compile_model` runs every image pass through torch.compile (dynamic batch size, so
        one compilation serves every batch); the first batch of each set pays for it, which
        `prepare` does at start-up.
        """
        self.backbone = backbone
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.algorithm_name = algorithm_name
        self.compile_model = compile_model
        self._replicas = {backbone.device: backbone}
        for device in devices_for(backbone):
            if device not in self._replicas:
                self._replicas[device] = dataclasses.replace(
                    backbone, model=copy.deepcopy(backbone.model).to(device), device=device
                )
        self._classifiers: dict[tuple[str, torch.device], PromptedClassifier] = {}
        self._in_use: Counter[str] = Counter()
        self._served: set[str] | None = None
        self._lock = threading.RLock()
        self._queue: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        self._workers: list[_DeviceWorker] = []
        #: (requests, images, image passes) of the latest batches: what batching achieved.
        self.recent_batches: deque[tuple[int, int, int]] = deque(maxlen=1000)
        #: Each device worker's liveness, and who learns each batch's images and seconds (metrics).
        self.heartbeats = {device: Heartbeat(f"inference-{device}") for device in self._replicas}
        self.observe_batch: Callable[[int, float], None] = lambda images, seconds: None

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> Engine:
        """Load the configured backbone and build an engine with the configured batching."""
        return cls(
            load_backbone(cfg),
            max_batch=cfg.max_batch,
            max_wait_s=cfg.max_wait_ms / 1000,
            compile_model=cfg.compile,
        )

    @property
    def input_spec(self) -> InputSpec:
        """What imaging must produce for this backbone."""
        return self.backbone.input_spec

    @property
    def devices(self) -> list[torch.device]:
        """The devices inference runs on, one worker each."""
        return list(self._replicas)

    def identity(self, prompt_set: PromptSet) -> ModelIdentity:
        """Who produced a result: written into every SR and SC."""
        from dicomnode import __version__

        demo = self.backbone.demo
        name = f"{self.algorithm_name} {prompt_set.name} {prompt_set.method}"
        return ModelIdentity(
            algorithm_name=name + (" DEMO" if demo else ""),
            algorithm_version=f"{prompt_set.version}+node{__version__}",
            prompt_set=prompt_set.name,
            prompt_set_sha256=prompt_set.sha256,
            backbone=self.backbone.architecture,
            backbone_sha256=self.backbone.sha256,
            demo=demo,
            backbone_seed=None if self.backbone.sha256 else self.backbone.seed,
        )

    def _check_compatible(self, prompt_set: PromptSet) -> None:
        arch, sha, seed = (
            prompt_set.backbone_architecture,
            prompt_set.backbone_sha256,
            prompt_set.backbone_seed,
        )
        if arch is not None and arch != self.backbone.architecture:
            raise EngineError(
                f"prompt set {prompt_set.name} was made for {arch}, "
                f"the node runs {self.backbone.architecture}"
            )
        running = self.backbone.sha256 or f"random DEMO weights (seed {self.backbone.seed})"
        if sha is not None and sha != self.backbone.sha256:
            raise EngineError(
                f"prompt set {prompt_set.name} was trained on backbone sha256 {sha}, the node runs {running}"
            )
        if seed is not None and (self.backbone.sha256 is not None or seed != self.backbone.seed):
            raise EngineError(
                f"prompt set {prompt_set.name} was trained on random DEMO weights (seed {seed}), "
                f"the node runs {running}"
            )

    def _encode_texts(self, backbone: Backbone, texts: list[str]) -> torch.Tensor:
        return encode_texts(backbone, texts)

    def classifier(self, prompt_set: PromptSet, device: torch.device | None = None) -> PromptedClassifier:
        """The classifier of this prompt-set version on `device`, built once and cached."""
        device = device or self.backbone.device
        key = (prompt_set.sha256, device)
        with self._lock:
            cached = self._classifiers.get(key)
            if cached is not None:
                return cached
            self._check_compatible(prompt_set)
            backbone = self._replicas[device]
            with torch.inference_mode(False), torch.no_grad():
                zero_shot = zero_shot_features(backbone, prompt_set, encode=self._encode_texts)
                classifier = build_classifier(backbone, prompt_set, zero_shot=zero_shot)
                classifier.text_features()  # cached now, not on the first study
            if self.compile_model:
                classifier.image_features = torch.compile(classifier.image_features, dynamic=True)
            self._classifiers[key] = classifier
            log.info(
                "prompt set %s %s ready on %s: %s, %d classes, %d learned parameters",
                prompt_set.name,
                prompt_set.version,
                device,
                prompt_set.method,
                len(prompt_set.class_texts),
                classifier.trainable_parameters(),
            )
            return classifier

    def text_features(self, prompt_set: PromptSet) -> torch.Tensor:
        """(classes, 2 or 1, dim) text features of a prompt set, cached per sha256."""
        return self.classifier(prompt_set).text_features()

    def prepare(self, prompt_set: PromptSet) -> None:
        """Check and build a prompt set on every device and run one warm-up batch through it."""
        spec = self.input_spec
        warm = Sample(
            "warm-up", np.zeros((3, spec.image_size, spec.image_size), np.float32), np.zeros((1, 1), np.uint8)
        )
        for device in self.devices:
            self.classifier(prompt_set, device)
        self.predict(prompt_set, [warm])

    # -- serving ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start one worker per device (done on the first request if not before)."""
        with self._lock:
            if self._workers:
                return
            self._workers = [_DeviceWorker(self, replica) for replica in self._replicas.values()]
            for worker in self._workers:
                worker.start()

    def stop(self) -> None:
        """Let the workers finish what is queued, then stop them."""
        with self._lock:
            workers, self._workers = self._workers, []
        self._stopping.set()
        for _ in workers:
            self._queue.put(_STOP)
        for worker in workers:
            worker.join(timeout=60)
        self._stopping.clear()

    def _next_batch(self, wait: bool) -> list[_Request] | None:
        """The next batch: requests gathered until max_batch images or max_wait_s after the first.

        With `wait` False, None at once when nothing is queued. None also means: stop.
        """
        try:
            first = self._queue.get() if wait else self._queue.get_nowait()
        except queue.Empty:
            return None
        if first is _STOP:
            return None
        batch, images = [first], len(first.samples)
        deadline = time.monotonic() + self.max_wait_s
        while images < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                request = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if request is _STOP:  # leave it for this or another worker's next turn
                self._queue.put(_STOP)
                break
            batch.append(request)
            images += len(request.samples)
        return batch

    def submit(self, prompt_set: PromptSet, samples: Sequence[Sample]) -> Future:
        """Queue samples for inference; the future gives their predictions in order."""
        future: Future = Future()
        if not samples:
            future.set_result([])
            return future
        self.start()
        self._queue.put(_Request(prompt_set, list(samples), future))
        return future

    def predict(self, prompt_set: PromptSet, samples: Sequence[Sample]) -> list[Prediction]:
        """Per-class probabilities for each sample, in the order of the prompt set's classes.

        Multi-label: for each class, a two-way softmax between its positive and negative
        prompts (or the head's sigmoid). Multi-class: a softmax over the classes.
        """
        self.classifier(prompt_set)  # compatibility errors surface here, in the caller's thread
        with self.using(prompt_set):
            # A volume or a slide is queued a batch at a time: host and device buffers stay the
            # size of a batch, and other studies' images are batched in between.
            step = self.max_batch
            futures = [self.submit(prompt_set, samples[i : i + step]) for i in range(0, len(samples), step)]
            return [prediction for future in futures for prediction in future.result()]

    # -- versions --------------------------------------------------------------------------

    @contextmanager
    def using(self, prompt_set: PromptSet) -> Iterator[None]:
        """Keep this prompt-set version cached while a study runs on it, even across a reload."""
        with self._lock:
            self._in_use[prompt_set.sha256] += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_use[prompt_set.sha256] -= 1
                self._evict()

    def serve_only(self, served: set[str]) -> None:
        """Drop the cached classifiers of versions no longer served, once no study uses them."""
        with self._lock:
            self._served = set(served)
            self._evict()

    def _evict(self) -> None:
        if self._served is None:
            return
        for key in [k for k in self._classifiers if k[0] not in self._served and self._in_use[k[0]] <= 0]:
            del self._classifiers[key]
            log.info("prompt set version %s released", key[0][:12])

    def cached_versions(self) -> set[str]:
        """The sha256 of every prompt-set version with a cached classifier."""
        with self._lock:
            return {sha for sha, _ in self._classifiers}
