"""Configuration: dicomnode.yaml and routing.yaml are validated once, and every error says
which file and which dotted key to fix.

The files are real YAML written to a temporary folder and read through `load_config` /
`load_routing`, exactly as `dicomnode serve` reads them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from dicomnode.config import ConfigError, NodeConfig, load_config, load_routing

REPO = Path(__file__).resolve().parent.parent
EMBEDDED_CONFIG = REPO / "conf" / "dicomnode.yaml"


def write(path: Path, content: dict | str | bytes) -> Path:
    """Write YAML (a mapping is dumped, text and bytes are written as given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


def config_error(path: Path, loader=load_config) -> str:
    """The message of the ConfigError that loading `path` raises."""
    with pytest.raises(ConfigError) as caught:
        loader(path)
    return str(caught.value)


def assert_names(message: str, path: Path, key: str) -> None:
    """The message names the file and the dotted key, as `file: key: ...` on one line."""
    assert any(line.startswith(f"{path}: {key}: ") for line in message.splitlines()), message


# -- dicomnode.yaml ------------------------------------------------------------------------------


def test_embedded_default_config_loads_with_paths_resolved_next_to_it():
    cfg = load_config(EMBEDDED_CONFIG)

    assert isinstance(cfg, NodeConfig)
    assert cfg.source == EMBEDDED_CONFIG
    assert cfg.state_dir == REPO / "var"
    assert cfg.prompts_dir == REPO / "prompts"
    assert cfg.routing == REPO / "conf" / "routing.yaml"
    assert cfg.scp.ae_title == "DICOMNODE" and cfg.scp.port == 11112
    assert cfg.model.checkpoint is None


def test_embedded_default_routing_loads_and_names_only_prompt_sets_that_ship():
    cfg = load_config(EMBEDDED_CONFIG)
    routing = load_routing(cfg.routing)

    named = {r.prompt_set for r in routing.rules if r.prompt_set is not None}
    assert "cxr" in named
    assert all((cfg.prompts_dir / name / "promptset.yaml").is_file() for name in named)


def test_production_example_config_loads_with_its_absolute_paths():
    cfg = load_config(REPO / "conf" / "dicomnode.production.yaml")

    assert cfg.state_dir == Path("/var/lib/dicomnode")
    assert cfg.routing == Path("/etc/dicomnode/routing.yaml")


def test_empty_config_file_means_all_defaults(tmp_path):
    cfg = load_config(write(tmp_path / "dicomnode.yaml", ""))

    assert cfg.scp.port == 11112
    assert cfg.destinations == ()
    assert cfg.routing == tmp_path / "routing.yaml"


def test_relative_paths_resolve_against_the_config_files_folder_not_the_working_directory(
    tmp_path, monkeypatch
):
    folder = tmp_path / "etc" / "dicomnode"
    write(folder / "arch" / "tiny.json", "{}")
    write(folder / "weights" / "model.bin", "weights")
    write(
        folder / "dicomnode.yaml",
        {
            "state_dir": "../../var/lib/dicomnode",
            "prompts_dir": "prompts",
            "routing": "rules/routing.yaml",
            "model": {"architecture_config": "arch/tiny.json", "checkpoint": "weights/model.bin"},
        },
    )
    monkeypatch.chdir(tmp_path / "etc")

    cfg = load_config(Path("dicomnode") / "dicomnode.yaml")

    assert cfg.state_dir == tmp_path / "var" / "lib" / "dicomnode"
    assert cfg.prompts_dir == folder / "prompts"
    assert cfg.routing == folder / "rules" / "routing.yaml"
    assert cfg.model.architecture_config == folder / "arch" / "tiny.json"
    assert cfg.model.checkpoint == folder / "weights" / "model.bin"


def test_absolute_paths_are_kept_as_given(tmp_path):
    state = tmp_path / "elsewhere" / "state"
    cfg = load_config(write(tmp_path / "conf" / "dicomnode.yaml", {"state_dir": str(state)}))

    assert cfg.state_dir == state


def test_unknown_key_is_rejected_naming_the_file_and_dotted_key(tmp_path):
    path = write(tmp_path / "dicomnode.yaml", {"scp": {"prot": 104}})

    message = config_error(path)

    assert_names(message, path, "scp.prot")
    assert "Extra inputs are not permitted" in message


def test_unknown_top_level_key_is_rejected_naming_it(tmp_path):
    path = write(tmp_path / "dicomnode.yaml", {"destination": []})

    assert_names(config_error(path), path, "destination")


def test_wrong_type_is_rejected_naming_the_key_and_the_value_given(tmp_path):
    path = write(tmp_path / "dicomnode.yaml", {"studies": {"quiet_period_s": "half a minute"}})

    message = config_error(path)

    assert_names(message, path, "studies.quiet_period_s")
    assert "'half a minute'" in message


def test_section_that_is_not_a_mapping_is_rejected_naming_it(tmp_path):
    path = write(tmp_path / "dicomnode.yaml", {"scp": 104})

    assert_names(config_error(path), path, "scp")


@pytest.mark.parametrize("port", [0, 65536, -1, True, "11112"])
def test_scp_port_out_of_range_or_not_a_number_is_rejected(tmp_path, port):
    path = write(tmp_path / "dicomnode.yaml", {"scp": {"port": port}})

    assert_names(config_error(path), path, "scp.port")


@pytest.mark.parametrize("receivers", [0, 65, -1, True, "4", "many", 2.0, None])
def test_scp_receivers_other_than_a_count_or_auto_is_rejected_saying_what_to_give(tmp_path, receivers):
    path = write(tmp_path / "dicomnode.yaml", {"scp": {"receivers": receivers}})

    message = config_error(path)
    assert_names(message, path, "scp.receivers")
    assert "a number of processes from 1 to 64, or auto" in message
    assert len(message.splitlines()) == 1, message  # one line, not one per member of the union


@pytest.mark.parametrize(("cores", "processes"), [(1, 1), (2, 2), (3, 3), (4, 4), (8, 4), (16, 4), (128, 4)])
def test_scp_receivers_auto_is_one_process_per_usable_core_at_most_four(
    tmp_path, monkeypatch, cores, processes
):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    defaulted = load_config(write(tmp_path / "empty.yaml", ""))
    given = load_config(write(tmp_path / "auto.yaml", {"scp": {"receivers": "auto"}}))

    assert defaulted.scp.receivers == given.scp.receivers == "auto"
    assert defaulted.scp.receiving_processes() == given.scp.receiving_processes() == processes


def test_scp_receivers_given_as_a_count_is_kept_whatever_the_cores(tmp_path, monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    cfg = load_config(write(tmp_path / "dicomnode.yaml", {"scp": {"receivers": 7}}))

    assert cfg.scp.receiving_processes() == 7


def test_destination_port_out_of_range_is_rejected_naming_its_index(tmp_path):
    destinations = [
        {"name": "pacs", "host": "pacs.example", "port": 104, "ae_title": "PACS"},
        {"name": "archive", "host": "archive.example", "port": 70000, "ae_title": "ARCHIVE"},
    ]
    path = write(tmp_path / "dicomnode.yaml", {"destinations": destinations})

    assert_names(config_error(path), path, "destinations.1.port")


def test_a_retry_window_that_is_not_positive_is_rejected_naming_the_key(tmp_path):
    destination = {
        "name": "pacs",
        "host": "pacs.example",
        "port": 104,
        "ae_title": "PACS",
        "retry_for_hours": 0,
    }
    path = write(tmp_path / "dicomnode.yaml", {"destinations": [destination]})

    assert_names(config_error(path), path, "destinations.0.retry_for_hours")


@pytest.mark.parametrize(
    "ae_title",
    [
        "ABCDEFGHIJKLMNOPQ",  # 17 characters: the limit is 16
        "DICOM\\NODE",  # backslash is the DICOM value separator
        "",
        " LEADING",  # leading spaces are not significant, so not allowed
        "TRAILING ",
        "TAB\tAE",  # control character
    ],
)
def test_invalid_ae_title_is_rejected(tmp_path, ae_title):
    path = write(tmp_path / "dicomnode.yaml", {"scp": {"ae_title": ae_title}})

    assert_names(config_error(path), path, "scp.ae_title")


def test_sixteen_character_ae_title_with_inner_space_is_accepted(tmp_path):
    cfg = load_config(write(tmp_path / "dicomnode.yaml", {"scp": {"ae_title": "DICOM NODE 12345"}}))

    assert cfg.scp.ae_title == "DICOM NODE 12345"


def test_invalid_allowed_calling_ae_is_rejected_naming_its_index(tmp_path):
    path = write(tmp_path / "dicomnode.yaml", {"scp": {"allowed_calling_aes": ["PACS", "X" * 17]}})

    assert_names(config_error(path), path, "scp.allowed_calling_aes.1")


def test_allowed_peers_read_addresses_and_networks_per_calling_ae(tmp_path):
    peers = {"PACS": ["10.1.2.0/24", "10.1.3.7"], "CT1": ["2001:db8::/32"]}
    cfg = load_config(write(tmp_path / "dicomnode.yaml", {"scp": {"allowed_peers": peers}}))

    assert {ae: [str(n) for n in networks] for ae, networks in cfg.scp.allowed_peers.items()} == {
        "PACS": ["10.1.2.0/24", "10.1.3.7/32"],
        "CT1": ["2001:db8::/32"],
    }


@pytest.mark.parametrize(
    ("address", "says"),
    [
        ("10.1.2.5/24", "10.1.2.5/24 has host bits set"),
        ("pacs.example", "'pacs.example' does not appear to be an IPv4 or IPv6 network"),
        (10, "give an address or network as text"),
    ],
)
def test_allowed_peer_address_that_is_not_a_network_is_rejected_saying_why(tmp_path, address, says):
    path = write(tmp_path / "dicomnode.yaml", {"scp": {"allowed_peers": {"PACS": [address]}}})

    message = config_error(path)

    assert_names(message, path, "scp.allowed_peers.PACS.0")
    assert says in message


def test_allowed_peer_without_any_address_is_rejected_naming_it(tmp_path):
    path = write(tmp_path / "dicomnode.yaml", {"scp": {"allowed_peers": {"PACS": []}}})

    message = config_error(path)

    assert_names(message, path, "scp.allowed_peers")
    assert "no address listed for PACS" in message


def test_calling_ae_in_both_allowlists_is_rejected_as_ambiguous(tmp_path):
    scp = {"allowed_calling_aes": ["PACS"], "allowed_peers": {"PACS": ["10.1.2.0/24"]}}
    path = write(tmp_path / "dicomnode.yaml", {"scp": scp})

    message = config_error(path)

    assert_names(message, path, "scp")
    assert "PACS in both allowed_calling_aes (any address) and allowed_peers" in message


def test_tls_files_resolve_against_the_config_folder(tmp_path):
    tls = {"certificate": "tls/node.crt", "private_key": "tls/node.key", "ca_certificates": "tls/ca.crt"}
    destination = {"name": "pacs", "host": "pacs.example", "port": 2762, "ae_title": "PACS", "tls": {}}
    path = write(tmp_path / "conf" / "dicomnode.yaml", {"scp": {"tls": tls}, "destinations": [destination]})

    cfg = load_config(path)

    assert cfg.scp.tls.certificate == tmp_path / "conf" / "tls" / "node.crt"
    assert cfg.scp.tls.private_key == tmp_path / "conf" / "tls" / "node.key"
    assert cfg.scp.tls.ca_certificates == tmp_path / "conf" / "tls" / "ca.crt"
    assert cfg.scp.tls.min_version == "TLSv1.2"
    assert cfg.destinations[0].tls.ca_certificates is None  # the system's trust store
    assert cfg.destinations[0].tls.verify_hostname is True


def test_destination_tls_certificate_without_its_key_is_rejected_naming_the_destination(tmp_path):
    destination = {
        "name": "pacs",
        "host": "pacs.example",
        "port": 2762,
        "ae_title": "PACS",
        "tls": {"certificate": "node.crt"},
    }
    path = write(tmp_path / "dicomnode.yaml", {"destinations": [destination]})

    message = config_error(path)

    assert_names(message, path, "destinations.0.tls")
    assert "give both certificate and private_key, or neither" in message


@pytest.mark.parametrize("version", ["TLSv1.1", "SSLv3", "1.2"])
def test_tls_below_1_2_or_unknown_is_rejected(tmp_path, version):
    tls = {"certificate": "node.crt", "private_key": "node.key", "min_version": version}
    path = write(tmp_path / "dicomnode.yaml", {"scp": {"tls": tls}})

    assert_names(config_error(path), path, "scp.tls.min_version")


def test_duplicate_destination_names_are_rejected_naming_the_name(tmp_path):
    destinations = [
        {"name": "pacs", "host": "a.example", "port": 104, "ae_title": "A"},
        {"name": "pacs", "host": "b.example", "port": 104, "ae_title": "B"},
    ]
    path = write(tmp_path / "dicomnode.yaml", {"destinations": destinations})

    message = config_error(path)

    assert_names(message, path, "destinations")
    assert "unique" in message and "pacs" in message


def test_destination_missing_a_required_key_is_rejected_naming_it(tmp_path):
    path = write(tmp_path / "dicomnode.yaml", {"destinations": [{"name": "pacs", "host": "h", "port": 104}]})

    message = config_error(path)

    # Either C-STORE (host, port, ae_title) or STOW-RS (stow_url): the destination says which it lacks.
    assert_names(message, path, "destinations.0")
    assert "give host, port and ae_title (C-STORE) or stow_url (STOW-RS); missing: ae_title" in message


def test_missing_checkpoint_file_is_rejected_naming_the_key_and_resolved_path(tmp_path):
    path = write(tmp_path / "conf" / "dicomnode.yaml", {"model": {"checkpoint": "weights/clip.bin"}})

    message = config_error(path)

    assert_names(message, path, "model.checkpoint")
    assert str(tmp_path / "conf" / "weights" / "clip.bin") in message


def test_missing_architecture_config_file_is_rejected_naming_the_key(tmp_path):
    path = write(tmp_path / "dicomnode.yaml", {"model": {"architecture_config": "nowhere.json"}})

    assert_names(config_error(path), path, "model.architecture_config")


def test_invalid_yaml_is_rejected_naming_the_file_and_the_line(tmp_path):
    path = write(tmp_path / "dicomnode.yaml", "scp:\n  port: 104\n  ae_title: [DICOMNODE\n")

    message = config_error(path)

    assert message.startswith(f"{path}: not valid YAML")
    assert "line" in message


@pytest.mark.parametrize("content", ["- port: 104\n", "just a sentence\n", "42\n"])
def test_top_level_that_is_not_a_mapping_is_rejected(tmp_path, content):
    path = write(tmp_path / "dicomnode.yaml", content)

    assert config_error(path).startswith(f"{path}: top level must be a mapping")


def test_missing_file_is_reported_naming_it(tmp_path):
    path = tmp_path / "absent.yaml"

    message = config_error(path)

    assert message.startswith(f"{path}: cannot read configuration")
    assert "No such file" in message


def test_folder_given_as_config_is_reported_as_unreadable(tmp_path):
    assert config_error(tmp_path).startswith(f"{tmp_path}: cannot read configuration")


def test_file_not_in_utf8_is_reported_naming_it_instead_of_crashing(tmp_path):
    path = write(
        tmp_path / "dicomnode.yaml", "# Grüße aus der Radiologie\nlog_level: INFO\n".encode("latin-1")
    )

    message = config_error(path)

    assert message.startswith(f"{path}: not UTF-8")


def test_every_error_of_a_file_is_reported_at_once_each_on_its_own_line(tmp_path):
    path = write(tmp_path / "dicomnode.yaml", {"scp": {"port": 0, "ae_title": "X" * 17}, "log_level": "LOUD"})

    message = config_error(path)

    for key in ("scp.port", "scp.ae_title", "log_level"):
        assert_names(message, path, key)


# -- routing.yaml --------------------------------------------------------------------------------


def routing_file(tmp_path: Path, *rules: dict) -> Path:
    return write(tmp_path / "routing.yaml", {"rules": list(rules)})


def test_routing_values_accept_a_scalar_a_list_and_a_regex(tmp_path):
    path = routing_file(
        tmp_path,
        {
            "name": "chest",
            "match": {
                "Modality": "CR",
                "BodyPartExamined": ["CHEST", "THORAX"],
                "SeriesDescription": {"regex": "^(PA|AP)\\b"},
                "SeriesNumber": 1,
            },
            "prompt_set": "cxr",
        },
    )

    (rule,) = load_routing(path).rules

    assert rule.match["Modality"].values == ("CR",)
    assert rule.match["BodyPartExamined"].values == ("CHEST", "THORAX")
    assert rule.match["SeriesDescription"].regex == "^(PA|AP)\\b"
    assert rule.match["SeriesNumber"].values == ("1",)


def test_routing_unknown_dicom_keyword_is_rejected_naming_rule_index_and_keyword(tmp_path):
    path = routing_file(
        tmp_path,
        {"name": "chest", "match": {"Modality": "CR"}, "prompt_set": "cxr"},
        {"name": "typo", "match": {"BodyPart": "CHEST"}, "prompt_set": "cxr"},
    )

    message = config_error(path, load_routing)

    assert_names(message, path, "rules.1.match.BodyPart")
    assert "not a DICOM attribute keyword" in message


def test_routing_keyword_in_the_wrong_case_is_rejected(tmp_path):
    path = routing_file(tmp_path, {"name": "chest", "match": {"modality": "CR"}, "prompt_set": "cxr"})

    assert_names(config_error(path, load_routing), path, "rules.0.match.modality")


def test_routing_calling_ae_title_is_accepted_as_a_keyword(tmp_path):
    path = routing_file(
        tmp_path, {"name": "ward", "match": {"CallingAETitle": ["WARD_CR"]}, "prompt_set": "cxr"}
    )

    assert load_routing(path).rules[0].match["CallingAETitle"].values == ("WARD_CR",)


def test_routing_sequence_keyword_is_refused(tmp_path):
    path = routing_file(
        tmp_path, {"name": "seq", "match": {"ReferencedImageSequence": "x"}, "ignore": "never"}
    )

    message = config_error(path, load_routing)

    assert_names(message, path, "rules.0.match.ReferencedImageSequence")
    assert "sequences" in message


def test_routing_file_meta_keyword_is_refused_because_it_is_not_in_the_dataset(tmp_path):
    path = routing_file(
        tmp_path, {"name": "j2k", "match": {"TransferSyntaxUID": "1.2.840.10008.1.2.4.91"}, "ignore": "no"}
    )

    assert_names(config_error(path, load_routing), path, "rules.0.match.TransferSyntaxUID")


def test_routing_invalid_regex_is_rejected_naming_the_condition(tmp_path):
    path = routing_file(
        tmp_path, {"name": "desc", "match": {"SeriesDescription": {"regex": "(PA"}}, "prompt_set": "cxr"}
    )

    message = config_error(path, load_routing)

    assert_names(message, path, "rules.0.match.SeriesDescription")
    assert "invalid regex" in message


def test_routing_condition_with_both_values_and_regex_is_rejected(tmp_path):
    path = routing_file(
        tmp_path,
        {"name": "r", "match": {"Modality": {"values": ["CR"], "regex": "CR"}}, "prompt_set": "cxr"},
    )

    assert_names(config_error(path, load_routing), path, "rules.0.match.Modality")


def test_routing_empty_value_list_is_rejected_because_it_could_never_match(tmp_path):
    path = routing_file(tmp_path, {"name": "r", "match": {"Modality": []}, "prompt_set": "cxr"})

    message = config_error(path, load_routing)

    assert_names(message, path, "rules.0.match.Modality")
    assert "never matches" in message


def test_routing_unquoted_yaml_boolean_is_rejected_naming_the_keyword(tmp_path):
    # `NO` unquoted is YAML's false: it would never match the code string NO of the dataset.
    path = write(
        tmp_path / "routing.yaml",
        "rules:\n  - name: annotated\n    match:\n      BurnedInAnnotation: [YES]\n    ignore: burned-in\n",
    )

    message = config_error(path, load_routing)

    assert_names(message, path, "rules.0.match")
    assert "BurnedInAnnotation" in message and "quote" in message


def test_routing_quoted_yes_is_a_value(tmp_path):
    path = write(
        tmp_path / "routing.yaml",
        "rules:\n  - name: annotated\n    match:\n      BurnedInAnnotation: ['YES']\n    ignore: burned-in\n",
    )

    assert load_routing(path).rules[0].match["BurnedInAnnotation"].values == ("YES",)


def test_routing_rule_with_both_prompt_set_and_ignore_is_rejected_naming_the_rule(tmp_path):
    path = routing_file(
        tmp_path, {"name": "both", "match": {"Modality": "CR"}, "prompt_set": "cxr", "ignore": "why"}
    )

    message = config_error(path, load_routing)

    assert_names(message, path, "rules.0")
    assert "'both' needs exactly one of prompt_set or ignore" in message


def test_routing_rule_with_neither_prompt_set_nor_ignore_is_rejected_naming_the_rule(tmp_path):
    path = routing_file(tmp_path, {"name": "neither", "match": {"Modality": "CR"}})

    message = config_error(path, load_routing)

    assert_names(message, path, "rules.0")
    assert "'neither' needs exactly one of prompt_set or ignore" in message


def test_routing_ignore_without_a_reason_is_rejected(tmp_path):
    path = routing_file(tmp_path, {"name": "quiet", "match": {"Modality": "CR"}, "ignore": ""})

    assert_names(config_error(path, load_routing), path, "rules.0.ignore")


@pytest.mark.parametrize("prompt_set", ["..", ".", "../secrets", "cxr/v2", ""])
def test_routing_prompt_set_must_be_a_plain_folder_name(tmp_path, prompt_set):
    path = routing_file(tmp_path, {"name": "r", "match": {"Modality": "CR"}, "prompt_set": prompt_set})

    assert_names(config_error(path, load_routing), path, "rules.0.prompt_set")


@pytest.mark.parametrize("match", [{}, ["Modality"], "Modality"])
def test_routing_match_must_be_a_non_empty_mapping(tmp_path, match):
    path = routing_file(tmp_path, {"name": "r", "match": match, "prompt_set": "cxr"})

    assert_names(config_error(path, load_routing), path, "rules.0.match")


def test_routing_without_rules_key_is_rejected(tmp_path):
    path = write(tmp_path / "routing.yaml", {"rule": []})

    message = config_error(path, load_routing)

    assert_names(message, path, "rules")
    assert_names(message, path, "rule")


def test_routing_top_level_list_is_rejected(tmp_path):
    path = write(tmp_path / "routing.yaml", "- name: chest\n")

    assert config_error(path, load_routing).startswith(f"{path}: top level must be a mapping")


def test_routing_missing_file_is_reported_naming_it(tmp_path):
    path = tmp_path / "routing.yaml"

    assert config_error(path, load_routing).startswith(f"{path}: cannot read configuration")


def test_metrics_and_alerts_default_to_a_loopback_endpoint_on_9464_and_generous_limits(tmp_path):
    cfg = load_config(write(tmp_path / "dicomnode.yaml", ""))

    assert (cfg.metrics.enabled, cfg.metrics.host, cfg.metrics.port) == (True, "127.0.0.1", 9464)
    assert (cfg.alerts.unreachable_after_s, cfg.alerts.stuck_after_s) == (600.0, 900.0)
    shipped = load_config(EMBEDDED_CONFIG)
    assert shipped.metrics == cfg.metrics and shipped.alerts == cfg.alerts, "the file states the defaults"


@pytest.mark.parametrize(
    ("section", "key", "given"),
    [("metrics", "port", 0), ("metrics", "enabled", "sometimes"), ("alerts", "stuck_after_s", 0)],
)
def test_bad_metrics_or_alerts_value_is_rejected_naming_the_key(tmp_path, section, key, given):
    path = write(tmp_path / "dicomnode.yaml", {section: {key: given}})
    assert_names(config_error(path), path, f"{section}.{key}")


# -- environment variables (containers) ---------------------------------------------------------

PACS = {"name": "pacs", "host": "pacs.example.org", "port": 104, "ae_title": "PACS"}


def test_environment_variables_override_keys_typed_by_the_schema(tmp_path):
    path = write(tmp_path / "dicomnode.yaml", {"scp": {"port": 11112}, "destinations": [PACS]})
    environ = {
        "DICOMNODE_SCP__PORT": "11113",
        "DICOMNODE_SCP__AE_TITLE": "NO",  # text for a text key: YAML would have made it False
        "DICOMNODE_SCP__ALLOWED_CALLING_AES": "[PACS, CT1]",
        "DICOMNODE_SCP__REQUIRE_CALLED_AE": "false",
        "DICOMNODE_DESTINATIONS__0__HOST": "10.1.2.3",
        "DICOMNODE_PROMPT_SET_VERSIONS__cxr": "20261125-101500",  # a mapping's key keeps its case
        "DICOMNODE_LOG_FORMAT": "json",
        "DICOMNODE_METRICS__ENABLED": "no",
        "DICOMNODE_CONFIG": "/etc/dicomnode/dicomnode.yaml",  # the CLI's, not a key
        "PATH": "/usr/bin",
    }

    cfg = load_config(path, environ)

    assert (cfg.scp.port, cfg.scp.ae_title, cfg.scp.allowed_calling_aes) == (11113, "NO", ("PACS", "CT1"))
    assert cfg.scp.require_called_ae is False and cfg.metrics.enabled is False
    assert cfg.destinations[0].host == "10.1.2.3" and cfg.destinations[0].port == 104
    assert cfg.prompt_set_versions == {"cxr": "20261125-101500"}
    assert cfg.log_format == "json"
    assert load_config(path, {}).scp.port == 11112, "the file is not changed"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "DICOMNODE_SCP__PORT",
            "70000",
            "environment variable DICOMNODE_SCP__PORT: scp.port: Input should be less",
        ),
        ("DICOMNODE_SCP__PORT", "[1", "environment variable DICOMNODE_SCP__PORT: not a YAML value"),
        (
            "DICOMNODE_SCPP__PORT",
            "1",
            "environment variable DICOMNODE_SCPP__PORT: the configuration has no key 'scpp'",
        ),
        (
            "DICOMNODE_SCP__PORTS",
            "1",
            "environment variable DICOMNODE_SCP__PORTS: scp has no key 'ports' (host,",
        ),
        ("DICOMNODE_SCP__PORT__X", "1", "environment variable DICOMNODE_SCP__PORT__X: scp.port is a value"),
        (
            "DICOMNODE_SOURCE",
            "x",
            "environment variable DICOMNODE_SOURCE: the configuration has no key 'source'",
        ),
        (
            "DICOMNODE_DESTINATIONS__1__HOST",
            "h",
            "environment variable DICOMNODE_DESTINATIONS__1__HOST: destinations has entries 0 to 0, not 1",
        ),
        (
            "DICOMNODE_DESTINATIONS__X__HOST",
            "h",
            "environment variable DICOMNODE_DESTINATIONS__X__HOST: destinations is a list",
        ),
    ],
)
def test_an_environment_variable_that_is_wrong_is_named(tmp_path, variable, value, message):
    path = write(tmp_path / "dicomnode.yaml", {"destinations": [PACS]})

    with pytest.raises(ConfigError) as caught:
        load_config(path, {variable: value})

    assert str(caught.value).startswith(message), str(caught.value)


