"""embedserve: image embeddings and similarity search over HTTP, on ONNX Runtime.

Serving never imports torch: it needs only onnxruntime, faiss, pillow, numpy and bentoml.
"""

__version__ = "0.1.0"
