"""The DAG's Kubernetes wiring, from ``kfp.*`` in params.yaml, through kfp-kubernetes.

Everything here lands in the compiled file's platform spec (``platforms.kubernetes``), which
the KFP backend turns into pod specs; ``kfp.local`` has no cluster and never sees it.

- Secrets as environment variables (names only in params, never values): MLflow's
  (``kfp.secrets.mlflow``) and object storage's (``kfp.secrets.storage``) on every task;
  each key optional, so a Secret holds the keys its server needs.
- The checkpoint volume: an existing claim (``kfp.checkpoints.claim``) or one created per
  run and deleted once distill has finished, mounted on the teacher and distill tasks, whose
  ``checkpoint_root`` input points into it: a task retried after losing its pod resumes.
- A memory-backed ``/dev/shm`` on GPU tasks; retries with backoff on the long tasks; node
  selectors, tolerations (GPU nodes' taint by default), image pull secrets; per-task
  timeouts (activeDeadlineSeconds).
"""

from __future__ import annotations

import re
from typing import Any

from kdpipe.config import KfpConfig

MLFLOW_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME",
               "MLFLOW_TRACKING_PASSWORD", "MLFLOW_S3_ENDPOINT_URL")
STORAGE_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
SHM_VOLUME = "dshm"


class Wiring:
    """Applies ``kfp.*``'s cluster settings to the tasks of one pipeline being built."""

    def __init__(self, kfp: KfpConfig) -> None:
        self.kfp = kfp

    def place(self, task: Any, name: str, *, gpu: bool, retried: bool) -> None:
        from kfp import kubernetes

        kfp = self.kfp
        for secret, keys in ((kfp.secrets.mlflow, MLFLOW_KEYS),
                             (kfp.secrets.storage, STORAGE_KEYS)):
            if secret:
                kubernetes.use_secret_as_env(task, secret_name=secret,
                                             secret_key_to_env={k: k for k in keys},
                                             optional=True)
        selector = {**kfp.node_selector, **(kfp.gpu_node_selector if gpu else {})}
        for key, value in selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for toleration in [*kfp.tolerations, *(kfp.gpu_tolerations if gpu else [])]:
            kubernetes.add_toleration(task, key=toleration.key, operator=toleration.operator,
                                      value=toleration.value, effect=toleration.effect)
        if kfp.image_pull_secrets:
            kubernetes.set_image_pull_secrets(task, list(kfp.image_pull_secrets))
        if gpu and kfp.shm_size:
            kubernetes.empty_dir_mount(task, volume_name=SHM_VOLUME, mount_path="/dev/shm",
                                       medium="Memory", size_limit=kfp.shm_size)
        if retried and kfp.retries.attempts:
            task.set_retry(num_retries=kfp.retries.attempts,
                           backoff_duration=seconds(kfp.retries.backoff),
                           backoff_factor=kfp.retries.backoff_factor,
                           backoff_max_duration=seconds(kfp.retries.max_backoff))
        timeout = kfp.timeouts.get(name, 0)
        if timeout:
            kubernetes.set_timeout(task, seconds=timeout)

    def checkpoint_root(self) -> str:
        """The ``checkpoint_root`` input of the resumable tasks ("" without a volume)."""
        return self.kfp.checkpoints.mount_path if self.kfp.checkpoints.enabled else ""

    def checkpoint_volume(self) -> Any:
        """The claim's name: the configured one, or a CreatePVC task's output (None when
        checkpoints are off)."""
        from kfp import kubernetes

        volume = self.kfp.checkpoints
        if not volume.enabled:
            return None
        if volume.claim:
            return volume.claim
        create = kubernetes.CreatePVC(
            pvc_name_suffix="-kdpipe-checkpoints", access_modes=[volume.access_mode],
            size=volume.size, storage_class_name=volume.storage_class or "")
        create.set_display_name("create-checkpoint-volume").set_caching_options(False)
        return create

    def mount_checkpoints(self, task: Any, volume: Any) -> None:
        from kfp import kubernetes

        name = volume if isinstance(volume, str) else volume.outputs["name"]
        kubernetes.mount_pvc(task, pvc_name=name, mount_path=self.kfp.checkpoints.mount_path)

    def release_checkpoints(self, volume: Any, after: Any) -> None:
        """Delete a claim created for this run once ``after`` (distill) has finished; an
        existing claim is the user's to keep."""
        from kfp import kubernetes

        if isinstance(volume, str):
            return
        delete = kubernetes.DeletePVC(pvc_name=volume.outputs["name"]).after(after)
        delete.set_display_name("delete-checkpoint-volume").set_caching_options(False)


def seconds(duration: str) -> str:
    """``"90s"``, ``"2m"``, ``"1h"`` as KFP's duration string in seconds (``"7200s"``)."""
    match = re.fullmatch(r"(\d+)([smh])", duration)
    if not match:
        raise ValueError(f"{duration!r}: expected a duration like 60s, 5m or 1h")
    number, unit = int(match.group(1)), match.group(2)
    return f"{number * {'s': 1, 'm': 60, 'h': 3600}[unit]}s"
