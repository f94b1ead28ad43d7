"""Who may associate with the SCP, over what, and what the audit log says when someone may not.

Real peers: DCMTK's echoscu and storescu (with +tls and certificates the tests make with
openssl) call dicomnode's SCP, and dicomnode's SCU sends to DCMTK's storescp +tls. Every refused
association must leave exactly one audit line, and it must state the true reason.
"""

from __future__ import annotations

import logging
import re
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicomnode.config import ConfigError, DestinationConfig, DestinationTlsConfig, ScpConfig, ScpTlsConfig
from dicomnode.net.access import AccessPolicy, describe_rejection
from dicomnode.net.scp import start_scp
from dicomnode.net.scu import AssociationFailed, Peer, store
from dicomnode.net.tls import ClientTls, server_context
from dicomnode.spool import Spool
from tests.conftest import (
    dcmtk,
    free_port,
    run_cli,
    stop_process,
    wait_for_port,
    wait_until,
    write_node_config,
)
from tests.pki import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def audit(caplog) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="dicomnode.audit")
    return caplog


def audit_lines(caplog: pytest.LogCaptureFixture, kind: str) -> list[str]:
    """The audit messages that start with `kind` ("association rejected", "TLS handshake failed")."""
    messages = [r.getMessage() for r in caplog.records if r.name == "dicomnode.audit"]
    return [message for message in messages if message.startswith(kind)]


def rejection_reasons(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [line.split(": ", 1)[1] for line in audit_lines(caplog, "association rejected")]


@contextmanager
def scp(tmp_path: Path, tls: ScpTlsConfig | None = None, **settings) -> Iterator[int]:
    """dicomnode's SCP with its spool, in this process, on a free port; yields the port."""
    port = free_port()
    config = ScpConfig(host="127.0.0.1", port=port, min_free_mb=0, tls=tls, **settings)
    spool = Spool(tmp_path / "node", min_free_bytes=0)
    server = start_scp(spool, config, server_context(tls, "scp.tls") if tls else None)
    try:  # listening already: a probe connection now would hold an association slot
        yield port
    finally:
        server.shutdown()
        spool.close()


def echoscu(port: int, calling: str = "PACS", called: str = "DICOMNODE") -> subprocess.CompletedProcess:
    return dcmtk("echoscu", "-aet", calling, "-aec", called, "127.0.0.1", str(port), timeout=60)


def stored_files(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "node" / "spool").rglob("*.dcm"))


# --- the access policy, without a network -------------------------------------------------


def test_policy_checks_the_address_of_an_ipv4_peer_seen_through_a_dual_stack_socket():
    policy = AccessPolicy(ScpConfig(allowed_peers={"PACS": ["10.1.2.0/24"]}))

    assert policy.check("PACS", "DICOMNODE", "::ffff:10.1.2.7") is None
    refused = policy.check("PACS", "DICOMNODE", "::ffff:10.1.3.7")
    assert refused is not None and "not allowed from 10.1.3.7" in refused.reason


def test_policy_without_lists_accepts_any_calling_ae_from_anywhere_but_not_another_called_ae():
    policy = AccessPolicy(ScpConfig())

    assert policy.check("ANYONE", "DICOMNODE", "192.0.2.1") is None
    refused = policy.check("ANYONE", "OTHER", "192.0.2.1")
    assert refused is not None and refused.diagnostic == 0x07  # called AE title not recognised


# --- allowlist with addresses: DCMTK's echoscu from 127.0.0.1 -------------------------------


def test_listed_ae_from_its_network_is_accepted_and_audited_as_plain_tcp(tmp_path, audit):
    with scp(tmp_path, allowed_peers={"PACS": ["127.0.0.0/8"]}) as port:
        done = echoscu(port, "PACS")

    assert done.returncode == 0, done.stderr
    accepted = wait_until(lambda: audit_lines(audit, "association accepted"), 10, what="audit line")
    assert "calling=PACS called=DICOMNODE tls=no" in accepted[0]
    assert rejection_reasons(audit) == []


def test_listed_ae_from_another_address_is_rejected_and_audited_as_a_wrong_address(tmp_path, audit):
    with scp(tmp_path, allowed_peers={"PACS": ["10.1.2.0/24", "192.0.2.9"]}) as port:
        done = echoscu(port, "PACS")

    assert done.returncode != 0
    assert "Association Rejected" in done.stderr and "Calling AE Title Not Recognized" in done.stderr
    assert rejection_reasons(audit) == [
        "calling AE title 'PACS' is not allowed from 127.0.0.1"
        " (scp.allowed_peers lists 10.1.2.0/24, 192.0.2.9/32)"
    ]


