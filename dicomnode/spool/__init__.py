"""The spool: the node's memory across crashes, on disk and in one SQLite journal.

Three rooms share the journal (`journal.py`): the instance store (`instances.py`), study state
and retention (`studies.py`), and the outbox queue with the status it reports (`outbox.py`).
Every stage reads its input from the journal and writes its output before it marks its step
done, so a restart resumes where it stopped.
"""

from __future__ import annotations

from dicomnode.spool.instances import InstanceStore
from dicomnode.spool.journal import SpoolError, SpoolFull, is_valid_uid
from dicomnode.spool.outbox import OutboxQueue
from dicomnode.spool.studies import StudyRecord, StudyState

__all__ = ["Spool", "SpoolError", "SpoolFull", "StudyRecord", "is_valid_uid"]


class Spool(InstanceStore, StudyState, OutboxQueue):
    """Instance files under `state_dir/spool`, results under `state_dir/outbox`, one journal."""
