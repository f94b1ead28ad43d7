"""The `dicomnode` command: serve the node, and the tools an administrator reaches for."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from dicomnode.config import DEFAULT_CONFIG, ConfigError, ScpConfig, default_config, load_config, load_routing

# Tracebacks never show local variables: they could hold patient data.
app = typer.Typer(
    no_args_is_help=True, add_completion=False, help=__doc__, pretty_exceptions_show_locals=False
)

ConfigOption = Annotated[
    Path,
    typer.Option("--config", "-c", envvar="DICOMNODE_CONFIG", help="dicomnode.yaml to use."),
]
CallingAE = Annotated[str, typer.Option("--aet", help="Our (calling) AE title.")]
CalledAE = Annotated[str, typer.Option("--aec", help="The peer's (called) AE title.")]
Timeout = Annotated[float, typer.Option("--timeout", help="Network timeout in seconds.")]
# Checked here: pynetdicom reports an out-of-range port as a traceback in its own thread.
PeerPort = Annotated[int, typer.Argument(min=1, max=65535, help="The peer's TCP port.")]
TlsCa = Annotated[
    Path | None, typer.Option("--tls-ca", help="Speak DICOM TLS; trust these CAs (PEM) for the peer.")
]
TlsCertificate = Annotated[Path | None, typer.Option("--tls-cert", help="Our client certificate (PEM).")]
TlsKey = Annotated[Path | None, typer.Option("--tls-key", help="The key of --tls-cert (PEM, 0600).")]


def _peer(host: str, port: int, aec: str, timeout: float, ca: Path | None, certificate, key):
    """The peer to echo or send to, over DICOM TLS when --tls-ca is given; exit 2 on a bad option."""
    from pydantic import ValidationError

    from dicomnode.config import DestinationTlsConfig
    from dicomnode.net.scu import Peer
    from dicomnode.net.tls import ClientTls

    if ca is None:
        if certificate is not None or key is not None:
            typer.echo("--tls-cert and --tls-key need --tls-ca", err=True)
            raise typer.Exit(2)
        return Peer(host, port, aec, timeout)
    try:
        settings = DestinationTlsConfig(ca_certificates=ca, certificate=certificate, private_key=key)
        tls = ClientTls(settings, "tls")
        tls.check()
    except ValidationError:
        typer.echo("give both --tls-cert and --tls-key, or neither", err=True)
        raise typer.Exit(2) from None
    except ConfigError as exc:
        typer.echo(f"cannot use TLS: {exc}", err=True)
        raise typer.Exit(2) from None
    return Peer(host, port, aec, timeout, tls)


def _config(path: Path):
    """The configuration at `path`; without --config and $DICOMNODE_CONFIG outside a folder holding
    conf/dicomnode.yaml, the embedded default shipped with dicomnode (saying so on stderr)."""
    if path == DEFAULT_CONFIG and not path.is_file():
        path = default_config()
        typer.echo(f"no {DEFAULT_CONFIG} here: using the embedded default {path}", err=True)
    try:
        return load_config(path)
    except ConfigError as exc:
        typer.echo(f"configuration error:\n{exc}", err=True)
        raise typer.Exit(2) from None


def _write_figures(document: dict, json_file: Path | None) -> None:
    """Write a command's figures as JSON when `--json` was given, and say where."""
    if json_file is None:
        return
    from dicomnode.bench import write_json

    write_json(document, json_file)
    typer.echo(f"wrote {json_file}")


