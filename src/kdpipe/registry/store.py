"""The MLflow model registry behind a small interface whose errors are one line each.

Versions are marked with aliases only (``challenger``: the latest registered candidate;
``champion``: the version serving should load, ``models:/<name>@champion``), never with the
deprecated stages. A version carries its key metrics as ``kdpipe.<metric>`` tags (see
``KeyMetrics``), so ``kdpipe models`` and the gate read them without any run.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from kdpipe import owner
from kdpipe.config import Config
from kdpipe.env_vars import environ
from kdpipe.errors import KdpipeError
from kdpipe.registry.gate import KeyMetrics
from kdpipe.serving.ort import first_line
from kdpipe.tracking import redact

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG_PREFIX = "kdpipe."
# MLflow's SQL store keeps at most 5000 characters of a version description.
DESCRIPTION_LIMIT = 5000
# A version's identity: the same key means the same model files, data and settings, so a
# rerun after a failure finds its version instead of registering a duplicate.
CANDIDATE_KEY = f"{TAG_PREFIX}candidate_key"
READY = "READY"
# The promotion lock: a registered model of this name exists while a promotion of ``name``
# runs. MLflow has no compare-and-set on aliases, but creating a registered model is atomic
# on every store (a unique name), so it is the one mutex all kdpipe processes share.
LOCK_SUFFIX = ".promotion-lock"
LOCK_WAIT_S = 600.0
LOCK_STALE_S = 900.0


@dataclass(frozen=True)
class Version:
    """One registered version as kdpipe reads it."""

    name: str
    version: int
    aliases: tuple[str, ...]
    tags: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None
    source: str = ""
    created_ms: int = 0
    description: str = ""
    status: str = READY

    @property
    def metrics(self) -> KeyMetrics:
        return KeyMetrics.from_dict(kdpipe_tags(self.tags))

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def kdpipe_tags(tags: dict[str, str]) -> dict[str, str]:
    """The ``kdpipe.*`` tags without their prefix."""
    return {k.removeprefix(TAG_PREFIX): v for k, v in tags.items() if k.startswith(TAG_PREFIX)}


def metric_tags(metrics: KeyMetrics) -> dict[str, str]:
    """``kdpipe.<metric>`` tags for the measured metrics (retention included)."""
    return {f"{TAG_PREFIX}{k}": _tag_value(v) for k, v in metrics.to_dict().items()
            if v is not None}


class Registry:
    """The model registry at ``uri`` (a tracking URI: SQLite, a server, ...)."""

    def __init__(self, uri: str) -> None:
        from mlflow import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def register(self, name: str, model_uri: str, tags: dict[str, str],
                 description: str) -> int:
        """A new version of ``name`` (created if needed) from a logged ``model_uri``."""
        import mlflow

        # register_model prints two progress lines to stderr; the step's summary says it all.
        with self._errors(f"registering {model_uri} as {name!r}"), \
                contextlib.redirect_stderr(io.StringIO()):
            version = mlflow.register_model(model_uri, name, tags=tags)
            self.client.update_model_version(name, version.version,
                                             description=_fit_description(description))
        return int(version.version)

    def describe(self, name: str, version: int, tags: dict[str, str], description: str) -> None:
        """Set ``tags`` and the description of an existing version (a rerun completing it)."""
        self.set_tags(name, version, tags)
        with self._errors(f"describing version {version} of {name!r}"):
            self.client.update_model_version(name, str(version),
                                             description=_fit_description(description))

    def find(self, name: str, tag: str, value: str) -> Version | None:
        """The newest version of ``name`` whose tag ``tag`` is ``value``, or None (also when
        ``name`` is not registered yet)."""
        try:
            found = [v for v in self.versions(name) if v.tags.get(tag) == value]
        except RegistryNotFound:
            return None
        return found[-1] if found else None

    @contextlib.contextmanager
    def locked(self, name: str, wait_s: float = LOCK_WAIT_S, stale_s: float = LOCK_STALE_S,
               waiting: Callable[[str], None] | None = None) -> Iterator[None]:
        """Hold the promotion lock of ``name`` for the block: one promotion at a time, so a
        gate always compares against the champion that is current when the alias moves.
        Waits up to ``wait_s`` for another holder; a lock older than ``stale_s`` (its holder
        died) is taken over. ``waiting(line)`` hears once who holds it."""
        from mlflow.exceptions import MlflowException

        lock = f"{name}{LOCK_SUFFIX}"
        holder = owner.me()
        deadline = time.monotonic() + wait_s
        told = False
        while True:
            try:
                self.client.create_registered_model(
                    lock, description=f"kdpipe's promotion lock for {name!r}, held by {holder}; "
                    "deleted when that promotion ends (taken over after "
                    f"{stale_s:.0f} s if its holder died)")
                break
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise KdpipeError(f"promotion lock {lock!r} in {redact(self.uri)}: "
                                      f"{first_line(exc)}") from None
            held = self._lock_age(lock)
            if held is None:
                continue  # released meanwhile
            age_s, who = held
            if age_s > stale_s or owner.gone(who):  # its holder died
                with contextlib.suppress(MlflowException):
                    self.client.delete_registered_model(lock)
                continue
            if time.monotonic() > deadline:
                raise KdpipeError(f"registered model {name!r}: another promotion ({who}) has "
                                  f"held {lock!r} for {age_s:.0f} s; retry later, or delete "
                                  "that registered model if no promotion is running")
            if not told and waiting is not None:
                waiting(f"waiting for the promotion of {name!r} by {who} to end")
                told = True
            time.sleep(0.5)
        try:
            yield
        finally:
            with contextlib.suppress(MlflowException):
                self.client.delete_registered_model(lock)

    def _lock_age(self, lock: str) -> tuple[float, str] | None:
        from mlflow.exceptions import MlflowException

        try:
            model = self.client.get_registered_model(lock)
        except MlflowException:
            return None
        who = (model.description or "").partition("held by ")[2].partition(";")[0] or "unknown"
        return time.time() - (model.creation_timestamp or 0) / 1000, who

    def version(self, name: str, version: int) -> Version:
        with self._errors(f"version {version} of registered model {name!r}"):
            return _version(self.client.get_model_version(name, str(version)))

    def versions(self, name: str) -> list[Version]:
        """Every version of ``name``, oldest first; a ``KdpipeError`` if it is not
        registered."""
        aliases = self.aliases(name)
        quoted = name.replace("'", "\\'")
        with self._errors(f"registered model {name!r}"):
            found = self.client.search_model_versions(f"name = '{quoted}'")
        # Search results leave aliases out (SQL store); the registered model has them all.
        return sorted((replace(_version(v), aliases=tuple(sorted(
            a for a, n in aliases.items() if n == int(v.version)))) for v in found),
            key=lambda v: v.version)

    def aliases(self, name: str) -> dict[str, int]:
        """alias -> version of ``name``; a ``KdpipeError`` if it is not registered."""
        with self._errors(f"registered model {name!r}"):
            model = self.client.get_registered_model(name)
        return {alias: int(version) for alias, version in (model.aliases or {}).items()}

    def exists(self, name: str) -> bool:
        try:
            self.aliases(name)
        except RegistryNotFound:
            return False
        return True

    def alias(self, name: str, alias: str) -> int | None:
        """The version ``alias`` points at, or None when it is not set (or ``name`` is not
        registered yet)."""
        try:
            return self.aliases(name).get(alias)
        except RegistryNotFound:
            return None

    def set_alias(self, name: str, alias: str, version: int) -> None:
        with self._errors(f"setting alias {alias!r} of {name!r} to version {version}"):
            self.client.set_registered_model_alias(name, alias, str(version))

    def model_tags(self, name: str) -> dict[str, str]:
        """The registered model's own tags (not a version's)."""
        with self._errors(f"registered model {name!r}"):
            return dict(self.client.get_registered_model(name).tags or {})

    def set_model_tag(self, name: str, key: str, value: str) -> None:
        with self._errors(f"tagging registered model {name!r}"):
            self.client.set_registered_model_tag(name, key, value)

    def set_tags(self, name: str, version: int, tags: dict[str, str]) -> None:
        with self._errors(f"tagging version {version} of {name!r}"):
            for key, value in tags.items():
                self.client.set_model_version_tag(name, str(version), key, value)

    def download(self, name: str, version: int, dst: Path) -> Path:
        """Download version ``version`` into ``dst``; returns its model folder (the folder
        ``kdpipe.serving.predictor.Predictor`` reads), read from MLmodel, never from a pickle."""
        import mlflow

        from kdpipe.serving.pyfunc_model import ARTIFACT

        with self._errors(f"downloading version {version} of {name!r}"), quiet_downloads():
            local = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{version}", dst_path=str(dst),
                tracking_uri=self.uri))
        try:
            conf = yaml.safe_load((local / "MLmodel").read_text(encoding="utf-8"))
            relative = conf["flavors"]["python_function"]["artifacts"][ARTIFACT]["path"]
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            raise KdpipeError(f"version {version} of {name!r} is not a kdpipe model (its MLmodel "
                              f"names no {ARTIFACT!r} artifact)") from None
        return local / relative

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        from mlflow.exceptions import MlflowException

        try:
            yield
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise RegistryNotFound(f"{what}: not found in {redact(self.uri)}"
                                       ) from None
            raise KdpipeError(f"{what} in {redact(self.uri)} failed: "
                              f"{first_line(exc)}") from None


class RegistryNotFound(KdpipeError):
    """A registered model or version that does not exist."""


def open_registry(cfg: Config, create: bool = False) -> Registry:
    """The registry of ``cfg``'s tracking store (``MLFLOW_TRACKING_URI`` wins). With
    ``create`` (registering), MLflow is pointed at the store and the store and experiment are
    made if missing; without (listing, promoting), a store that does not exist is an error
    rather than a new empty one."""
    from kdpipe import tracking

    uri = tracking.tracking_uri(cfg)
    try:
        if create:
            tracking.configure(cfg)
        else:
            tracking.check_reachable(uri)
            local = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None
            if local is not None and not Path(local).is_file():
                raise KdpipeError(f"MLflow store {redact(uri)}: {local} does not exist; "
                                  "nothing is registered there (`kdpipe register` creates it)")
            if local is not None:
                _check_not_moved(cfg, uri)
        return Registry(uri)
    except KdpipeError:
        raise
    except Exception as exc:  # MLflow, SQLAlchemy or requests, depending on the store
        raise KdpipeError(f"MLflow store {redact(uri)} cannot be opened: "
                          f"{first_line(exc)}") from None


def _check_not_moved(cfg: Config, uri: str) -> None:
    from mlflow import MlflowClient

    from kdpipe import tracking

    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(cfg.tracking.experiment)
    if experiment is not None:
        tracking.check_not_moved(cfg, uri, experiment.artifact_location)


@contextlib.contextmanager
def quiet_downloads() -> Iterator[None]:
    """No per-file download bars from MLflow (its artifact progress bar is on by default),
    and none of its INFO chatter (e.g. "Validating input example against model signature")."""
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with environ({"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}):
            yield
    finally:
        logger.setLevel(level)


def _version(found: Any) -> Version:
    return Version(name=found.name, version=int(found.version),
                   aliases=tuple(sorted(found.aliases or ())), tags=dict(found.tags or {}),
                   run_id=found.run_id, source=found.source or "",
                   created_ms=int(found.creation_timestamp or 0),
                   description=found.description or "", status=str(found.status or READY))


def _tag_value(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _fit_description(text: str) -> str:
    if len(text) <= DESCRIPTION_LIMIT:
        return text
    note = "\n\n(cut; the whole card is the run's model_card.md artifact)\n"
    return text[: DESCRIPTION_LIMIT - len(note)] + note
