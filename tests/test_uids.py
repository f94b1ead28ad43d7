"""pynetdicom's UID conversion, remembered (net/uids.py): the same answers as pynetdicom's own,
each UID checked once however many associations name it.

Real peer: DCMTK's storescu, which proposes 128 presentation contexts on every association.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import UID
from pynetdicom import pdu_items, presentation, utils

from dicomnode.net.uids import REMEMBERED, remember_uids
from tests.conftest import dcmtk
from tests.test_access import scp as running_scp
from tests.test_access import stored_files


@pytest.fixture
def remembered():
    remember_uids()
    set_uid = utils.set_uid
    assert set_uid.remembers
    return set_uid


@pytest.mark.parametrize(
    "value",
    ["1.2.840.10008.1.2.1", b"1.2.840.10008.5.1.4.1.1.2", UID("1.2.840.10008.1.2"), "", None],
)
def test_a_uid_converts_as_pynetdicom_converts_it(remembered, value):
    first, again = remembered(value, "Abstract Syntax Name"), remembered(value, "Abstract Syntax Name")

    assert first == again == utils.set_uid.__wrapped__(value, "Abstract Syntax Name")
    assert type(first) is type(again)
    if isinstance(value, UID):
        assert first is value, "a UID given is handed back as it is"


def test_an_invalid_uid_is_refused_every_time_and_not_remembered(remembered):
    too_long = "1." + "2" * 70
    for _ in range(2):
        with pytest.raises(ValueError, match="Invalid 'Transfer Syntax Name' value .* exceed 64"):
            remembered(too_long, "Transfer Syntax Name")
    with pytest.raises(ValueError, match="must not be an empty str"):
        remembered("", "Abstract Syntax Name", allow_empty=False)


def test_what_is_remembered_is_bounded(remembered):
    remembered.cache_clear()
    for number in range(REMEMBERED + 10):
        remembered(f"1.2.3.{number + 1}", "Affected SOP Instance UID")

    assert remembered.cache_info().currsize == REMEMBERED


def test_every_module_of_pynetdicom_that_converts_uids_uses_the_remembering_one(remembered):
    assert pdu_items.set_uid is presentation.set_uid is remembered


def test_a_second_association_of_storescu_checks_no_uid_again(tmp_path, remembered):
    ct_small = Path(get_testdata_file("CT_small.dcm", download=False))
    with running_scp(tmp_path) as port:
        assert dcmtk("storescu", "-aec", "DICOMNODE", "127.0.0.1", str(port), str(ct_small)).returncode == 0
        checked = remembered.cache_info().misses
        answered = remembered.cache_info().hits
        assert dcmtk("storescu", "-aec", "DICOMNODE", "127.0.0.1", str(port), str(ct_small)).returncode == 0

        assert remembered.cache_info().misses == checked
        assert remembered.cache_info().hits - answered > 128, "storescu's contexts, all remembered"
    assert len(stored_files(tmp_path)) == 1


def test_the_scp_has_pynetdicom_remember(tmp_path):
    """In a process of its own: this one's pynetdicom may remember already."""
    program = f"""
from pynetdicom import pdu_items
from dicomnode.config import ScpConfig
from dicomnode.net.scp import StorageHandlers
from dicomnode.spool import Spool
print(getattr(pdu_items.set_uid, "remembers", False))
StorageHandlers(Spool({str(tmp_path)!r}), ScpConfig(min_free_mb=0))
print(getattr(pdu_items.set_uid, "remembers", False))
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]