@app.command()
def serve(config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Run the node: receive studies, classify them, send the results to the destinations."""
    from dicomnode.node import StartupError
    from dicomnode.node import serve as run

    cfg = _config(config)
    try:
        load_routing(cfg.routing)
    except ConfigError as exc:
        typer.echo(f"configuration error:\n{exc}", err=True)
        raise typer.Exit(2) from None
    try:
        run(cfg)
    except StartupError:  # already logged, to stderr too
        raise typer.Exit(2) from None


@app.command()
def echo(
    host: str,
    port: PeerPort,
    aet: CallingAE = "DICOMNODE",
    aec: CalledAE = "ANY-SCP",
    timeout: Timeout = 30.0,
    tls_ca: TlsCa = None,
    tls_cert: TlsCertificate = None,
    tls_key: TlsKey = None,
) -> None:
    """C-ECHO a DICOM node: exit 0 when it answers success."""
    from dicomnode.net.scu import AssociationFailed
    from dicomnode.net.scu import echo as c_echo

    peer = _peer(host, port, aec, timeout, tls_ca, tls_cert, tls_key)
    try:
        status = c_echo(peer, calling_ae=aet)
    except AssociationFailed as exc:
        typer.echo(f"echo failed: {exc}", err=True)
        raise typer.Exit(1) from None
    except ValueError as exc:  # pynetdicom refuses an invalid AE title before connecting
        typer.echo(f"cannot echo: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"C-ECHO {aec}@{host}:{port}: status 0x{status:04X}")
    raise typer.Exit(0 if status == 0 else 1)


@app.command()
def send(
    host: str,
    port: PeerPort,
    files: Annotated[list[Path], typer.Argument(help="DICOM files or folders to send.")],
    aet: CallingAE = "DICOMNODE",
    aec: CalledAE = "ANY-SCP",
    timeout: Timeout = 30.0,
    tls_ca: TlsCa = None,
    tls_cert: TlsCertificate = None,
    tls_key: TlsKey = None,
) -> None:
    """C-STORE files (folders are walked) to a DICOM node; exit 1 if any was refused."""
    from pydicom.errors import InvalidDicomError

    from dicomnode.net.scu import AssociationFailed, store

    peer = _peer(host, port, aec, timeout, tls_ca, tls_cert, tls_key)

    paths = [
        p for f in files for p in (sorted(x for x in f.rglob("*") if x.is_file()) if f.is_dir() else [f])
    ]
    if not paths:
        typer.echo("no files to send", err=True)
        raise typer.Exit(2)
    from dicomnode.progress import progress

    bar = progress(paths, description="send", unit="file")
    try:
        outcomes = store(peer, paths, calling_ae=aet, sent=lambda _: bar.update())
    except AssociationFailed as exc:  # first: it is a ConnectionError, hence an OSError
        typer.echo(f"send failed: {exc}", err=True)
        raise typer.Exit(1) from None
    except (InvalidDicomError, OSError, ValueError) as exc:
        typer.echo(f"cannot send: {exc}", err=True)
        raise typer.Exit(2) from None
    finally:
        bar.close()
    for outcome in outcomes:
        status = "no status" if outcome.status is None else f"0x{outcome.status:04X}"
        typer.echo(f"{outcome.path}: {status} {outcome.comment}".rstrip())
    failed = sum(not o.ok for o in outcomes)
    typer.echo(f"{len(outcomes) - failed} sent, {failed} failed")
    raise typer.Exit(1 if failed else 0)


@app.command()
def route(
    files: Annotated[list[Path], typer.Argument(help="DICOM files to route.")],
    config: ConfigOption = DEFAULT_CONFIG,
    calling_ae: Annotated[str, typer.Option(help="Calling AE title to route as.")] = "",
) -> None:
    """Print which prompt set each file would go to, and why; exit 1 if a file is unreadable."""
    from pydicom.errors import InvalidDicomError

    from dicomnode.routing import decide, read_header

    cfg = _config(config)
    try:
        routing = load_routing(cfg.routing)
    except ConfigError as exc:
        typer.echo(f"configuration error:\n{exc}", err=True)
        raise typer.Exit(2) from None
    unreadable = 0
    for path in files:
        try:
            decision = decide(routing, read_header(path), calling_ae)
        except (OSError, InvalidDicomError) as exc:
            typer.echo(f"{path}: unreadable: {exc}", err=True)
            unreadable += 1
            continue
        target = decision.prompt_set or "(ignored)"
        typer.echo(f"{path}: {target}: {decision.reason}")
    raise typer.Exit(1 if unreadable else 0)


@app.command()
def infer(
    files: Annotated[list[Path], typer.Argument(help="DICOM files to classify.")],
    config: ConfigOption = DEFAULT_CONFIG,
    prompt_set: Annotated[
        str | None, typer.Option(help="Use this prompt set instead of routing each file.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Also write the SR and SC of each study into this folder.")
    ] = None,
) -> None:
    """Classify files offline, as the node would, and print each finding; nothing is sent."""
    from collections import defaultdict

    from pydicom.errors import InvalidDicomError

    from dicomnode.engine import Engine
    from dicomnode.model.backbone import BackboneError
    from dicomnode.model.promptset import PromptSetError, load_prompt_set
    from dicomnode.pipeline import classify
    from dicomnode.privacy import uid_tag, withhold_warning_texts
    from dicomnode.results import write_results
    from dicomnode.routing import decide, read_header

    withhold_warning_texts()
    cfg = _config(config)
    groups: dict[str, list[Path]] = defaultdict(list)
    try:
        routing = load_routing(cfg.routing)
        for path in files:
            if prompt_set is not None:
                groups[prompt_set].append(path)
                continue
            decision = decide(routing, read_header(path))
            if decision.prompt_set is None:
                typer.echo(f"{path}: not classified: {decision.reason}")
            else:
                groups[decision.prompt_set].append(path)
        prompt_sets = {name: load_prompt_set(cfg.prompts_dir / name) for name in groups}
        engine = Engine.from_config(cfg.model)
    except (ConfigError, PromptSetError, BackboneError, OSError, InvalidDicomError) as exc:
        typer.echo(f"cannot classify: {exc}", err=True)
        raise typer.Exit(2) from None
    if engine.backbone.demo:
        typer.echo("DEMO model (random weights): these numbers have NO clinical meaning", err=True)
    classified_any = False
    for name, paths in groups.items():
        result = classify(engine, prompt_sets[name], paths)
        for path, problem in result.problems.items():
            typer.echo(f"{path}: not classified: {problem}")
        for path, sample, prediction in zip(result.paths, result.samples, result.predictions, strict=True):
            classified_any = True
            where = "" if prediction.frame is None else f" frame {prediction.frame}"
            if sample.region is not None:
                where += f" tile at column {sample.region.column}, row {sample.region.row}"
            typer.echo(f"{path}{where}: prompt set {name}")
            for finding, probability in zip(
                prompt_sets[name].findings, prediction.probabilities, strict=True
            ):
                verdict = "PRESENT" if probability >= finding.threshold else "absent"
                typer.echo(f"  {finding.name:24s} {probability:6.3f}  {verdict}")
        if out is not None:
            by_study: dict[str, list[int]] = defaultdict(list)
            for index, source in enumerate(result.sources):
                by_study[str(source.StudyInstanceUID)].append(index)
            for study, indices in by_study.items():
                written = write_results(
                    out_dir=out / uid_tag(study),
                    sources=[result.sources[i] for i in indices],
                    samples=[result.samples[i] for i in indices],
                    predictions=[result.predictions[i] for i in indices],
                    findings=prompt_sets[name].findings,
                    procedure=prompt_sets[name].procedure,
                    model=engine.identity(prompt_sets[name]),
                    aggregation=prompt_sets[name].aggregation,
                )
                for path in written.paths:
                    typer.echo(f"wrote {path}")
    raise typer.Exit(0 if classified_any else 1)


def _journal(cfg, *, read_only: bool):
    """The node's journal as it is (no schema change, no new file or mode); exit 2 when unusable."""
    from dicomnode.spool import Spool, SpoolError

    try:
        return Spool.open_existing(cfg.state_dir, read_only=read_only)
    except SpoolError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


@app.command()
def status(
    config: ConfigOption = DEFAULT_CONFIG,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object, for monitoring.")] = False,
    last: Annotated[int, typer.Option(min=1, max=1000, help="How many recent studies to list.")] = 10,
) -> None:
    """The live node: its health, the queue of each destination, the last studies, the problems.

    Reads the journal without changing it (safe beside the running node, as root too); studies
    are named by hashed UID only.
    """
    import json

    from dicomnode.status import render

    cfg = _config(config)
    if not (cfg.state_dir / "journal.sqlite").exists():
        if as_json:
            typer.echo(json.dumps({"journal": False}))
        else:
            typer.echo(f"no journal in {cfg.state_dir}: the node has not run yet")
        raise typer.Exit(0)
    spool = _journal(cfg, read_only=True)
    if not as_json:
        render(cfg, spool, limit=last)
        return
    counts = spool.counts()
    problems = [{"kind": k, "study": s, "reason": r} for k, s, r in spool.problems()]
    typer.echo(json.dumps({"journal": True, **counts, "problems": problems}, sort_keys=True))


@app.command()
def requeue(
    config: ConfigOption = DEFAULT_CONFIG,
    destination: Annotated[str | None, typer.Option(help="Only deliveries to this destination.")] = None,
    studies: Annotated[
        bool, typer.Option("--studies", help="Requeue failed studies instead of dead deliveries.")
    ] = False,
) -> None:
    """Put dead-letter deliveries back in the queue, e.g. after fixing a destination.

    With --studies, put failed studies back instead, e.g. after fixing what made them fail:
    the running node processes them again.
    """
    from dicomnode.privacy import uid_tag

    cfg = _config(config)
    known = {d.name for d in cfg.destinations}
    if studies and destination is not None:
        typer.echo("--studies requeues studies, --destination deliveries: give one of them", err=True)
        raise typer.Exit(2)
    if destination is not None and destination not in known:
        typer.echo(
            f"no destination {destination!r} in {cfg.source} (known: {', '.join(sorted(known))})", err=True
        )
        raise typer.Exit(2)
    if not (cfg.state_dir / "journal.sqlite").exists():
        typer.echo(f"no journal in {cfg.state_dir}: the node has not run yet")
        raise typer.Exit(0)
    spool = _journal(cfg, read_only=False)
    if not studies:
        count = spool.requeue_dead(destination)
        typer.echo(f"{count} dead deliveries requeued")
        return
    requeued = spool.requeue_failed()
    typer.echo(f"{len(requeued)} failed studies requeued")
    for study in requeued:
        typer.echo(f"  study {uid_tag(study)}")


@app.command()
def reprocess(
    study_instance_uids: Annotated[list[str], typer.Argument(help="Study Instance UIDs to process again.")],
    config: ConfigOption = DEFAULT_CONFIG,
) -> None:
    """Process studies again with the prompt sets served now (the node may be running).

    For a study that finished, failed or was ignored: after a prompt-set upgrade, or once the
    cause of a failure is fixed. Results from other inputs or another model supersede the
    report the PACS holds; the same inputs and model send the same report again. Studies are
    named in the output by hashed UID only. Exits 1 if a study is not in the journal.
    """
    from dicomnode.privacy import uid_tag
    from dicomnode.spool import is_valid_uid

    for index, uid in enumerate(study_instance_uids, start=1):
        if not is_valid_uid(uid):
            typer.echo(f"argument {index} is not a valid Study Instance UID (digits and dots)", err=True)
            raise typer.Exit(2)
    cfg = _config(config)
    if not (cfg.state_dir / "journal.sqlite").exists():
        typer.echo(f"no journal in {cfg.state_dir}: the node has not run yet", err=True)
        raise typer.Exit(1)
    spool = _journal(cfg, read_only=False)
    missing = False
    for uid in study_instance_uids:
        previous = spool.reprocess(uid)
        if previous is None:
            missing = True
            typer.echo(f"study {uid_tag(uid)}: not in the journal (never received, or purged)", err=True)
        elif previous == "receiving":
            typer.echo(f"study {uid_tag(uid)}: already waiting to be processed")
        else:
            typer.echo(f"study {uid_tag(uid)}: was {previous}, queued to be processed again")
    raise typer.Exit(1 if missing else 0)


@app.command("config")
def check_config(config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Validate dicomnode.yaml, routing.yaml and the prompt sets the rules name, on the backbone.

    Prints each served prompt set with its method and how many parameters it learned, and
    each side that speaks DICOM TLS once its certificates and keys were loaded.
    """
    from dicomnode.engine import Engine, EngineError
    from dicomnode.model.backbone import BackboneError, load_backbone
    from dicomnode.model.classifier import describe
    from dicomnode.model.promptset import PromptSetError, load_prompt_set
    from dicomnode.net.stow import check_endpoints
    from dicomnode.net.tls import check_tls

    cfg = _config(config)
    problems: list[str] = []

    def check(step: Callable[[], Any], default: Any) -> Any:
        """Run one check; its problem is collected, so that every problem is reported at once."""
        try:
            return step()
        except (ConfigError, PromptSetError, BackboneError, EngineError) as exc:
            problems.append(str(exc))
            return default

    tls = check(lambda: check_tls(cfg), []) + check(lambda: check_endpoints(cfg), [])
    routing = check(lambda: load_routing(cfg.routing), None)
    prompt_sets, seen = [], set()
    for index, rule in enumerate(routing.rules if routing is not None else ()):
        if rule.prompt_set is None or rule.prompt_set in seen:
            continue
        seen.add(rule.prompt_set)
        folder = cfg.prompts_dir / rule.prompt_set
        if not folder.is_dir():
            there = ", ".join(sorted(p.name for p in cfg.prompts_dir.glob("*/") if p.is_dir())) or "none"
            problems.append(
                f"{cfg.routing}: rules.{index}.prompt_set: no prompt set {rule.prompt_set!r} in"
                f" {cfg.prompts_dir} (there: {there})"
            )
            continue
        prompt_sets.append(check(lambda folder=folder: load_prompt_set(folder), None))
    prompt_sets = [p for p in prompt_sets if p is not None]
    # Checked on the CPU: a running node may hold the GPU, and the shapes are the same.
    engine = check(lambda: Engine(load_backbone(cfg.model.model_copy(update={"device": "cpu"}))), None)
    classifiers = []
    if engine is not None:
        classifiers = [
            c for p in prompt_sets if (c := check(lambda p=p: engine.classifier(p), None)) is not None
        ]
    if problems:
        typer.echo("configuration error:\n" + "\n".join(problems), err=True)
        raise typer.Exit(2)
    weights = (
        f" from {cfg.model.checkpoint} (sha256 {engine.backbone.sha256})"
        if cfg.model.checkpoint
        else " (no checkpoint: DEMO model, no clinical meaning)"
    )
    rules = len(routing.rules)
    typer.echo(f"{cfg.source}: valid; {rules} routing rules; model {cfg.model.architecture}{weights}")
    for line in describe(classifiers):
        typer.echo(f"  prompt set {line}")
    for line in tls:
        typer.echo(f"  {line}")


@app.command("train")
def train_command(
    modality: Annotated[str, typer.Option(help="The prompt set to learn: cxr, oct, pathology.")],
    data: Annotated[
        Path,
        typer.Option(help="Dataset folder (ChestX-ray14, DICOM + labels.csv, image folders, tiles.csv)."),
    ],
    config: ConfigOption = DEFAULT_CONFIG,
    method: Annotated[
        str | None, typer.Option(help="vpt, dpt or linear-probe (default: the training YAML's).")
    ] = None,
    shots: Annotated[
        int | None, typer.Option(min=1, help="Few-shot: this many training images per class.")
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs (default: the training YAML's).")] = None,
    base_classes: Annotated[
        int | None, typer.Option(min=1, help="Base-to-novel: learn from the first N classes' labels only.")
    ] = None,
    nproc_per_node: Annotated[
        int, typer.Option(min=1, help="Processes (GPUs) on this host, via torchrun.")
    ] = 1,
    out: Annotated[
        Path | None, typer.Option(help="Write the version here instead of prompts/<modality>/<version>.")
    ] = None,
    train_config: Annotated[
        Path | None, typer.Option(help="Training YAML (the seeds' defaults otherwise).")
    ] = None,
) -> None:
    """Learn a new version of a modality's prompt set; a running node picks it up by itself."""
    _require_train_extra()
    import os
    import subprocess
    import sys

    if nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:
        # torchrun starts the processes and their rendezvous; each runs this same command.
        args = [a for a in sys.argv[1:]]
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc_per_node}",
        ]
        raise typer.Exit(subprocess.call([*command, "-m", "dicomnode", *args]))
    from dicomnode.config import inside_installed_package, read_validated
    from dicomnode.train.loop import TrainingConfig
    from dicomnode.train.run import TrainingError, run

    cfg = _config(config)
    if out is None and inside_installed_package(cfg.prompts_dir):
        typer.echo(
            f"cannot train: prompts_dir {cfg.prompts_dir} is inside the installed package, no place for"
            " learned versions: copy it to a folder of your own and name that as prompts_dir, or give --out",
            err=True,
        )
        raise typer.Exit(2)
    try:
        training = read_validated(train_config, TrainingConfig) if train_config else TrainingConfig()
        given = (("method", method), ("shots", shots), ("epochs", epochs), ("base_classes", base_classes))
        overrides = {k: v for k, v in given if v is not None}
        training = TrainingConfig.model_validate({**training.model_dump(), **overrides})
    except ConfigError as exc:
        typer.echo(f"configuration error:\n{exc}", err=True)
        raise typer.Exit(2) from None
    except ValueError as exc:
        typer.echo(f"invalid option: {exc}", err=True)
        raise typer.Exit(2) from None
    bar = _progress_bar()
    try:
        run(modality, data, cfg, training, out, typer.echo, bar)
    except TrainingError as exc:
        typer.echo(f"cannot train: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command("eval")
def eval_command(
    prompt_set: Annotated[str, typer.Option(help="A prompt-set folder, or the name of a served set.")],
    data: Annotated[Path, typer.Option(help="Dataset folder, in any layout `train` reads.")],
    config: ConfigOption = DEFAULT_CONFIG,
    split: Annotated[str, typer.Option(help="train, val or test.")] = "test",
    baselines: Annotated[
        bool, typer.Option(help="Also zero-shot and a linear probe on the same images.")
    ] = False,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Also write the table as JSON here.")
    ] = None,
) -> None:
    """The method x metric table (AUC, sensitivity, specificity, F1, FNR, 95% CIs) of a prompt set."""
    _require_train_extra()
    import tempfile

    from dicomnode.model.backbone import BackboneError, load_backbone
    from dicomnode.model.classifier import build_classifier
    from dicomnode.model.library import PromptSetLibrary
    from dicomnode.model.promptset import PromptSetError, load_prompt_set
    from dicomnode.train.data import DataError, read_dataset
    from dicomnode.train.evaluate import evaluate, markdown

    cfg = _config(config)
    try:
        folder = Path(prompt_set)
        if folder.is_dir():
            chosen = load_prompt_set(folder)
        else:
            chosen = PromptSetLibrary(cfg.prompts_dir, [prompt_set], pins=cfg.prompt_set_versions).get(
                prompt_set
            )
        dataset = read_dataset(data, [f.name for f in chosen.findings])
        backbone = load_backbone(cfg.model.model_copy(update={"precision": "autocast"}))
        extra = {}
        if baselines:
            shipped = load_prompt_set(cfg.prompts_dir / chosen.name)
            extra["zeroshot"] = build_classifier(backbone, shipped)
            extra["linear-probe"] = _linear_probe(backbone, shipped, dataset, Path(tempfile.mkdtemp()))
        rows = evaluate(backbone, chosen, dataset, split, extra)
    except (PromptSetError, DataError, BackboneError, ValueError) as exc:
        typer.echo(f"cannot evaluate: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{chosen.name} {chosen.version} on {data} ({split} split)")
    markdown(rows, typer.echo)
    if backbone.demo:
        typer.echo("DEMO backbone (random weights): these figures have NO clinical meaning")
    _write_figures({"split": split, "results": rows}, json_file)


