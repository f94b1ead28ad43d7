"""The study worker of `dicomnode serve`, in-process on a real spool: no study is left stuck.

The worker runs as a thread with a real journal and the repository's routing; the instances
are not DICOM, so routing ignores the study without the engine ever being needed.
"""

from __future__ import annotations

import gc
import sqlite3
import threading
import weakref

import pytest

from dicomnode.config import load_config, load_routing
from dicomnode.node import StudyWorker, settle_heap
from dicomnode.spool import Spool
from tests.conftest import free_port, wait_until, write_node_config

STUDY = "1.2.826.0.1.3680043.8.498.7"


class LockedOnce(Spool):
    """A journal that is locked the first `times` times a study's outcome is recorded."""

    def __init__(self, *args, times: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.locked = times

    def finish_study(self, *args, **kwargs):
        if self.locked:
            self.locked -= 1
            raise sqlite3.OperationalError("database is locked")
        return super().finish_study(*args, **kwargs)

    def retry_study(self, *args, **kwargs):
        if self.locked:
            self.locked -= 1
            raise sqlite3.OperationalError("database is locked")
        return super().retry_study(*args, **kwargs)


@pytest.mark.parametrize("times", [1, 3], ids=["finish", "finish-and-the-retry-too"])
def test_a_locked_journal_when_a_study_finishes_puts_it_back_in_the_queue_not_stuck(
    tmp_path, tiny_architecture, times
):
    config = write_node_config(
        tmp_path,
        tiny_architecture,
        scp_port=free_port(),
        studies={"quiet_period_s": 0, "poll_interval_s": 0.05, "retry_backoff_s": 0},
    )
    cfg = load_config(config)
    spool = LockedOnce(cfg.state_dir, times=times)
    spool.store(
        b"not DICOM: routing ignores it",
        sop_instance_uid=f"{STUDY}.1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid=STUDY,
        series_instance_uid=f"{STUDY}.2",
        calling_ae="MODALITY",
    )
    stop = threading.Event()
    worker = StudyWorker(cfg, spool, load_routing(cfg.routing), None, None, stop)
    worker.start()
    try:
        wait_until(lambda: spool.study(STUDY).state == "ignored", 30, what="study finished")
    finally:
        stop.set()
        worker.join(timeout=30)

    record = spool.study(STUDY)
    assert record.attempts == 1, "the lost step counted as one failed attempt"
    assert "unreadable instance" in record.reason


class _Cycle:
    def __init__(self) -> None:
        self.itself = self


@pytest.fixture
def unfrozen():
    yield
    gc.unfreeze()


def test_the_heap_at_start_up_is_collected_then_exempt_from_the_collector(unfrozen):
    garbage = _Cycle()
    collected = weakref.ref(garbage)
    del garbage
    alive = _Cycle()

    frozen = settle_heap()

    assert collected() is None, "what start-up left behind is collected first"
    assert frozen == gc.get_freeze_count() > 0
    assert not any(thing is alive for thing in gc.get_objects()), "a collection no longer walks it"
