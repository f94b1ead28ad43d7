"""`dicomnode bench receive`: DCMTK's storescu sends the same instances, over one association,
once to DCMTK's storescp (the reference) and once to dicomnode's SCP with its spool (parse, fsync of file and
folder, journal commit per instance). Runs alternate so that disk and CPU drift hit both.
The ratio is what a PACS administrator feels: how much longer a study takes to reach us than
to reach a plain DICOM archive.
"""

from __future__ import annotations

import os
import shutil
import statistics
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomnode.bench import BenchError, free_port, wait_for_port
from dicomnode.config import ScpConfig
from dicomnode.net.scp import start_scp
from dicomnode.spool import Spool


@dataclass(frozen=True)
class ReceiveRun:
    """Wall-clock seconds of one storescu run against one receiver."""

    receiver: str
    seconds: float


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BenchError(f"{name} not found: install DCMTK (Debian package dcmtk)")
    return path


def make_instances(source: Path, count: int, folder: Path) -> list[Path]:
    """`count` copies of `source` as distinct instances of one new study, bytes otherwise equal."""
    try:
        ds = pydicom.dcmread(source)
    except (OSError, InvalidDicomError) as exc:
        raise BenchError(f"{source} is not a readable DICOM file: {exc}") from None
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    paths = []
    for index in range(count):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = index + 1
        path = folder / f"{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


#: Multi-frame Grayscale Word Secondary Capture Image Storage: frames of any size and number.
_MULTIFRAME_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"
_FRAME_SIDE = 1024


def write_large_instance(path: Path, megabytes: int) -> Path:
    """A multi-frame 16-bit instance of about `megabytes` MB (at least one frame of 2 MiB).

    Written a frame at a time after its header, so that a gigabyte never sits in memory; the
    frames differ from one another so that nothing along the way can compress them away.
    """
    frame_bytes = _FRAME_SIDE * _FRAME_SIDE * 2
    frames = max(1, megabytes * 10**6 // frame_bytes)
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = _MULTIFRAME_WORD_SC, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.ConversionType = "OT", "WSD"
    ds.PatientName, ds.PatientID, ds.StudyDate, ds.StudyTime = "", "", "", ""
    ds.Rows = ds.Columns = _FRAME_SIDE
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    ramp = np.arange(_FRAME_SIDE * _FRAME_SIDE, dtype=np.uint16)
    with path.open("ab") as handle:
        # (7FE0,0010) Pixel Data, explicit VR little endian: tag, "OW", 2 reserved, 4-byte length.
        handle.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, frames * frame_bytes))
        for frame in range(frames):
            handle.write((ramp + frame).tobytes())
    return path


def _send(port: int, ae_title: str, paths: list[Path]) -> float:
    command = [_tool("storescu"), "-aec", ae_title, "127.0.0.1", str(port), *map(str, paths)]
    started = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "TCP_NODELAY": "1"}, check=False
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0 or "Refused" in done.stderr or "Failed" in done.stderr:
        raise BenchError(f"storescu to port {port} failed: {done.stderr.strip()[-300:]}")
    return seconds


@contextmanager
def _storescp(folder: Path) -> Iterator[int]:
    port = free_port()
    folder.mkdir(parents=True)
    process = subprocess.Popen(
        [_tool("storescp"), "-aet", "STORESCP", "-od", str(folder), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def _dicomnode_scp(folder: Path) -> Iterator[int]:
    port = free_port()
    spool = Spool(folder, min_free_bytes=0)
    server = start_scp(spool, ScpConfig(host="127.0.0.1", port=port, ae_title="DICOMNODE", min_free_mb=0))
    try:
        wait_for_port(port)
        yield port
    finally:
        server.shutdown()
        spool.close()


def bench_receive(source: Path, count: int, rounds: int, report: Callable[[str], None]) -> float:
    """Median seconds of dicomnode over median seconds of storescp for `count` instances."""
    with tempfile.TemporaryDirectory(prefix="dicomnode-bench-") as tmp:
        root = Path(tmp)
        (root / "in").mkdir()
        paths = make_instances(source, count, root / "in")
        megabytes = sum(p.stat().st_size for p in paths) / 1e6
        report(f"receive: {count} instances of {source.name}, {megabytes:.1f} MB, {rounds} rounds each")
        runs: list[ReceiveRun] = []
        for round_number in range(rounds):
            target = root / f"round{round_number}"
            with _storescp(target / "storescp") as port:
                runs.append(ReceiveRun("storescp", _send(port, "STORESCP", paths)))
            with _dicomnode_scp(target / "dicomnode") as port:
                runs.append(ReceiveRun("dicomnode", _send(port, "DICOMNODE", paths)))
            shutil.rmtree(target)
        medians = {
            name: statistics.median(r.seconds for r in runs if r.receiver == name)
            for name in ("storescp", "dicomnode")
        }
        for name, seconds in medians.items():
            rate = f"{megabytes / seconds:8.1f} MB/s  {count / seconds:8.1f} instances/s"
            report(f"  {name:10s} {seconds:7.3f} s  {rate}")
        ratio = medians["dicomnode"] / medians["storescp"]
        report(f"  ratio dicomnode/storescp (time): {ratio:.2f}")
        return ratio
