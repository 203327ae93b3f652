"""A vLLM general plugin (entry point `vllm.general_plugins`, see pyproject.toml): each vLLM process
asks Linux for Intel AMX tile state before it runs a kernel.

Linux hands AMX tile registers to a process only after it asks (arch_prctl ARCH_REQ_XCOMP_PERM);
the first AMX instruction of a process that did not ask dies with SIGILL. vLLM's CPU attention
picks its AMX kernel for bfloat16 on CPUs that have AMX (Xeon Sapphire Rapids and later) but never
asks: it works only when something else in the worker (a oneDNN matmul) asked first. With LoRA on,
nothing does, and the worker dies on its first short prompt ("Illegal instruction" in
cpu_attention_with_kv_cache; measured with the tiny Llama, bfloat16, `--enable-lora`, a 3-token
prompt). vLLM loads general plugins in every process it starts, its workers included.
"""

from __future__ import annotations


def request_amx_permission() -> bool:
    """Asks for AMX tile state if the CPU has AMX; True when this process may use AMX. Idempotent,
    and a no-op on CPUs without AMX (and so on GPU hosts' CPUs without it)."""
    import torch

    try:
        return bool(torch.cpu._is_amx_tile_supported() and torch._C._cpu._init_amx())
    except AttributeError:  # a torch without these private helpers: nothing vLLM would use AMX from
        return False
