"""Load: 20 concurrent associations of 50 instances each, and a study of 500, while the node
processes and delivers: everything stored, processed and delivered, nothing lost.

One node with its imaging processes, one Orthanc as the PACS. Twenty modalities send a study
of 50 small chest radiographs each, at once; once the first results reached Orthanc, a
twenty-first sends a study of 500 in one association while the others are processed and
delivered. At the end every instance acknowledged is in the journal and on disk, every study
is done, and Orthanc holds one report per study that references exactly the instances sent.
The peak resident memory of the node and its imaging processes is printed in the table.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from dicomnode.net.scu import Peer, StoreOutcome, store
from tests.conftest import free_port, start_node, stop_process, wait_until, write_node_config
from tests.reliability.conftest import assert_no_leak, node_texts, peak_rss_mib, write_study
from tests.reliability.test_faults import _check_reported_once, _reports, _settled, _spooled

ASSOCIATIONS = 20
INSTANCES = 50
LARGE_STUDY = 500
#: Long enough that a study sent without a pause is never taken for complete while it arrives.
QUIET_PERIOD_S = 3.0


def _journal(state: Path, query: str) -> list[tuple]:
    with sqlite3.connect(state / "journal.sqlite", timeout=30) as db:
        return db.execute(query).fetchall()


@pytest.mark.timeout(900)  # minutes on two busy cores: beyond the suite's 300 s
def test_twenty_concurrent_associations_and_a_study_of_500_are_all_stored_processed_and_delivered(
    tmp_path, orthanc, tiny_architecture, tally
):
    port = free_port()
    config = write_node_config(
        tmp_path,
        tiny_architecture,
        scp_port=port,
        scp={"max_associations": ASSOCIATIONS + 1, "receivers": "auto"},  # as serve's default
        destinations=[orthanc.destination(backoff_s=0.2, max_backoff_s=1.0)],
        studies={"quiet_period_s": QUIET_PERIOD_S, "poll_interval_s": 0.1},
    )
    state = tmp_path / "var"
    peer = Peer("127.0.0.1", port, "DICOMNODE", timeout_s=60)
    small = [write_study(tmp_path / "sent", 200 + n, instances=INSTANCES) for n in range(ASSOCIATIONS)]
    large = write_study(tmp_path / "sent", 300, instances=LARGE_STUDY)
    studies = [*small, large]
    outcomes: list[StoreOutcome] = []
    lock = threading.Lock()

    def send(paths: tuple[Path, ...], calling_ae: str) -> None:
        done = store(peer, paths, calling_ae=calling_ae)
        with lock:
            outcomes.extend(done)

    node = start_node(config, port)
    try:
        with tally.case(
            f"{ASSOCIATIONS} concurrent associations of {INSTANCES} and a study of {LARGE_STUDY}"
        ):
            senders = [
                threading.Thread(target=send, args=(study.paths, f"MODALITY{n:02d}"))
                for n, study in enumerate(small)
            ]
            for sender in senders:
                sender.start()
            # The large study goes while the first results are delivered and the rest processed.
            wait_until(
                lambda: _journal(state, "SELECT 1 FROM outbox WHERE state='sent'"),
                300,
                0.2,
                what="a delivery",
            )
            senders.append(threading.Thread(target=send, args=(large.paths, "MODALITYXL")))
            senders[-1].start()
            for sender in senders:
                sender.join()
            acknowledged = {o.path for o in outcomes if o.ok}
            tally.acknowledged += len(acknowledged)
            sent = [path for study in studies for path in study.paths]
            assert len(outcomes) == len(sent) and len(acknowledged) == len(sent), [
                o.comment for o in outcomes if not o.ok
            ][:5]

            wait_until(lambda: _settled(state, len(studies)), 600, 1.0, what="every study done and sent")
            spooled = _spooled(state)
            missing = [
                sop
                for study in studies
                for sop in study.sop_instance_uids
                if sop not in spooled or not spooled[sop].is_file()
            ]
            tally.lost += len(missing)
            assert not missing, f"{len(missing)} acknowledged instances not in the spool"
            peak = peak_rss_mib(node.process.pid, children=True)
            tally.load_peak_rss_mib = max(tally.load_peak_rss_mib, peak)
            alone = peak_rss_mib(node.process.pid)
            print(f"peak RSS under load: node {alone:.0f} MiB, with its imaging processes {peak:.0f} MiB")

        with tally.case("under load: each study reported once in Orthanc, referencing every instance sent"):
            reports = _reports(orthanc)
            for study in studies:
                _check_reported_once(study, reports[study.study_instance_uid], complete_before_kill=True)
            assert len(orthanc.instances()) == 2 * len(studies), "an SR and a Secondary Capture per study"

        with tally.case("under load: the large study was received while others were processed and delivered"):
            ((first, last),) = _journal(
                state,
                "SELECT min(received_at), max(received_at) FROM instances "
                f"WHERE study_instance_uid='{large.study_instance_uid}'",
            )
            delivered_meanwhile = _journal(
                state,
                f"SELECT count(*) FROM outbox WHERE state='sent' AND updated_at BETWEEN {first} AND {last}",
            )[0][0]
            assert delivered_meanwhile, "no delivery while the large study arrived"

        with tally.case("under load: no patient data in the node's texts"):
            assert_no_leak(node_texts(node), set().union(*(s.identifiers for s in studies)))
    finally:
        stop_process(node.process)
