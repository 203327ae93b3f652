"""LoRA adapters loaded at runtime (VLLM_ALLOW_RUNTIME_LORA_UPDATING): the registry every engine
replica reads, the engine side (vLLM's own load and unload, Serve's model multiplexing) and the
ingress's fan-out to every replica."""
