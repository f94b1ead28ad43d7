"""`dicomnode bench study`: receipt-to-SR latency of the whole node, against the engine alone.

A node runs in this process on the configured backbone and routing (quiet period 0, no
destinations, a temporary state folder). For each of N studies, one chest radiograph (a
synthetic 2048 x 2048 16-bit CR made here) is sent by C-STORE over the network; the latency
is from the store's acknowledgement to the study's results (SR and SC) being durable in the
outbox and the journal saying done: routing, decoding, preprocessing, inference, SR/SC
writing and fsync. The reference, in the same run, is the engine alone classifying one
already-prepared image: the ratio says how much of a study's time is not the model.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomnode.bench import BenchError, free_port, wait_for_port
from dicomnode.config import NodeConfig
from dicomnode.net.scu import Peer, store
from dicomnode.progress import progress

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def synthetic_cr(folder: Path, index: int, rng: np.random.Generator) -> Path:
    """A frontal chest CR of noise, 2048 x 2048 x 16 bit, as a study of its own."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CR_STORAGE
    ds.SOPClassUID = CR_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = f"BENCH^{index}", f"B{index}", "", ""
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20261125", "120000", "", "1"
    ds.ReferringPhysicianName, ds.SeriesNumber, ds.InstanceNumber = "", 1, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 2048
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = rng.integers(0, 4096, (2048, 2048), dtype=np.uint16).tobytes()
    path = folder / f"study{index:04d}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def bench_study(cfg: NodeConfig, count: int, report: Callable[[str], None]) -> dict:
    """Per-study latency from acknowledgement to durable results; returns the JSON document."""
    from dicomnode.node import Node
    from dicomnode.pipeline import prepare

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="dicomnode-bench-") as tmp:
        root = Path(tmp)
        (root / "in").mkdir()
        port = free_port()
        node_cfg = cfg.model_copy(
            update={
                "state_dir": root / "state",
                "destinations": (),
                # The bench's node must not take the port of a node serving on this host.
                "metrics": cfg.metrics.model_copy(update={"enabled": False}),
                "scp": cfg.scp.model_copy(update={"host": "127.0.0.1", "port": port, "min_free_mb": 0}),
                "studies": cfg.studies.model_copy(update={"quiet_period_s": 0.0, "poll_interval_s": 0.01}),
            }
        )
        node = Node(node_cfg)
        node.start()
        try:
            wait_for_port(port)
            device = node.engine.backbone.device
            report(
                f"study: {count} single-image CR studies into a node on {device} ({cfg.model.architecture})"
            )
            latencies = []
            # The first warms up decoding and the imaging processes.
            for index in progress(range(count + 1), description="studies", unit="study"):
                path = synthetic_cr(root / "in", index, rng)
                study_uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
                outcome = store(Peer("127.0.0.1", port, cfg.scp.ae_title, 60.0), [path])[0]
                acknowledged = time.perf_counter()
                if not outcome.ok:
                    raise BenchError(f"the node refused study {index}: {outcome.comment}")
                deadline = acknowledged + 120
                while True:
                    record = node.spool.study(study_uid)
                    if record is not None and record.state in ("done", "failed", "ignored"):
                        break
                    if time.perf_counter() > deadline:
                        raise BenchError(f"study {index} not processed after 120 s")
                    time.sleep(0.002)
                if record.state != "done":
                    raise BenchError(f"study {index} ended {record.state}: {record.reason}")
                if index:
                    latencies.append(time.perf_counter() - acknowledged)
            prompt_set = node.prompt_sets.get("cxr")
            sample = prepare("cxr", [path], node.engine.input_spec).samples
            engine_s = []
            for _ in range(count):
                started = time.perf_counter()
                node.engine.predict(prompt_set, sample)
                engine_s.append(time.perf_counter() - started)
        finally:
            node.stop()
    p50, p95 = (float(np.percentile(latencies, q)) for q in (50, 95))
    engine = statistics.median(engine_s)
    report(f"  receipt to SR: p50 {p50 * 1e3:8.1f} ms  p95 {p95 * 1e3:8.1f} ms")
    report(f"  engine alone (one prepared image): {engine * 1e3:8.1f} ms; p50 / engine = {p50 / engine:.1f}")
    return {
        "device": str(device),
        "architecture": cfg.model.architecture,
        "studies": count,
        "p50_ms": p50 * 1e3,
        "p95_ms": p95 * 1e3,
        "engine_ms": engine * 1e3,
    }
