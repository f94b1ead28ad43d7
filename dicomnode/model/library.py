"""The prompt sets a running node serves, swapped atomically when their folder changes.

An administrator updates a prompt set by copying a new promptset.yaml (or tensors) into its
folder while the node runs. A watcher (watchdog) notices, waits for the writes to settle,
loads and checks the new version, and only then swaps it in; a version that does not load or
does not fit the backbone is refused with a logged reason and the last good one keeps serving.
A study therefore always runs on one complete, validated version of its prompt set.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from watchdog.events import (
    EVENT_TYPE_CLOSED_NO_WRITE,
    EVENT_TYPE_OPENED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from dicomnode.model.promptset import PROMPTSET_FILE, PromptSet, load_prompt_set

log = logging.getLogger(__name__)

#: Seconds without a change before a folder is reloaded: editors and copies write in steps.
SETTLE_S = 0.5

#: The name of the watching thread, and of its stage in /healthz and the metrics.
WATCHER = "prompt-watcher"

#: Events of reading, not changing: the library's own reading of a folder raises them (watchdog
#: reports opens on Linux), and reacting would reload it every SETTLE_S for ever, logging a
#: refused version's reason each time.
_READS = frozenset({EVENT_TYPE_OPENED, EVENT_TYPE_CLOSED_NO_WRITE})


def is_change(event: FileSystemEvent) -> bool:
    """True for an event that may change what a folder holds (not a mere open or read)."""
    return event.event_type not in _READS


class PromptSetLibrary:
    """The last valid version of each served prompt set, by name."""

    def __init__(
        self,
        prompts_dir: Path,
        names: Iterable[str],
        check: Callable[[PromptSet], object] = lambda prompt_set: None,
        swapped: Callable[[set[str]], object] = lambda served: None,
        pins: dict[str, str] | None = None,
    ) -> None:
        """Load every named set now (raising PromptSetError if one is unusable).

        `check` is run on every version before it is served (the engine's compatibility
        check and warm-up); an exception from it refuses that version. `swapped` is told the
        sha256 of every version served after each swap (the engine frees the others once no
        study in flight uses them). `pins` maps a set to the one version folder it must serve.
        """
        self.prompts_dir = Path(prompts_dir).resolve()
        self.check = check
        self.swapped = swapped
        self._sets: dict[str, PromptSet] = {}
        self._lock = threading.Lock()
        self._timers: dict[str, threading.Timer] = {}
        self._observer: Observer | None = None
        self.pins = dict(pins or {})
        for name in dict.fromkeys(names):
            self._sets[name] = self._newest(name, None)

    def versions(self, name: str) -> list[Path]:
        """Folders that may serve `name`, newest first: the pinned version if the configuration
        names one, else each learned version (prompts/<name>/<version>/, by name, newest first)
        and then the set's own folder. Hidden folders (runs in progress) never count."""
        folder = self.prompts_dir / name
        if name in self.pins:
            return [folder / self.pins[name]]
        learned = []
        if folder.is_dir():
            learned = sorted(
                (
                    p
                    for p in folder.iterdir()
                    if p.is_dir() and not p.name.startswith(".") and (p / PROMPTSET_FILE).is_file()
                ),
                key=lambda p: p.name,
                reverse=True,
            )
        return [*learned, folder]

    def _newest(self, name: str, current: PromptSet | None) -> PromptSet | None:
        """The newest version that loads and passes the check; None if that is `current`.

        A version that fails is passed over with its reason logged; when none is usable the
        newest one's error is raised.
        """
        first_error: Exception | None = None
        for folder in self.versions(name):
            try:
                candidate = load_prompt_set(folder)
                if current is not None and candidate.sha256 == current.sha256:
                    return None
                self.check(candidate)
                return candidate
            except Exception as exc:  # a refused version: try the one before it
                first_error = first_error or exc
                log.warning("prompt set %s: version in %s not usable: %s", name, folder.name, exc)
        assert first_error is not None
        raise first_error

    def get(self, name: str) -> PromptSet:
        """The version of `name` to use now; KeyError if the node does not serve it."""
        with self._lock:
            return self._sets[name]

    def refresh(self, name: str) -> bool:
        """Re-read `name`; swap it in if it changed and is valid. Returns whether it swapped."""
        with self._lock:
            current = self._sets.get(name)
        if current is None:
            return False
        try:
            candidate = self._newest(name, current)
        except Exception as exc:  # any refusal keeps the last good version serving
            log.error("prompt set %s: new version refused, still serving %s: %s", name, current.version, exc)
            return False
        if candidate is None:
            return False
        with self._lock:
            self._sets[name] = candidate
            served = {prompt_set.sha256 for prompt_set in self._sets.values()}
        self.swapped(served)
        log.info(
            "prompt set %s reloaded: version %s sha256 %s",
            name,
            candidate.version,
            candidate.sha256[:12],
        )
        return True

    def _changed(self, name: str) -> None:
        """Debounce: reload `name` once its folder has been quiet for SETTLE_S."""
        with self._lock:
            if name not in self._sets:
                return
            previous = self._timers.get(name)
            if previous is not None:
                previous.cancel()
            timer = threading.Timer(SETTLE_S, self.refresh, args=(name,))
            timer.daemon = True
            self._timers[name] = timer
        timer.start()

    def watch(self) -> None:
        """Start watching the prompts folder for changes to served sets."""
        library = self

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if not is_change(event):
                    return
                for raw in (event.src_path, getattr(event, "dest_path", "")):
                    if not raw:
                        continue
                    path = Path(raw.decode() if isinstance(raw, bytes) else raw)
                    if path.is_relative_to(library.prompts_dir) and path != library.prompts_dir:
                        library._changed(path.relative_to(library.prompts_dir).parts[0])

        self._observer = Observer()
        self._observer.name = WATCHER
        self._observer.schedule(_Handler(), str(self.prompts_dir), recursive=True)
        self._observer.daemon = True
        self._observer.start()

    @property
    def watcher(self) -> threading.Thread | None:
        """The thread that watches the prompts folder (None before `watch`): a stage whose death
        would stop hot reload silently, so the node's liveness tracks it."""
        return self._observer

    def stop(self) -> None:
        """Stop watching; pending reloads are dropped."""
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=10)
        with self._lock:
            for timer in self._timers.values():
                timer.cancel()
