"""The engine deployment: one vLLM engine per replica with vLLM's own OpenAI app in-process, how
its engine core process starts, vLLM's request models read for the ingress, the demo model, and
the fake engine that stands in for it in `make test-fast`."""
