"""Export a model dir to other runtimes: ONNX (one KV-cached decoder graph, optionally int8), with parity checks."""
