"""edgetune.onnx."""
