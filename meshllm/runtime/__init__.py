"""onnxruntime block runner, KV cache slots, sampling. No asyncio."""
