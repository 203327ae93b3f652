"""Pure builders for test fixtures around the tiny model: a LoRA adapter and a Hugging Face hub
cache entry. No Ray, no Serve, no network: the tests that serve adapters or resolve hub names
need these on disk, and building them here keeps those tests hermetic and offline."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

LORA_VERSION = "v1"  # bump when the adapter's layout or weights recipe changes
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _attention_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of each attention projection, read from the base config so the
    adapter always matches the model it was built for."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
    }


def build_tiny_lora(base_model: Path, out: Path, *, rank: int = 8, seed: int = 0, scale: float = 0.5) -> Path:
    """Write a PEFT-format LoRA adapter (on q/k/v/o of every layer) for `base_model`, without `peft`.

    PEFT initialises lora_B to zero, which makes an untrained adapter a no-op; here both A and B
    are random (seeded) and B is scaled by `scale`, large next to the tiny model's 0.02-std
    weights, so a request naming the adapter answers visibly differently from the base model.
    Idempotent: an adapter already at `out` built from the same inputs is returned as is (the
    inputs' fingerprint is kept in the safetensors header, where PEFT and vLLM ignore it).
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    base_config_text = (base_model / "config.json").read_text()
    config = json.loads(base_config_text)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model),
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": list(LORA_TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }
    config_text = json.dumps(adapter_config, indent=2, sort_keys=True) + "\n"
    fingerprint = hashlib.sha256(
        json.dumps([LORA_VERSION, base_config_text, config_text, seed, scale]).encode()
    ).hexdigest()
    weights = out / "adapter_model.safetensors"
    if (out / "adapter_config.json").exists() and weights.exists():
        with safe_open(str(weights), framework="pt") as f:
            if (f.metadata() or {}).get("fixture_fingerprint") == fingerprint:
                return out

    dtype = getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float32")
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(config["num_hidden_layers"]):
        for module, (fan_in, fan_out) in _attention_shapes(config).items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            lora_a = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
            lora_b = torch.randn(fan_out, rank, generator=generator) * scale
            tensors[f"{prefix}.lora_A.weight"] = lora_a.to(dtype).contiguous()
            tensors[f"{prefix}.lora_B.weight"] = lora_b.to(dtype).contiguous()

    # Written beside `out`, then renamed into place: a build cut short leaves no half adapter.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".lora-", dir=out.parent))
    (tmp / "adapter_config.json").write_text(config_text)
    save_file(tensors, str(tmp / "adapter_model.safetensors"),
              metadata={"format": "pt", "fixture_fingerprint": fingerprint})
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def hf_cache_snapshot(
    model_dir: Path, cache_root: Path, repo_id: str, revision: str = "main", commit: str | None = None
) -> Path:
    """Lay `model_dir` out as the hub cache entry of `repo_id` under `cache_root` (HF_HUB_CACHE).

    With HF_HUB_OFFLINE=1 and HF_HUB_CACHE=cache_root, transformers and vLLM then resolve
    `repo_id` at `revision` as if it had been downloaded, so tests exercise the hub-name code
    path (refs -> snapshot) without network. Files are copied, not symlinked to blobs: the hub
    library reads snapshot files either way. `commit` defaults to a 40-hex hash of
    repo_id + revision, stable across runs. Returns the snapshot folder.
    """
    commit = commit or hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    repo_folder = cache_root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_folder / "snapshots" / commit
    shutil.copytree(model_dir, snapshot, dirs_exist_ok=True)
    ref = repo_folder / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)  # the hub library writes refs without a trailing newline
    return snapshot