def test_a_node_listens_on_the_port_its_environment_gives(tmp_path, tiny_architecture):
    from tests.conftest import free_port, start_node, stop_process, write_node_config

    in_file, from_environment = free_port(), free_port()
    config = write_node_config(tmp_path, tiny_architecture, scp_port=in_file)

    node = start_node(config, from_environment, env={"DICOMNODE_SCP__PORT": str(from_environment)})
    try:
        assert node.process.poll() is None
    finally:
        stop_process(node.process)


def _keys(schema: type, prefix: str = "") -> set[str]:
    """Every key of a configuration schema, as dotted paths (list entries and mappings as *)."""
    from pydantic import BaseModel

    from dicomnode.environment import unwrap

    found = set()
    for name, field in schema.model_fields.items():
        if name == "source":
            continue
        path = f"{prefix}{name}"
        found.add(path)
        for kind in unwrap(field.annotation):
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                found |= _keys(kind, path + ".")
            elif getattr(kind, "__origin__", None) is tuple:
                for item in unwrap(kind.__args__[0]):
                    if isinstance(item, type) and issubclass(item, BaseModel):
                        found |= _keys(item, path + ".*.")
    return found


def test_every_key_is_documented_in_the_embedded_example():
    text = (REPO / "conf" / "dicomnode.yaml").read_text()
    # A key is documented where it is written, set or commented out, as `key:` or `{key: ...`.
    written = set(re.findall(r"(?:^|[{,\s])([a-z_]+):", text, flags=re.MULTILINE))

    missing = sorted(path for path in _keys(NodeConfig) if path.rsplit(".", 1)[-1] not in written)

    assert not missing, f"conf/dicomnode.yaml does not show: {', '.join(missing)}"


