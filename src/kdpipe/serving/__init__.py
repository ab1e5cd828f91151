"""Everything a registered model ships: the Predictor and what it needs, nothing more.

- ``predictor``: ``Predictor`` (raw text in, labels and probabilities out) over an exported
  or quantized model folder, and that folder's format (file names, labels, tokenizer);
- ``ort``: ONNX Runtime sessions, telemetry off;
- ``word_cache``: token ids of frequent words, so tokenization leaves the hot path;
- ``padding``: length-sorted batches and right-padding of token ids;
- ``pyfunc_model`` and ``model_code``: the MLflow pyfunc model (``TextClassifier``) and the
  file MLflow runs to load it.

The MLflow model ships this package whole (``kdpipe.registry.pyfunc``), so nothing here
imports PyTorch, the training code or the pipeline's steps (``tests`` check the imports); a
folder holding a PyTorch int8 student is the one case that reaches into
``kdpipe.compression``, on demand. This ``__init__`` imports nothing, so importing one module
costs only that module.
"""
