"""Model manager: loads, serves and unloads model versions the way TF Serving does.

Each model's version folders are polled; the versions its policy aspires to are loaded
(START -> LOADING -> AVAILABLE), and versions no longer aspired are unloaded (UNLOADING -> END)
only once an aspired version is AVAILABLE (availability-preserving switchover). A version that
fails to load ends in END with its error, and the versions already serving keep serving.
Requests hold a reference to the version they run on, so unloading waits for them.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .model_config import ModelEntry, versions_on_disk
from .status import ServingError, from_exception, invalid_argument, not_found

log = logging.getLogger("keras_hps.serving")


class State(enum.IntEnum):
    """ModelVersionStatus.State of tensorflow_serving/apis/get_model_status.proto."""

    UNKNOWN = 0
    START = 10
    LOADING = 20
    AVAILABLE = 30
    UNLOADING = 40
    END = 50


@dataclass(frozen=True)
class VersionStatus:
    """A snapshot of one version's state; `error` is None when its status is OK."""

    version: int
    state: State
    error: ServingError | None = None


class _Version:
    def __init__(self, version: int, path: str) -> None:
        self.version = version
        self.path = path
        self.state = State.START
        self.error: ServingError | None = None
        self.servable: Any = None
        self.refs = 0


class _Model:
    def __init__(self, entry: ModelEntry) -> None:
        self.entry = entry
        self.versions: dict[int, _Version] = {}
        self.lock = threading.Lock()  # one load/unload pass at a time
        self.warned = False


def _label_version(model: _Model | None, label: str) -> int:
    """The version a label names. TF Serving's ServerCore::GetModelVersionForLabel: an unknown
    model and an unknown label are both INVALID_ARGUMENT."""
    if model is None or label not in model.entry.labels:
        raise invalid_argument(f"Unrecognized servable version label: {label}")
    return model.entry.labels[label]


class Handle:
    """A loaded version held for the length of one request (use as a context manager)."""

    def __init__(self, manager: ModelManager, model: str, record: _Version) -> None:
        self._manager = manager
        self._record = record
        self.model = model
        self.version = record.version
        self.servable = record.servable

    def release(self) -> None:
        """Lets the version be unloaded again (idempotent)."""
        if self._record is not None:
            self._manager._release(self._record)
            self._record = None

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


Loader = Callable[[str], Any]