PRODUCTION_CONFIG = REPO / "conf" / "dicomnode.production.yaml"


def _set_keys(content: object, prefix: str = "") -> set[str]:
    """The keys a parsed file sets, as dotted paths in the form of `_keys` (list entries as *)."""
    found = set()
    if isinstance(content, dict):
        for key, value in content.items():
            found.add(f"{prefix}{key}")
            found |= _set_keys(value, f"{prefix}{key}.")
    elif isinstance(content, list):
        for item in content:
            found |= _set_keys(item, f"{prefix}*.")
    return found


def test_the_production_example_sets_every_key_or_shows_its_alternative_in_a_comment():
    text = PRODUCTION_CONFIG.read_text()
    written = _set_keys(yaml.safe_load(text))
    # Alternatives that cannot be set together (a secret from a file or a variable; TLS on or
    # off) are shown commented out: `# key:` or `{key: ...}` after a `#`.
    commented = {
        key for line in text.splitlines() for key in re.findall(r"([a-z_]+):", line.partition("#")[2])
    }

    missing = sorted(
        path for path in _keys(NodeConfig) if path not in written and path.rsplit(".", 1)[-1] not in commented
    )

    assert not missing, f"{PRODUCTION_CONFIG.name} neither sets nor shows: {', '.join(missing)}"
    assert {"destinations.*.stow_url", "destinations.*.auth.bearer.file"} <= written
    assert {"destinations.*.auth.basic.password.env", "scp.allowed_peers", "metrics.port"} <= written


