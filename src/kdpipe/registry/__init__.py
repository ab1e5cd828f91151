"""The MLflow model registry: the pyfunc model, the promotion gate, the model card.

- ``pyfunc``: an exported folder as an MLflow pyfunc model (raw text in; label and
  probabilities out), logged as code (no pickle) with kdpipe's serving modules beside it;
- ``gate``: the promotion decision, a pure function of metrics and thresholds;
- ``store``: the registry (versions, tags, aliases, downloads) with one-line errors;
- ``promotion``: ``promote`` (through the gate, or forced) and ``list_models``;
- ``card``: the model card (markdown) a version carries as its description.

Imports nothing: this package ships inside every registered model, where loading it must
not pull in more than serving needs.
"""