def _linear_probe(backbone, shipped, dataset, work: Path):
    """A linear head trained on the train split from the zero-shot weights: the probe baseline."""
    import torch
    import yaml

    from dicomnode.model.promptset import PROMPTSET_FILE, load_prompt_set
    from dicomnode.train.loop import Ranks, TrainingConfig, train

    content = yaml.safe_load((shipped.folder / PROMPTSET_FILE).read_text())
    content["classes"] = [c for c in content["classes"] if c["name"] in dataset.classes]
    content.update(
        method="linear-probe", backbone={"architecture": backbone.architecture, "seed": backbone.seed}
    )
    if backbone.sha256:
        content["backbone"] = {"architecture": backbone.architecture, "sha256": backbone.sha256}
    draft = work / shipped.name
    draft.mkdir(parents=True)
    (draft / PROMPTSET_FILE).write_text(yaml.safe_dump(content))
    probe = load_prompt_set(draft, require_tensors=False)
    cfg = TrainingConfig(method="linear-probe", lr_head=1e-2, augment=False, workers=0)
    return train(backbone, probe, dataset, cfg, Ranks(0, 1, torch.device(backbone.device)), work).classifier


def _require_train_extra() -> None:
    """Training needs scikit-learn and matplotlib, which a serving-only install leaves out."""
    import importlib.util

    missing = [m for m in ("sklearn", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        typer.echo(f"{', '.join(missing)} not installed: pip install 'dicomnode[train]'", err=True)
        raise typer.Exit(2)


def _progress_bar():
    """A progress line on a terminal's stderr: epoch, loss, images/s and time left."""
    from dicomnode.progress import progress

    state: dict = {}

    def update(epoch: int, epochs: int, loss: float, rate: float, left: float) -> None:
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = progress(range(epochs), description="train", unit="epoch")
        bar.n = epoch - 1
        bar.set_postfix_str(f"loss {loss:.4f}, {rate:.0f} img/s, {left:.0f} s left")

    return update


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: ratios against a reference in the same run.")
app.add_typer(bench_app, name="bench")


@bench_app.command("receive")
def bench_receive(
    file: Annotated[
        Path | None,
        typer.Option(help="Instance to send (default: CT slices, radiographs, 4 associations at once)."),
    ] = None,
    count: Annotated[int | None, typer.Option(min=1, help="Instances per run (default: 500 and 40).")] = None,
    slice_file: Annotated[
        Path | None,
        typer.Option(
            "--slice",
            exists=True,
            dir_okay=False,
            help="The standard runs' slice (default: pydicom's CT_small.dcm).",
        ),
    ] = None,
    radiograph: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="The standard runs' radiograph (default: pydicom's RG1_UNCR.dcm).",
        ),
    ] = None,
    associations: Annotated[int, typer.Option(min=1, help="With --file: associations at once.")] = 1,
    rounds: Annotated[int, typer.Option(min=1, help="Runs per receiver; the median counts.")] = 3,
    receivers: Annotated[
        list[int] | None,
        typer.Option(
            min=1,
            max=64,
            help="dicomnode's receiving processes (scp.receivers; default: as serve's auto on this"
            " host); repeat to compare counts in one run.",
        ),
    ] = None,
    memory: Annotated[
        list[int] | None,
        typer.Option(help="Instead: peak memory while receiving one instance of this many MB (repeatable)."),
    ] = None,
) -> None:
    """DCMTK storescu -> dicomnode's SCP and spool, against storescu -> DCMTK storescp."""
    from dicomnode.bench import BenchError
    from dicomnode.bench.receive import Scenario, bench_receive_memory, standard_scenarios
    from dicomnode.bench.receive import bench_receive as run

    try:
        if memory:
            bench_receive_memory(memory, typer.echo)
            return
        if file is not None and (slice_file or radiograph):
            raise BenchError(
                "--file runs a scenario of its own; --slice and --radiograph are the standard runs'"
            )
        if file is None:
            scenarios = standard_scenarios(count, slice_file, radiograph)
        else:
            scenarios = [Scenario(file.name, file, count or 50, associations)]
        run(scenarios, rounds, typer.echo, receivers=receivers or [ScpConfig().receiving_processes()])
    except BenchError as exc:
        typer.echo(f"benchmark failed: {exc}", err=True)
        raise typer.Exit(1) from None


