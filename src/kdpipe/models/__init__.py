"""The teacher (``teacher``) and the students: the interface every student answers
(``base.Student``), the architectures (``textcnn``, ``bilstm`` with its ONNX form
``bilstm_onnx``, ``tiny_transformer``), building, saving and loading them by name
(``students``), word vectors taken from the teacher (``teacher_vectors``) and the layer
surgery their structured pruning uses (``surgery``)."""
