"""The Kubeflow Pipelines adapter: the same steps as ``kdpipe run``, as a KFP v2 DAG.

- ``components``: one lightweight component per step; each maps its artifacts onto the
  step function's paths and calls it (through ``adapter``), nothing more.
- ``pipeline``: the DAG (sharded soft labels, register under a gate, images, resources),
  ``compile_pipeline`` and ``run_local`` (the same DAG in local subprocesses).
- ``submit``: ``submit`` a run to a Kubeflow Pipelines endpoint.

Importing this package imports neither kfp nor the steps; the modules do.
"""