def test_unknown_ae_is_rejected_and_audited_as_not_listed(tmp_path, audit):
    with scp(tmp_path, allowed_peers={"PACS": ["127.0.0.1"]}, allowed_calling_aes=["CT1"]) as port:
        refused = echoscu(port, "INTRUDER")
        allowed_anywhere = echoscu(port, "CT1")

    assert refused.returncode != 0 and "Calling AE Title Not Recognized" in refused.stderr
    assert allowed_anywhere.returncode == 0, allowed_anywhere.stderr
    assert rejection_reasons(audit) == [
        "calling AE title 'INTRUDER' is not in scp.allowed_calling_aes or scp.allowed_peers"
    ]


def test_wrong_called_ae_is_rejected_and_audited_as_such_even_with_an_allowlist(tmp_path, audit):
    with scp(tmp_path, allowed_calling_aes=["PACS"]) as port:
        done = echoscu(port, "PACS", called="NOT_US")

    assert "Called AE Title Not Recognized" in done.stderr
    assert rejection_reasons(audit) == ["called AE title 'NOT_US' is not ours ('DICOMNODE')"]


def test_association_limit_is_audited_only_when_actually_reached(tmp_path, audit):
    with scp(tmp_path, max_associations=1, allowed_calling_aes=["PACS"]) as port:
        client = AE(ae_title="PACS")
        client.add_requested_context(Verification)
        held = client.associate("127.0.0.1", port, ae_title="DICOMNODE")
        assert held.is_established
        try:
            refused = echoscu(port, "PACS")
        finally:
            held.release()
        wait_until(lambda: len(audit_lines(audit, "association released")) == 1, 10, what="release")
        again = echoscu(port, "PACS")

    assert "Local Limit Exceeded" in refused.stderr
    assert again.returncode == 0, again.stderr
    assert rejection_reasons(audit) == ["association limit of 1 reached"]


def test_an_access_check_that_fails_refuses_the_association_instead_of_letting_it_in(
    tmp_path, audit, monkeypatch
):
    def broken(*args):
        raise RuntimeError("policy bug")

    monkeypatch.setattr(AccessPolicy, "check", broken)
    with scp(tmp_path) as port:
        done = echoscu(port, "PACS")

    assert done.returncode != 0 and "Association Rejected" in done.stderr
    assert rejection_reasons(audit) == ["access check failed (RuntimeError); refused to be safe"]


def test_rejection_codes_pynetdicom_sends_are_put_in_words():
    protocol = describe_rejection(0x01, 0x02, 0x02)
    assert protocol == "protocol version not supported (permanent, source 2, diagnostic 2)"
    assert describe_rejection(0x02, 0x03, 0x01) == "temporary congestion (transient, source 3, diagnostic 1)"


# --- DICOM TLS on the SCP: DCMTK's storescu +tls ------------------------------------------------


def storescu_tls(port: int, *tls: str, calling: str = "PACS") -> subprocess.CompletedProcess:
    from pydicom.data import get_testdata_file

    sample = get_testdata_file("CT_small.dcm")
    return dcmtk(
        "storescu", "-aet", calling, "-aec", "DICOMNODE", *tls, "127.0.0.1", str(port), sample, timeout=60
    )


def require_clients(pki: Pki) -> ScpTlsConfig:
    return ScpTlsConfig(
        certificate=pki.server.certificate,
        private_key=pki.server.private_key,
        ca_certificates=pki.ca.certificate,
    )


def test_storescu_with_a_client_certificate_of_our_ca_stores_over_tls(tmp_path, pki, audit):
    client = pki.client
    with scp(tmp_path, tls=require_clients(pki), allowed_peers={"PACS": ["127.0.0.1"]}) as port:
        done = storescu_tls(
            port, "+tls", str(client.private_key), str(client.certificate), "+cf", str(pki.ca.certificate)
        )

    assert done.returncode == 0, done.stderr
    assert len(stored_files(tmp_path)) == 1
    accepted = wait_until(lambda: audit_lines(audit, "association accepted"), 10, what="audit line")
    assert re.search(
        r"calling=PACS called=DICOMNODE tls=TLSv1\.[23] client_certificate=pacs-client$", accepted[0]
    )


def test_storescu_without_a_client_certificate_is_refused_and_the_handshake_audited(tmp_path, pki, audit):
    with scp(tmp_path, tls=require_clients(pki)) as port:
        done = storescu_tls(port, "+tla", "+cf", str(pki.ca.certificate))
        failed = wait_until(lambda: audit_lines(audit, "TLS handshake failed"), 10, what="audit line")

    assert done.returncode != 0
    assert not stored_files(tmp_path)
    assert failed[0].endswith(
        "peer sent no client certificate, and one is required (PEER_DID_NOT_RETURN_A_CERTIFICATE)"
    ), failed
    assert audit_lines(audit, "association accepted") == []


