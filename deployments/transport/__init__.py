"""How a request and its answer travel between the ingress and an engine replica: the ASGI bridge
into vLLM's app, and the stream channel that carries streamed bodies back."""
