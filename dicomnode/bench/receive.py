"""`dicomnode bench receive`: DCMTK's storescu sends the same instances (over one association,
several at once, or one each) once to DCMTK's storescp (the reference) and once to dicomnode's
SCP with its spool (parse, fsync of file and folder, journal commit per instance). Runs
alternate so that disk and CPU drift hit both. The ratio is what a PACS administrator feels:
how much longer a study takes to reach us than to reach a plain DICOM archive.
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomnode.bench import BenchError, free_port, wait_for_port
from dicomnode.config import NodeConfig, ScpConfig
from dicomnode.net.receivers import Receivers, ReceiverSetup
from dicomnode.net.scp import start_scp
from dicomnode.progress import progress
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


def _send(port: int, ae_title: str, paths: list[Path]) -> subprocess.Popen:
    """Start storescu sending `paths` over one association, as its users run it."""
    command = [_tool("storescu"), "-aec", ae_title, "127.0.0.1", str(port), *map(str, paths)]
    return subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TCP_NODELAY": "1"},
    )


def _send_all(port: int, ae_title: str, paths: list[Path], associations: int, each: bool = False) -> float:
    """Seconds for `associations` storescu processes, started together, to send `paths` between
    them; `each`: for one storescu after another to send one instance each."""
    if each:
        return sum(_send_all(port, ae_title, [path], 1) for path in paths)
    started = time.perf_counter()
    senders = [_send(port, ae_title, paths[i::associations]) for i in range(associations)]
    errors = [sender.communicate()[1] for sender in senders]
    seconds = time.perf_counter() - started
    for sender, stderr in zip(senders, errors, strict=True):
        if sender.returncode != 0 or "Refused" in stderr or "Failed" in stderr:
            said = stderr.strip()[-300:] or "nothing on stderr"
            raise BenchError(f"storescu to port {port} failed (exit status {sender.returncode}): {said}")
    return seconds


@contextmanager
def _storescp(folder: Path, fork: bool) -> Iterator[int]:
    """DCMTK's storescp as its users run it: TCP_NODELAY=1, --fork for concurrent senders.

    Without TCP_NODELAY storescp's small responses wait on Nagle's algorithm and it looks
    many times slower than it is.
    """
    port = free_port()
    folder.mkdir(parents=True)
    process = subprocess.Popen(
        [_tool("storescp"), *(["--fork"] if fork else []), "-aet", "STORESCP", "-od", str(folder), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    try:
        wait_for_port(port)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def _logging_as_serve(folder: Path) -> Iterator[None]:
    """serve's logging at its default level, into `folder/logs`, with what serve writes to stderr
    (journald's, under systemd) going to `folder/stderr.log`: the node in the bench writes the
    lines that serve writes, the audit's included. This process's logging is restored after."""
    from dicomnode.node import configure_logging  # torch and the model's imports: bench_receive's

    loggers = (logging.getLogger(), logging.getLogger("dicomnode.audit"))
    kept = [list(logger.handlers) for logger in loggers]
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "stderr.log").open("w") as stream:
        configure_logging(folder, NodeConfig.model_fields["log_level"].default, stream=stream)
        try:
            yield
        finally:
            for logger, handlers in zip(loggers, kept, strict=True):
                for handler in logger.handlers:
                    if handler not in handlers:
                        handler.close()
                logger.handlers[:] = handlers


@contextmanager
def _dicomnode_scp(folder: Path, receivers: int = 1) -> Iterator[int]:
    """The node's SCP and spool, and `receivers - 1` receiving processes beside it (as `serve`
    runs them with `scp.receivers`), logging as serve logs, listening until the block ends."""
    with _logging_as_serve(folder), _dicomnode_listening(folder, receivers) as port:
        yield port


@contextmanager
def _dicomnode_listening(folder: Path, receivers: int) -> Iterator[int]:
    """The node's SCP (and its other receiving processes) on a free port, as serve runs them;
    whatever started is stopped again, also when a later part cannot start."""
    port = free_port()
    scp = ScpConfig(
        host="127.0.0.1",
        port=port,
        ae_title="DICOMNODE",
        min_free_mb=0,
        receivers=receivers,
        max_associations=100,
    )
    with ExitStack() as started:
        spool = Spool(folder, min_free_bytes=0)
        started.callback(spool.close)
        spool.start_settling()  # as serve's
        started.callback(spool.stop_settling)
        others = Receivers(ReceiverSetup(scp, folder, count=False), receivers - 1) if receivers > 1 else None
        if others is not None:
            started.callback(others.stop)
        server = start_scp(spool, scp, share=others and others.share)
        started.callback(server.server_close)
        started.callback(server.shutdown)
        if others is not None:
            others.start()
        wait_for_port(port)
        yield port


@dataclass(frozen=True)
class Scenario:
    """What storescu sends: `count` copies of `source`, over `associations` at once; with
    `association_each`, every copy over an association of its own, one after another, as a PACS
    sends that forwards each instance as it stores it (Orthanc's usual routing)."""

    name: str
    source: Path
    count: int
    associations: int = 1
    association_each: bool = False


def standard_scenarios(
    count: int | None = None, slice_file: Path | None = None, radiograph: Path | None = None
) -> list[Scenario]:
    """The issue's three: 500 CT slices of 39 KB, 40 radiographs of 7.2 MB, and the slices over 4
    associations at once; and 100 slices, each on an association of its own. The slice and the
    radiograph are pydicom's test files CT_small.dcm and RG1_UNCR.dcm unless given (a node
    installed without the test extras has not got them)."""
    from pydicom.data import get_testdata_file

    missing = []
    for name, given in (("CT_small.dcm", slice_file), ("RG1_UNCR.dcm", radiograph)):
        if given is None and get_testdata_file(name, download=False) is None:
            missing.append(name)
    if missing:
        raise BenchError(
            f"{' and '.join(missing)} not found (pydicom's test files, package pydicom-data): "
            "give a slice and a radiograph of your own (--slice, --radiograph)"
        )
    ct = slice_file or Path(get_testdata_file("CT_small.dcm", download=False))
    cr = radiograph or Path(get_testdata_file("RG1_UNCR.dcm", download=False))
    return [
        Scenario("small", ct, count or 500),
        Scenario("large", cr, count or 40),
        Scenario("concurrent", ct, count or 500, associations=4),
        Scenario("per-instance", ct, count or 100, association_each=True),
    ]


def bench_receive(
    scenarios: list[Scenario],
    rounds: int,
    report: Callable[[str], None],
    receivers: Sequence[int] = (1,),
) -> dict[tuple[str, int], float]:
    """Speed of dicomnode relative to storescp (storescp's median time over dicomnode's), per
    scenario and per count of receiving processes: each round sends to storescp, then to
    dicomnode receiving in each of `receivers` processes in turn, so that every count is
    measured against the same reference in the same run.

    The node's SCP runs in this process, which first takes the shape of `serve`'s: what serve
    imports (torch, open_clip, highdicom) loaded, and the heap settled as serve settles it; it
    logs as serve logs (see _logging_as_serve).
    """
    from dicomnode.node import settle_heap

    for scenario in scenarios:  # before any is run
        if scenario.count < scenario.associations:
            raise BenchError(
                f"{scenario.name}: {scenario.count} instances cannot go over "
                f"{scenario.associations} associations; --count at least {scenario.associations}"
            )
    settle_heap()
    receivers = list(dict.fromkeys(receivers))
    speeds = {}
    with tempfile.TemporaryDirectory(prefix="dicomnode-bench-") as tmp:
        for scenario in scenarios:
            folder = Path(tmp) / scenario.name
            for count, speed in _bench_scenario(scenario, rounds, folder, report, receivers).items():
                speeds[scenario.name, count] = speed
    return speeds


def _bench_scenario(
    scenario: Scenario,
    rounds: int,
    root: Path,
    report: Callable[[str], None],
    receivers: Sequence[int] = (1,),
) -> dict[int, float]:
    root.mkdir(parents=True)
    _check_space(root, _space_needed(scenario, rounds, len(receivers)), scenario.name)
    (root / "in").mkdir()
    paths = make_instances(scenario.source, scenario.count, root / "in")
    megabytes = sum(p.stat().st_size for p in paths) / 1e6
    processes = ", ".join(str(count) for count in receivers)
    each = scenario.association_each
    associations = "one association each" if each else f"{scenario.associations} association(s)"
    report(
        f"receive {scenario.name}: {scenario.count} instances of {scenario.source.name}, "
        f"{megabytes:.1f} MB, {associations}, {rounds} rounds each, "
        f"dicomnode in {processes} receiving process(es)"
    )
    names = {count: "dicomnode" if len(receivers) == 1 else f"dicomnode x{count}" for count in receivers}
    runs: list[ReceiveRun] = []
    concurrent = scenario.associations > 1
    # Neither receiver inherits the other's disk work. What storescp wrote without syncing is
    # flushed before the next run starts (untimed), or its write-back would run during the node's
    # run. What the rounds received is deleted when the scenario ends, not after each round: on
    # an ext4 without a journal, creating a file skips every inode freed in the last seconds to
    # minutes (ext4's recently_deleted), and the receiver that ran right after a mass deletion
    # paid up to 0.8 ms per instance for it.
    for round_number in progress(range(rounds), description=scenario.name, unit="round"):
        target = root / f"round{round_number}"
        with _storescp(target / "storescp", fork=concurrent) as port:
            seconds = _send_all(port, "STORESCP", paths, scenario.associations, each)
        runs.append(ReceiveRun("storescp", seconds))
        os.sync()
        for count in receivers:
            with _dicomnode_scp(target / f"dicomnode-{count}", count) as port:
                seconds = _send_all(port, "DICOMNODE", paths, scenario.associations, each)
            runs.append(ReceiveRun(names[count], seconds))
            os.sync()
    shutil.rmtree(root)
    times = {
        name: sorted(r.seconds for r in runs if r.receiver == name) for name in ("storescp", *names.values())
    }
    for name, seconds in times.items():
        median = statistics.median(seconds)
        rate = f"{megabytes / median:8.1f} MB/s  {scenario.count / median:8.1f} instances/s"
        report(f"  {name:13s} {median:7.3f} s  {rate}  (range {seconds[0]:.3f}-{seconds[-1]:.3f} s)")
    speeds = {}
    for count, name in names.items():
        speeds[count] = statistics.median(times["storescp"]) / statistics.median(times[name])
        report(f"  speed {name}/storescp: {speeds[count]:.2f}x")
    return speeds


#: Beside the received copies: a node's journal holding landed instances until they settle.
_SPACE_HEADROOM = 256 * 2**20


def _space_needed(scenario: Scenario, rounds: int, receivers: int) -> int:
    """Bytes a scenario writes before it deletes anything: the instances to send, and what
    storescp and each of the node's runs received in every round (see _bench_scenario)."""
    copies = 1 + rounds * (1 + receivers)
    return copies * scenario.count * scenario.source.stat().st_size + _SPACE_HEADROOM


def _check_space(folder: Path, needed: int, scenario: str) -> None:
    """BenchError, before anything is written, when `folder`'s file system has not `needed`
    bytes free: a receiver that runs out of space fails its sender, and the figures mean nothing."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise BenchError(
            f"the {scenario} scenario needs about {needed / 1e6:,.0f} MB free in {folder.parent}"
            f" (it keeps what every round received until its last round ends), and"
            f" {free / 1e6:,.0f} MB are free there: give fewer --rounds or --count, or set TMPDIR"
            " to a folder on a larger file system"
        )


def _peak_rss_mib() -> float:
    """This process's peak resident memory since the last reset (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise BenchError("/proc/self/status has no VmHWM: peak memory is measured on Linux only")


def _reset_peak_rss() -> None:
    """Start a new peak (Linux: writing 5 to clear_refs resets VmHWM to the current RSS)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as exc:
        raise BenchError(f"cannot reset the peak memory of this process: {exc.strerror}") from None


def bench_receive_memory(sizes_mb: list[int], report: Callable[[str], None]) -> dict[int, float]:
    """Peak resident memory of the node's SCP and spool (this process) while storescu sends one
    instance of each size, in MiB; it must not grow with the instance."""
    with (
        tempfile.TemporaryDirectory(prefix="dicomnode-bench-") as tmp,
        _dicomnode_scp(Path(tmp) / "node") as port,
    ):
        return {megabytes: _peak_receiving(Path(tmp), port, megabytes, report) for megabytes in sizes_mb}


def _peak_receiving(folder: Path, port: int, megabytes: int, report: Callable[[str], None]) -> float:
    sent = write_large_instance(folder / f"{megabytes}.dcm", megabytes)
    size = sent.stat().st_size / 2**20
    _reset_peak_rss()
    idle = _peak_rss_mib()
    seconds = _send_all(port, "DICOMNODE", [sent], 1)
    peak = _peak_rss_mib()
    sent.unlink()
    report(
        f"receive memory: one instance of {size:7.1f} MiB in {seconds:6.2f} s: "
        f"peak RSS {peak:6.1f} MiB ({peak - idle:+.1f} MiB over idle)"
    )
    return peak