def test_dicomnode_config_accepts_the_production_example_with_its_files_in_place(tmp_path, tiny_architecture):
    from typer.testing import CliRunner

    from dicomnode.cli import app
    from tests.pki import certificate_authority

    ca = certificate_authority(tmp_path / "tls", "hospital-ca")
    token = tmp_path / "archive.token"
    token.write_text("a-bearer-token\n")
    token.chmod(0o600)
    # The example's paths on this machine, as a container would set them.
    env = {
        "DICOMNODE_STATE_DIR": str(tmp_path / "var"),
        "DICOMNODE_PROMPTS_DIR": str(REPO / "prompts"),
        "DICOMNODE_ROUTING": str(REPO / "conf" / "routing.yaml"),
        "DICOMNODE_MODEL__ARCHITECTURE": tiny_architecture.stem,
        "DICOMNODE_MODEL__ARCHITECTURE_CONFIG": str(tiny_architecture),
        "DICOMNODE_DESTINATIONS__1__AUTH__BEARER__FILE": str(token),
        "DICOMNODE_DESTINATIONS__1__TLS__CA_CERTIFICATES": str(ca.certificate),
        "RESEARCH_PACS_PASSWORD": "a-password",
    }

    result = CliRunner().invoke(app, ["config", "--config", str(PRODUCTION_CONFIG)], env=env)

    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{PRODUCTION_CONFIG}: valid; ")
    web = "hospital.example/dicom-web"
    assert lines[-2:] == [
        f"  destination archive-web: STOW-RS to https://archive.{web}, bearer authentication",
        f"  destination research-web: STOW-RS to https://research.{web}, basic authentication",
    ]
    assert "a-bearer-token" not in result.output and "a-password" not in result.output

    without_password = CliRunner().invoke(
        app, ["config", "--config", str(PRODUCTION_CONFIG)], env=env | {"RESEARCH_PACS_PASSWORD": None}
    )
    assert without_password.exit_code == 2
    assert (
        "destinations.2.auth.basic.password.env: environment variable RESEARCH_PACS_PASSWORD"
        in without_password.stderr
    )