class ModelManager:
    """Serves the models of a config: polling, loading, version resolution, status."""

    def __init__(
        self,
        entries: list[ModelEntry],
        loader: Loader,
        poll_wait_seconds: float = 1.0,
        *,
        load_threads: int = 0,
        unload_threads: int = 0,
        load_retries: int = 0,
        retry_interval_s: float = 60.0,
        labels_for_unavailable: bool = False,
    ) -> None:
        """`load_threads` / `unload_threads`: versions loading / unloading at once (0: one
        at a time, TF Serving's default); a failed load is tried `load_retries` more times,
        `retry_interval_s` apart, while its version is still wanted;
        `labels_for_unavailable`: a config change may point a new label at a version that
        is not AVAILABLE (TF Serving's --allow_version_labels_for_unavailable_models)."""
        self._loader = loader
        self._poll_wait = poll_wait_seconds
        self._load_slots = threading.Semaphore(max(1, load_threads))
        self._unload_slots = threading.Semaphore(max(1, unload_threads))
        self._load_retries = max(0, load_retries)
        self._retry_interval = retry_interval_s
        self._labels_for_unavailable = labels_for_unavailable
        self._cond = threading.Condition(threading.RLock())
        self._config_lock = threading.Lock()  # one config reload at a time
        self._models: dict[str, _Model] = {e.name: _Model(e) for e in entries}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, wait_for_initial_load: bool = True) -> None:
        """Loads what is on disk now (in the background when `wait_for_initial_load` is
        False), then keeps polling every poll_wait_seconds (> 0)."""
        if wait_for_initial_load:
            self.poll_once()
        if self._poll_wait > 0 or not wait_for_initial_load:
            self._thread = threading.Thread(
                target=self._poll_loop,
                args=(not wait_for_initial_load,),
                name="keras-hps-poll",
                daemon=True,
            )
            self._thread.start()

    def _poll_loop(self, poll_first: bool) -> None:
        if poll_first:
            self._poll_background()
        while self._poll_wait > 0 and not self._stop.wait(self._poll_wait):
            self._poll_background()

    def _poll_background(self) -> None:
        """Starts a pass for every model whose previous pass has finished: a model that
        takes long to load never holds up the others."""
        with self._cond:
            models = list(self._models.values())
        for model in models:
            if model.lock.acquire(blocking=False):
                threading.Thread(
                    target=self._pass_and_release,
                    args=(model,),
                    name="keras-hps-load",
                    daemon=True,
                ).start()

    def _pass_and_release(self, model: _Model) -> None:
        try:
            if not self._stop.is_set():
                self._pass(model)
        except Exception:  # keep polling whatever one pass hit
            log.exception("polling %s failed", model.entry.base_path)
        finally:
            model.lock.release()

    def close(self, timeout: float | None = 30.0) -> None:
        """Stops polling and unloads every version (waiting for requests using them)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            models = list(self._models.values())
        for model in models:
            with model.lock:
                for record in list(model.versions.values()):
                    self._unload(record)

    # ------------------------------------------------------------------ polling
    def poll_once(self, names: set[str] | None = None) -> list[tuple[str, int, ServingError]]:
        """One pass over every model, or those in `names` (in parallel): load newly aspired
        versions, then unload versions no longer aspired. Returns (model, version, error) of
        the versions that failed to load."""
        with self._cond:
            models = [m for n, m in self._models.items() if names is None or n in names]
        failures: list[tuple[str, int, ServingError]] = []

        def work(model: _Model) -> None:
            with model.lock:
                failures.extend(self._pass(model))

        threads = [threading.Thread(target=work, args=(m,), daemon=True) for m in models]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return failures

    def _pass(self, model: _Model) -> list[tuple[str, int, ServingError]]:
        name = model.entry.name
        failures = []
        on_disk = versions_on_disk(model.entry.base_path)
        aspired = model.entry.policy.select(set(on_disk))
        if not on_disk and not model.warned:
            model.warned = True
            log.warning(
                "No versions of servable %s found under base path %s. Did you forget "
                "to name your leaf directory as a number (eg. '/1/')?",
                name,
                model.entry.base_path,
            )
        for version in sorted(aspired):
            with self._cond:
                record = model.versions.get(version)
                fresh = record is None or (record.state == State.END and record.error is None)
                if not fresh:
                    continue
                record = _Version(version, on_disk[version])
                model.versions[version] = record
            error = self._load(model, record)
            if error is not None:
                failures.append((name, version, error))
        self._unload_unaspired(model, aspired)
        return failures

    def _load(self, model: _Model, record: _Version) -> ServingError | None:
        name = model.entry.name
        with self._cond:
            record.state = State.LOADING
        attempt = 0
        while True:
            log.info(
                "Loading servable version {name: %s version: %d} from %s",
                name,
                record.version,
                record.path,
            )
            try:
                with self._load_slots:
                    servable = self._loader(record.path)
                break
            except Exception as exc:  # the error is the version's status
                error = from_exception(exc)
                if error.code == "INTERNAL":
                    error = ServingError("UNKNOWN", error.message)
                log.error(
                    "Loading servable version {name: %s version: %d} failed: %s",
                    name,
                    record.version,
                    error.message,
                )
            attempt += 1
            if attempt > self._load_retries or not self._still_wanted(model, record):
                with self._cond:
                    record.state, record.error = State.END, error
                return error
            log.info(
                "Retrying load of servable version {name: %s version: %d} (retry %d of %d)",
                name, record.version, attempt, self._load_retries,
            )
            if self._stop.wait(max(0.0, self._retry_interval)):
                with self._cond:
                    record.state, record.error = State.END, error
                return error
        with self._cond:
            record.servable, record.state = servable, State.AVAILABLE
            self._cond.notify_all()
        log.info(
            "Successfully loaded servable version {name: %s version: %d}", name, record.version
        )
        return None

    def _still_wanted(self, model: _Model, record: _Version) -> bool:
        """Whether the model is still served and its policy still wants the version (a
        retry of a version that a newer one replaced is cancelled, as in TF Serving)."""
        with self._cond:
            if self._models.get(model.entry.name) is not model:
                return False
        on_disk = versions_on_disk(model.entry.base_path)
        return record.version in model.entry.policy.select(set(on_disk))

    def _unload_unaspired(self, model: _Model, aspired: set[int]) -> None:
        with self._cond:
            live = {v: r for v, r in model.versions.items() if r.state == State.AVAILABLE}
            aspired_up = any(v in aspired for v in live)
            doomed = [
                r for v, r in live.items() if v not in aspired and (aspired_up or not aspired)
            ]
        for record in doomed:
            self._unload(record)

    def _unload(self, record: _Version) -> None:
        with self._cond:
            if record.state != State.AVAILABLE:
                return
            record.state = State.UNLOADING
            while record.refs > 0:
                self._cond.wait()
            servable, record.servable = record.servable, None
        try:
            close = getattr(servable, "close", None)
            if close is not None:
                with self._unload_slots:
                    close()
        finally:
            with self._cond:
                record.state = State.END
        log.info("Unloaded servable version %d from %s", record.version, record.path)

    # ------------------------------------------------------------------ config
    def reload_config(self, entries: list[ModelEntry]) -> list[tuple[str, int, ServingError]]:
        """Replaces the served models with `entries` (models left out are unloaded), then
        loads what the new config aspires to. Returns the versions that failed to load."""
        with self._config_lock:
            with self._cond:
                self._check_labels(entries)
                new_names = {e.name for e in entries}
                removed = [m for n, m in self._models.items() if n not in new_names]
                touched = set()  # new or changed models: this call waits for their loads
                for entry in entries:
                    model = self._models.get(entry.name)
                    if model is None:
                        self._models[entry.name] = _Model(entry)
                        touched.add(entry.name)
                    elif model.entry != entry:
                        touched.add(entry.name)
                        if model.entry.base_path != entry.base_path:
                            # another folder: its versions are other versions
                            removed.append(model)
                            self._models[entry.name] = _Model(entry)
                        else:
                            model.entry = entry
                            # a new config retries versions that failed to load
                            failed = [
                                v
                                for v, r in model.versions.items()
                                if r.state == State.END and r.error is not None
                            ]
                            for v in failed:
                                del model.versions[v]
                for model in removed:
                    if self._models.get(model.entry.name) is model:
                        del self._models[model.entry.name]
            for model in removed:
                with model.lock:
                    for record in list(model.versions.values()):
                        self._unload(record)
            # unchanged models keep their state (a load in progress is not waited for)
            return self.poll_once(touched)

    def _check_labels(self, entries: list[ModelEntry]) -> None:
        """A config change may point a label only at an AVAILABLE version (or, with
        labels_for_unavailable, a label that is new or keeps its version), as TF Serving's
        UpdateModelVersionLabelMap requires; otherwise the whole change is refused."""
        for entry in entries:
            model = self._models.get(entry.name)
            for label, version in entry.labels.items():
                old = model.entry.labels.get(label) if model is not None else None
                if self._labels_for_unavailable and old in (None, version):
                    continue
                record = model.versions.get(version) if model is not None else None
                if record is None or record.state != State.AVAILABLE:
                    raise ServingError(
                        "FAILED_PRECONDITION",
                        f"Request to assign label to version {version} of model {entry.name}, "
                        "which is not currently available for inference",
                    )

    def entries(self) -> list[ModelEntry]:
        """The model entries served now."""
        with self._cond:
            return [m.entry for m in self._models.values()]

    # ------------------------------------------------------------------ requests
    def acquire(self, name: str, version: int | None = None, label: str | None = None) -> Handle:
        """The version that serves a request for (name, version | label | latest), held
        until the handle is released. NOT_FOUND when it is not available; INVALID_ARGUMENT for
        a label the model does not have (or a label on a model the server does not know)."""
        with self._cond:
            model = self._models.get(name)
            if label is not None:
                version = _label_version(model, label)
            if version is not None:
                record = model.versions.get(version) if model is not None else None
                if record is None or record.state != State.AVAILABLE:
                    raise not_found(f"Servable not found for request: Specific({name}, {version})")
            else:
                live = (
                    [r for r in model.versions.values() if r.state == State.AVAILABLE]
                    if model is not None
                    else []
                )
                if not live:
                    raise not_found(f"Servable not found for request: Latest({name})")
                record = max(live, key=lambda r: r.version)
            record.refs += 1
            return Handle(self, name, record)

    def _release(self, record: _Version) -> None:
        with self._cond:
            record.refs -= 1
            if record.refs == 0:
                self._cond.notify_all()

    def status(
        self, name: str, version: int | None = None, label: str | None = None
    ) -> list[VersionStatus]:
        """Status of every version of a model, or of one version (by number or label)."""
        with self._cond:
            model = self._models.get(name)
            if label is not None:
                version = _label_version(model, label)
            if model is None or not model.versions:
                raise not_found(f"Could not find any versions of model {name}")
            if version is not None:
                record = model.versions.get(version)
                if record is None:
                    raise not_found(f"Could not find version {version} of model {name}")
                records = [record]
            else:
                records = sorted(model.versions.values(), key=lambda r: -r.version)
            return [VersionStatus(r.version, r.state, r.error) for r in records]

    def wait_until_available(
        self, name: str, version: int | None = None, timeout: float = 60.0
    ) -> bool:
        """Blocks until the model (or one version of it) is AVAILABLE; False on timeout."""

        def ready() -> bool:
            model = self._models.get(name)
            if model is None:
                return False
            return any(
                r.state == State.AVAILABLE and (version is None or r.version == version)
                for r in model.versions.values()
            )

        with self._cond:
            return self._cond.wait_for(ready, timeout)