def test_storescu_with_a_certificate_of_another_ca_is_refused_as_not_trusted(tmp_path, pki, audit):
    outsider = pki.outsider
    with scp(tmp_path, tls=require_clients(pki)) as port:
        done = storescu_tls(
            port, "+tls", str(outsider.private_key), str(outsider.certificate), "+cf", str(pki.ca.certificate)
        )
        failed = wait_until(lambda: audit_lines(audit, "TLS handshake failed"), 10, what="audit line")

    assert done.returncode != 0
    assert not stored_files(tmp_path)
    assert "certificate not trusted: unable to get local issuer certificate" in failed[0], failed


def test_storescu_that_does_not_trust_our_server_certificate_is_refused(tmp_path, pki, audit):
    client = pki.client
    with scp(tmp_path, tls=require_clients(pki)) as port:
        done = storescu_tls(
            port,
            "+tls",
            str(client.private_key),
            str(client.certificate),
            "+cf",
            str(pki.other_ca.certificate),
        )
        failed = wait_until(lambda: audit_lines(audit, "TLS handshake failed"), 10, what="audit line")

    assert done.returncode != 0
    assert failed[0].endswith("peer does not trust our certificate (unknown CA) (TLSV1_ALERT_UNKNOWN_CA)")


def test_plain_dicom_on_the_tls_port_is_refused_saying_the_peer_does_not_speak_tls(tmp_path, pki, audit):
    with scp(tmp_path, tls=require_clients(pki)) as port:
        done = echoscu(port, "PACS")
        failed = wait_until(lambda: audit_lines(audit, "TLS handshake failed"), 10, what="audit line")

    assert done.returncode != 0
    assert "peer does not speak TLS" in failed[0], failed


def test_tls_without_client_verification_accepts_storescu_without_a_certificate(tmp_path, pki, audit):
    tls = ScpTlsConfig(certificate=pki.server.certificate, private_key=pki.server.private_key)
    with scp(tmp_path, tls=tls) as port:
        done = storescu_tls(port, "+tla", "+cf", str(pki.ca.certificate))

    assert done.returncode == 0, done.stderr
    accepted = wait_until(lambda: audit_lines(audit, "association accepted"), 10, what="audit line")
    assert accepted[0].endswith("client_certificate=none")


# --- DICOM TLS on the SCU: dicomnode sends to DCMTK's storescp +tls ------------------------------


