"""What the reliability suite shares: its tally of cases, real studies to send, and a leak scan.

Every case (a kill and restart, a hostile file, a malformed association) is counted in one
tally, printed as a table at the end of the run; its figures go into the README. Every text
the node writes (its output and log files, the audit, `dicomnode status` and `--json`, the
journal's reasons and delivery errors) is scanned for the patient names, IDs and UIDs the
tests sent.
"""

from __future__ import annotations

import sqlite3
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.conftest import RunningNode
from tests.synthetic import _chest_radiograph, draw

#: The attributes whose values must never appear in a text the node writes.
IDENTIFYING = ("PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
#: UIDs shorter than this are too generic (a root such as 1.2.840) to count as a leak.
_MIN_LEAK_UID_LENGTH = 20


@dataclass
class Tally:
    """Cases tried and passed, instances acknowledged and lost, over the whole run; the peak
    memory of the node under hostile input, and of the node with its imaging processes under load."""

    tried: int = 0
    passed: int = 0
    acknowledged: int = 0
    lost: int = 0
    peak_rss_mib: float = 0.0
    load_peak_rss_mib: float = 0.0
    failures: list[str] = field(default_factory=list)

    @contextmanager
    def case(self, name: str) -> Iterator[None]:
        """Count one case; it passes when its block raises nothing."""
        self.tried += 1
        try:
            yield
        except BaseException:
            self.failures.append(name)
            raise
        self.passed += 1


_TALLY = Tally()


@pytest.fixture(scope="session")
def tally() -> Tally:
    return _TALLY


def pytest_terminal_summary(terminalreporter) -> None:
    if not _TALLY.tried:
        return
    rows = [
        ("cases tried", _TALLY.tried),
        ("cases passed", _TALLY.passed),
        ("instances acknowledged", _TALLY.acknowledged),
        ("instances lost", _TALLY.lost),
    ]
    if _TALLY.peak_rss_mib:
        rows.append(("node peak RSS (MiB)", round(_TALLY.peak_rss_mib)))
    if _TALLY.load_peak_rss_mib:
        rows.append(("load peak RSS (MiB)", round(_TALLY.load_peak_rss_mib)))
    terminalreporter.section("reliability")
    for label, value in rows:
        terminalreporter.write_line(f"{label:<24}{value:>8}")
    for name in _TALLY.failures:
        terminalreporter.write_line(f"failed: {name}")


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def peak_rss_mib(pid: int, children: bool = False) -> float:
    """The process's peak resident memory (VmHWM); with `children`, plus that of each process
    it started that still runs, recursively (the imaging processes): a bound on the peak of all."""
    total = _status_kib(pid, "VmHWM")
    if children:
        for child in _children(pid):
            try:
                total += peak_rss_mib(child, children=True) * 1024
            except (FileNotFoundError, ProcessLookupError):  # it ended meanwhile
                continue
    return total / 1024


@dataclass(frozen=True)
class SentStudy:
    """A study of small chest radiographs written to files, with what identifies its patient."""

    study_instance_uid: str
    patient_id: str
    patient_name: str
    paths: tuple[Path, ...]
    sop_instance_uids: tuple[str, ...]

    @property
    def identifiers(self) -> set[str]:
        return {self.study_instance_uid, self.patient_id, self.patient_name, *self.sop_instance_uids}


def write_study(folder: Path, number: int, instances: int = 3, size: int = 64) -> SentStudy:
    """`instances` CR chest radiographs of one made-up patient, routed to the cxr prompt set."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(number)
    patient_id, patient_name = f"RELPID{number:05d}", f"Reliabilitas^Zebulon{number:05d}"
    study_uid = generate_uid(entropy_srcs=["reliability", str(number)])
    paths, sops = [], []
    for index in range(instances):
        ds = _chest_radiograph(draw([], size, rng), 8, patient_id, study_uid, f"rel-{number}-{index}")
        ds.PatientName = patient_name
        path = folder / f"study{number:05d}-{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        sops.append(str(ds.SOPInstanceUID))
    return SentStudy(study_uid, patient_id, patient_name, tuple(paths), tuple(sops))


def study_state(state: Path, study_instance_uid: str) -> str | None:
    """The study's state in the node's journal (under `state`), None if it holds no such study."""
    with sqlite3.connect(state / "journal.sqlite", timeout=30) as db:
        row = db.execute(
            "SELECT state FROM studies WHERE study_instance_uid=?", (study_instance_uid,)
        ).fetchone()
    return row and row[0]


def identifiers_of(paths: Iterable[Path]) -> set[str]:
    """Patient names and IDs and instance, series and study UIDs of readable DICOM files."""
    found: set[str] = set()
    for path in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:
            continue
        for keyword in IDENTIFYING:
            try:
                value = str(ds.get(keyword, "") or "").strip()
            except Exception:
                continue
            if keyword.endswith("UID") and len(value) < _MIN_LEAK_UID_LENGTH:
                continue
            if len(value) >= 6:
                found.add(value)
    return found


def node_texts(node: RunningNode) -> dict[str, str]:
    """Every text the node wrote, by where it is: output, log files, status, journal reasons."""
    state = node.config.parent / "var"
    texts = {"output": node.log.read_text(errors="replace")}
    for path in sorted((state / "logs").glob("*")):
        texts[f"logs/{path.name}"] = path.read_text(errors="replace")
    texts["status"] = node.cli("status").stdout
    texts["status --json"] = node.cli("status", "--json").stdout
    journal = state / "journal.sqlite"
    if journal.exists():
        with sqlite3.connect(journal, timeout=30) as db:
            texts["journal reasons"] = "\n".join(
                str(reason)
                for (reason,) in db.execute(
                    "SELECT reason FROM studies WHERE reason IS NOT NULL "
                    "UNION ALL SELECT last_error FROM outbox WHERE last_error IS NOT NULL"
                )
            )
    return texts


def assert_no_leak(texts: dict[str, str], identifiers: Iterable[str]) -> None:
    """Fail naming the text and the kind of value if any identifier appears in any text."""
    wanted = [value for value in identifiers if value]
    leaks = [
        f"{where}: {'a UID' if set(value) <= set('0123456789.') else 'a name or ID'} ({len(value)} chars)"
        for where, text in texts.items()
        for value in wanted
        if value in text
    ]
    assert not leaks, "patient data in the node's texts: " + "; ".join(sorted(set(leaks)))
