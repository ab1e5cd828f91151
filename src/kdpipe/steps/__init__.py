"""One module per pipeline step, each with ``run(cfg, ..., out_dir) -> StepResult``.

Steps read paths and write into ``out_dir`` and return a ``kdpipe.step_result.StepResult``;
they import neither kfp nor dvc nor mlflow (register reaches MLflow through
``kdpipe.tracking`` and ``kdpipe.registry``).
The CLI, dvc.yaml and the KFP components are thin adapters around them.
"""