@contextmanager
def storescp_tls(folder: Path, pki: Pki) -> Iterator[int]:
    """DCMTK's storescp speaking only TLS, requiring a client certificate of the hospital CA."""
    import shutil

    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    server = pki.server
    process = subprocess.Popen(
        [shutil.which("storescp"), "-aet", "STORESCP", "-od", str(folder), "+tls", str(server.private_key),
         str(server.certificate), "+cf", str(pki.ca.certificate), "-rc", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port, process=process)
        yield port
    finally:
        stop_process(process)


def destination(port: int, **tls) -> DestinationConfig:
    return DestinationConfig(
        name="archive", host="127.0.0.1", port=port, ae_title="STORESCP", tls=DestinationTlsConfig(**tls)
    )


def test_destination_over_tls_with_our_client_certificate_receives_the_file(tmp_path, pki, chest_cr):
    with storescp_tls(tmp_path / "received", pki) as port:
        peer = Peer.of(
            destination(
                port,
                ca_certificates=pki.ca.certificate,
                certificate=pki.client.certificate,
                private_key=pki.client.private_key,
            )
        )
        outcomes = store(peer, [chest_cr])

    assert [o.status for o in outcomes] == [0]
    assert len(list((tmp_path / "received").iterdir())) == 1


def test_destination_whose_certificate_we_do_not_trust_fails_naming_the_tls_reason(tmp_path, pki, chest_cr):
    with storescp_tls(tmp_path / "received", pki) as port:
        peer = Peer.of(
            destination(
                port,
                ca_certificates=pki.other_ca.certificate,
                certificate=pki.client.certificate,
                private_key=pki.client.private_key,
            )
        )
        with pytest.raises(AssociationFailed) as failed:
            store(peer, [chest_cr])

    assert str(failed.value) == (
        f"STORESCP@127.0.0.1:{port}: TLS handshake failed: certificate not trusted:"
        " self-signed certificate in certificate chain (CERTIFICATE_VERIFY_FAILED)"
    )
    assert not list((tmp_path / "received").iterdir())


def test_destination_reached_under_a_name_its_certificate_lacks_fails_on_the_host_name(
    tmp_path, pki, chest_cr
):
    with storescp_tls(tmp_path / "received", pki) as port:
        settings = DestinationTlsConfig(
            ca_certificates=pki.ca.certificate,
            certificate=pki.client.certificate,
            private_key=pki.client.private_key,
        )
        named = Peer("127.0.0.2", port, "STORESCP", 30.0, ClientTls(settings, "destinations[x].tls"))
        with pytest.raises(
            AssociationFailed, match="TLS handshake failed: certificate not trusted: IP address"
        ):
            store(named, [chest_cr])


# --- certificates and keys checked at start-up, named by file and key ------------------------------


def tls_error(tls: ScpTlsConfig) -> str:
    with pytest.raises(ConfigError) as caught:
        server_context(tls, "dicomnode.yaml: scp.tls")
    return str(caught.value)


def assert_no_key_material(message: str, *keys: Path) -> None:
    for key in keys:
        body = [line for line in key.read_text().splitlines() if line and not line.startswith("-----")]
        assert not any(line in message for line in body), "key material in the message"
    assert "PRIVATE KEY-----" not in message


def test_key_of_another_certificate_is_refused_naming_both_files(pki):
    message = tls_error(ScpTlsConfig(certificate=pki.server.certificate, private_key=pki.client.private_key))

    assert message == (
        f"dicomnode.yaml: scp.tls.private_key: {pki.client.private_key} is not the key of"
        f" the certificate {pki.server.certificate}"
    )
    assert_no_key_material(message, pki.client.private_key, pki.server.private_key)


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o620])
def test_private_key_others_may_access_is_refused_with_its_mode(tmp_path, pki, mode):
    key = tmp_path / "node.key"
    key.write_bytes(pki.server.private_key.read_bytes())
    key.chmod(mode)

    message = tls_error(ScpTlsConfig(certificate=pki.server.certificate, private_key=key))

    expected = f"dicomnode.yaml: scp.tls.private_key: others may access {key} (mode {mode:04o})"
    assert message.startswith(expected)


def test_private_key_under_a_passphrase_is_refused_without_prompting(tmp_path, pki):
    key = tmp_path / "locked.key"
    subprocess.run(
        ["openssl", "pkey", "-in", str(pki.server.private_key), "-aes256", "-passout", "pass:secret",
         "-out", str(key)],
        check=True, capture_output=True,
    )  # fmt: skip
    key.chmod(0o600)

    message = tls_error(ScpTlsConfig(certificate=pki.server.certificate, private_key=key))

    assert message.startswith(f"dicomnode.yaml: scp.tls.private_key: {key} is protected by a passphrase")


@pytest.mark.parametrize("key", ["certificate", "private_key", "ca_certificates"])
def test_missing_tls_file_is_refused_naming_the_key_and_the_path(tmp_path, pki, key):
    files = {
        "certificate": pki.server.certificate,
        "private_key": pki.server.private_key,
        "ca_certificates": pki.ca.certificate,
    }
    files[key] = tmp_path / "absent.pem"

    message = tls_error(ScpTlsConfig(**files))

    assert message.startswith(f"dicomnode.yaml: scp.tls.{key}: ")
    assert str(tmp_path / "absent.pem") in message and "No such file or directory" in message


def test_certificate_file_that_is_not_pem_is_refused_naming_it(tmp_path, pki):
    certificate = tmp_path / "node.crt"
    certificate.write_text("not a certificate\n")

    message = tls_error(ScpTlsConfig(certificate=certificate, private_key=pki.server.private_key))

    assert message == f"dicomnode.yaml: scp.tls.certificate: {certificate} holds no PEM certificate"


def test_dicomnode_config_reports_the_tls_problem_with_file_and_key(tmp_path, pki, tiny_architecture):
    config = write_node_config(
        tmp_path,
        tiny_architecture,
        scp_port=free_port(),
        scp={"tls": {"certificate": str(pki.server.certificate), "private_key": str(pki.client.private_key)}},
    )

    done = run_cli("config", "--config", str(config))

    assert done.returncode == 2
    assert (
        f"{config}: scp.tls.private_key: {pki.client.private_key} is not the key of"
        f" the certificate {pki.server.certificate}"
    ) in done.stderr
    assert "Traceback" not in done.stderr


