"""deployments.engine.cpu_amx: registered as a vLLM general plugin, and it grants AMX where the CPU
has it. (The proof that vLLM's workers need it is tests/test_guarded.py: LoRA-enabled replicas that
died with SIGILL on their first short completion before it.)"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

from deployments.engine.cpu_amx import request_amx_permission


def test_the_plugin_is_registered_where_vllm_loads_general_plugins():
    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins["cpu_amx_permission"] == "deployments.engine.cpu_amx:request_amx_permission"
    assert entry_points(group="vllm.general_plugins")["cpu_amx_permission"].load() is request_amx_permission


def test_a_fresh_process_gets_amx_exactly_when_the_cpu_has_it_and_asking_twice_is_harmless():
    code = ("import torch; from deployments.engine.cpu_amx import request_amx_permission as ask; "
            "print(torch.cpu._is_amx_tile_supported(), ask(), ask())")
    has_amx, first, second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                            check=True, timeout=120).stdout.split()
    assert first == second == has_amx
