"""The parts of the baseline and evaluate steps: one interface over PyTorch and ONNX models
(``models``), latency timing (``latency``), the teacher's ONNX and int8 copies
(``teacher_onnx``), scoring models by name the same way in both steps (``scoring``), and the
table, plot data and charts (``report``). ``kdpipe.steps.baseline`` (the teachers) and
``kdpipe.steps.evaluate`` (the students, beside the teachers) compose them."""