@bench_app.command("infer")
def bench_infer(
    config: ConfigOption = DEFAULT_CONFIG,
    architecture: Annotated[
        str | None, typer.Option(help="open_clip architecture (default: the configured model).")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="auto, cpu or cuda (default: the configured one).")
    ] = None,
    precision: Annotated[
        str | None, typer.Option(help="On CUDA: autocast or bf16 (default: the configured one).")
    ] = None,
    batch: Annotated[
        list[int] | None,
        typer.Option(min=1, help="Batch sizes (repeat; default 1 32 256 512 on CUDA, 1 8 on CPU)."),
    ] = None,
    method: Annotated[
        list[str] | None, typer.Option(help="Methods to time (repeat; default all; backbone always runs).")
    ] = None,
    iterations: Annotated[
        int | None, typer.Option(min=1, help="Timed batches per row (default 30 on CUDA, 3 on CPU).")
    ] = None,
    compile_model: Annotated[
        bool, typer.Option("--compile", help="torch.compile each forward first.")
    ] = False,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Also write the figures as JSON here.")
    ] = None,
) -> None:
    """Images/s and latency of each prompting method as a ratio to the bare backbone, same device."""
    from pydantic import ValidationError

    from dicomnode.bench import BenchError
    from dicomnode.bench.infer import ALL_METHODS
    from dicomnode.bench.infer import bench_infer as run
    from dicomnode.config import ModelConfig
    from dicomnode.model.backbone import BackboneError, load_backbone

    cfg = _config(config)
    overrides = {
        k: v for k, v in (("architecture", architecture), ("device", device), ("precision", precision)) if v
    }
    if architecture is not None and architecture != cfg.model.architecture:
        overrides.update(checkpoint=None, architecture_config=None)
    try:
        model = ModelConfig.model_validate({**cfg.model.model_dump(), **overrides})
    except ValidationError as exc:
        error = exc.errors()[0]
        typer.echo(f"invalid --{error['loc'][0]}: {error['msg']} (got {error['input']!r})", err=True)
        raise typer.Exit(2) from None
    methods = tuple(method or ALL_METHODS)
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        typer.echo(f"unknown method {', '.join(unknown)} (known: {', '.join(ALL_METHODS)})", err=True)
        raise typer.Exit(2)
    try:
        backbone = load_backbone(model)
    except BackboneError as exc:
        typer.echo(f"cannot load the backbone: {exc}", err=True)
        raise typer.Exit(2) from None
    cuda = backbone.device.type == "cuda"
    try:
        document = run(
            backbone,
            cfg.prompts_dir / "cxr",
            batch or ([1, 32, 256, 512] if cuda else [1, 8]),
            ("backbone", *methods),
            iterations or (30 if cuda else 3),
            typer.echo,
            compile_model=compile_model,
        )
    except BenchError as exc:
        typer.echo(f"benchmark failed: {exc}", err=True)
        raise typer.Exit(1) from None
    _write_figures(document, json_file)


