"""Model description, ONNX block building, checkpoint import, tokenizer, numpy reference."""
