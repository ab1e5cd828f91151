"""Making a trained student smaller and faster.

- ``pruning``: vocabulary pruning (rows the data never uses), structured pruning (whole
  channels, units or heads removed) and magnitude pruning, and loading a pruned student;
- ``onnx_export``: export to ONNX with the checks and rewrites that keep it fast;
- ``torch_int8``: PyTorch dynamic int8, the alternative to ONNX Runtime's quantizer.

Used by the prune, export, quantize and evaluate steps; imports neither the steps nor the
training code.
"""