def test_a_peer_silent_in_the_tls_handshake_holds_up_no_other_peer(tmp_path, pki, audit):
    """pynetdicom handshakes in its accept loop: one silent connection would stall every peer."""
    client = pki.client
    with scp(tmp_path, tls=require_clients(pki), acse_timeout_s=20) as port:
        with socket.create_connection(("127.0.0.1", port)):
            done = storescu_tls(
                port, "+tls", str(client.private_key), str(client.certificate), "+cf", str(pki.ca.certificate)
            )
        failed = wait_until(lambda: audit_lines(audit, "TLS handshake failed"), 10, what="audit line")

    assert done.returncode == 0, done.stderr
    assert failed[0].endswith("closed the connection during the TLS handshake (UNEXPECTED_EOF_WHILE_READING)")


def test_node_receives_over_tls_from_an_allowed_peer_and_delivers_its_results_over_tls(
    tmp_path, pki, node_factory, chest_cr
):
    """`dicomnode serve` end to end: storescu +tls in, SR and SC out to storescp +tls."""
    received = tmp_path / "received"
    with storescp_tls(received, pki) as archive:
        tls_out = {
            "ca_certificates": str(pki.ca.certificate),
            "certificate": str(pki.server.certificate),
            "private_key": str(pki.server.private_key),
        }
        node = node_factory(
            destinations=[
                {"name": "archive", "host": "127.0.0.1", "port": archive, "ae_title": "STORESCP",
                 "backoff_s": 0.5, "tls": tls_out}
            ],
            scp={"tls": tls_out, "allowed_peers": {"MODALITY": ["127.0.0.1/32"]}},
        )  # fmt: skip
        client = pki.client
        sent = dcmtk(
            "storescu", "-aet", "MODALITY", "-aec", "DICOMNODE", "+tls", str(client.private_key),
            str(client.certificate), "+cf", str(pki.ca.certificate),
            "127.0.0.1", str(node.port), str(chest_cr),
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        results = wait_until(lambda: len(list(received.iterdir())) >= 2 and list(received.iterdir()), 90)

    assert sorted(path.name[:2] for path in results) == ["SC", "SR"]
    audit_log = (node.config.parent / "var" / "logs" / "audit.log").read_text()
    accepted = r"calling=MODALITY called=DICOMNODE tls=TLSv1\.[23] client_certificate=pacs-client"
    assert re.search(accepted, audit_log)


def test_dicomnode_config_lists_each_side_that_speaks_tls(tmp_path, pki, tiny_architecture):
    tls = {"certificate": str(pki.server.certificate), "private_key": str(pki.server.private_key)}
    archive = {"name": "archive", "host": "127.0.0.1", "port": 2762, "ae_title": "ARCHIVE"}
    config = write_node_config(
        tmp_path,
        tiny_architecture,
        scp_port=free_port(),
        scp={"tls": {**tls, "ca_certificates": str(pki.ca.certificate), "min_version": "TLSv1.3"}},
        destinations=[{**archive, "tls": {"ca_certificates": str(pki.ca.certificate), **tls}}],
    )

    done = run_cli("config", "--config", str(config))

    assert done.returncode == 0, done.stderr
    assert "  scp: DICOM TLS, TLSv1.3 or newer, client certificates required\n" in done.stdout
    assert "  destination archive: DICOM TLS, TLSv1.2 or newer\n" in done.stdout


def test_dicomnode_echo_and_send_speak_tls_with_the_options_an_administrator_gives(tmp_path, pki, chest_cr):
    client = ["--tls-cert", str(pki.client.certificate), "--tls-key", str(pki.client.private_key)]
    with storescp_tls(tmp_path / "received", pki) as port:
        peer = ["127.0.0.1", str(port)]
        echoed = run_cli("echo", *peer, "--aec", "STORESCP", "--tls-ca", str(pki.ca.certificate), *client)
        other_ca = ["--tls-ca", str(pki.other_ca.certificate)]
        untrusted = run_cli("send", *peer, str(chest_cr), "--aec", "STORESCP", *other_ca, *client)
        half = run_cli("echo", *peer, "--aec", "STORESCP", *client)

    assert echoed.returncode == 0, echoed.stderr
    assert echoed.stdout == f"C-ECHO STORESCP@127.0.0.1:{port}: status 0x0000\n"
    assert untrusted.returncode == 1
    assert untrusted.stderr == (
        f"send failed: STORESCP@127.0.0.1:{port}: TLS handshake failed: certificate not trusted:"
        " self-signed certificate in certificate chain (CERTIFICATE_VERIFY_FAILED)\n"
    )
    assert not list((tmp_path / "received").iterdir())
    assert (half.returncode, half.stderr) == (2, "--tls-cert and --tls-key need --tls-ca\n")