@bench_app.command("train")
def bench_train_command(
    config: ConfigOption = DEFAULT_CONFIG,
    device: Annotated[
        str | None, typer.Option(help="auto, cpu or cuda (default: the configured one).")
    ] = None,
    batch: Annotated[int, typer.Option(min=1, help="Images per step (the seed's 32).")] = 32,
    steps: Annotated[int, typer.Option(min=1, help="Timed steps per method.")] = 10,
    epoch_images: Annotated[
        int,
        typer.Option(
            help="Also give the time of one epoch of this many images (ChestX-ray14 train_val: 86524)."
        ),
    ] = 86524,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Also write the figures as JSON here.")
    ] = None,
) -> None:
    """Step time and peak memory of VPT, DPT and the linear probe against full fine-tuning."""
    _require_train_extra()

    from dicomnode.bench.train import bench_train
    from dicomnode.model.backbone import BackboneError, load_backbone

    cfg = _config(config)
    update = {"precision": "autocast", **({"device": device} if device else {})}
    try:
        backbone = load_backbone(cfg.model.model_copy(update=update))
    except BackboneError as exc:
        typer.echo(f"cannot load the backbone: {exc}", err=True)
        raise typer.Exit(2) from None
    document = bench_train(backbone, cfg.prompts_dir / "cxr", batch, steps, typer.echo, epoch_images)
    _write_figures(document, json_file)


