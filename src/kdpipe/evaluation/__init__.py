"""The parts of the evaluate step: one interface over PyTorch and ONNX models (``models``),
latency timing (``latency``), the teacher's ONNX and int8 copies (``teacher_onnx``), and the
table, plot data and charts (``report``). ``kdpipe.steps.evaluate`` composes them."""