@bench_app.command("imaging")
def bench_imaging_command(
    config: ConfigOption = DEFAULT_CONFIG,
    device: Annotated[
        str | None, typer.Option(help="auto, cpu or cuda (default: the configured one).")
    ] = None,
    radiograph: Annotated[
        Path | None,
        typer.Option(help="Compressed radiograph to prepare (default: pydicom-data's RG1_J2KR.dcm)."),
    ] = None,
    rounds: Annotated[int, typer.Option(min=1, help="Timed preparations of each input.")] = 3,
    batch: Annotated[int, typer.Option(min=1, help="Batch of the engine's rate.")] = 32,
    slide_side: Annotated[int, typer.Option(min=512, help="Side of the benchmark slide in pixels.")] = 8192,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Also write the figures as JSON here.")
    ] = None,
) -> None:
    """Samples/s of decode + preprocessing per input kind beside the engine's images/s."""

    from dicomnode.bench import BenchError
    from dicomnode.bench.imaging import bench_imaging
    from dicomnode.model.backbone import BackboneError, load_backbone

    cfg = _config(config)
    if radiograph is None:
        from pydicom.data import get_testdata_file

        found = get_testdata_file("RG1_J2KR.dcm", download=False)
        if found is None:
            typer.echo("no --radiograph given and pydicom-data is not installed", err=True)
            raise typer.Exit(2)
        radiograph = Path(found)
    try:
        backbone = load_backbone(cfg.model.model_copy(update={"device": device} if device else {}))
        document = bench_imaging(
            backbone, typer.echo, radiograph=radiograph, rounds=rounds, batch=batch, slide_side=slide_side
        )
    except (BenchError, BackboneError) as exc:
        typer.echo(f"benchmark failed: {exc}", err=True)
        raise typer.Exit(1) from None
    _write_figures(document, json_file)


@bench_app.command("study")
def bench_study_command(
    config: ConfigOption = DEFAULT_CONFIG,
    device: Annotated[
        str | None, typer.Option(help="auto, cpu or cuda (default: the configured one).")
    ] = None,
    count: Annotated[int, typer.Option(min=1, help="Studies to send, one after the other.")] = 20,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Also write the figures as JSON here.")
    ] = None,
) -> None:
    """Receipt-to-SR latency of the whole node (quiet period 0) against the engine alone."""

    from dicomnode.bench import BenchError
    from dicomnode.bench.study import bench_study
    from dicomnode.model.backbone import BackboneError

    cfg = _config(config)
    if device:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"device": device})})
    try:
        document = bench_study(cfg, count, typer.echo)
    except (BenchError, BackboneError) as exc:
        typer.echo(f"benchmark failed: {exc}", err=True)
        raise typer.Exit(1) from None
    _write_figures(document, json_file)
