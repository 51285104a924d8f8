"""LoRA export: the adapters in PEFT's format, or merged into a full llava-hf checkpoint.

PEFT's format is a directory with ``adapter_config.json`` and ``adapter_model.safetensors``
whose tensors are named ``base_model.model.<module>.lora_A.weight`` ([rank, in]) and
``...lora_B.weight`` ([out, rank]), ``<module>`` being the transformers module the adapter
wraps (``model.language_model.layers.3.self_attn.q_proj``). PEFT adds
``lora_alpha / r * B A x`` to that module's output, which is our ``x (W + scale A B)``.
``peft.PeftModel.from_pretrained`` applies the directory to the model that
``exgra_jax.convert.hf.save_llava`` writes for the base.
"""

from __future__ import annotations

import json
import os

import numpy as np

from exgra_jax.convert.hf import flatten, save_llava
from exgra_jax.convert.mapping import LAYOUTS, expand, locate
from exgra_jax.convert.safetensors_io import write_safetensors
from exgra_jax.models import config as mc
from exgra_jax.models.lora import LoraConfig, with_adapters

# transformers' module names (what PEFT matches its targets and tensor names against).
MODULE_LAYOUT = LAYOUTS["llava_hf_v5"]
PREFIX = "base_model.model."


def adapter_tensors(config: mc.ModelConfig, lora_params: dict) -> dict[str, np.ndarray]:
    """PEFT tensor name -> float32 array, for ``lora_params`` (= ``params['lora']``)."""
    flat = flatten(lora_params["model"])
    done, out = set(), {}
    for ours, theirs, _ in expand(config, MODULE_LAYOUT):
        if not ours.endswith("/kernel"):
            continue
        path, layer = locate(ours[: -len("/kernel")], config.scan_layers)
        if f"{path}/a" not in flat:
            continue
        a, b = (np.asarray(flat[f"{path}/{n}"], np.float32) for n in ("a", "b"))
        if layer is not None:
            a, b = a[layer], b[layer]
        rank = a.shape[-1]
        module = theirs[: -len(".weight")]
        out[f"{PREFIX}{module}.lora_A.weight"] = a.reshape(-1, rank).T
        out[f"{PREFIX}{module}.lora_B.weight"] = b.reshape(rank, -1).T
        done.add(path)
    missing = sorted({p[: -len("/a")] for p in flat if p.endswith("/a")} - done)
    if missing:
        raise ValueError(f"adapters without a transformers Linear module to attach to: "
                         f"{missing}; PEFT export supports adapters on linear kernels only")
    return out


def save_adapters(config: mc.ModelConfig, lora_params: dict, cfg: LoraConfig, out_dir: str,
                  base_model: str = "") -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` for PEFT.

    ``base_model``: where the base llava-hf model is (recorded as
    ``base_model_name_or_path``; ``PeftModel.from_pretrained`` takes the model itself)."""
    tensors = adapter_tensors(config, lora_params)
    modules = sorted({n[len(PREFIX): -len(".lora_A.weight")] for n in tensors
                      if n.endswith(".lora_A.weight")})
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(os.path.join(out_dir, "adapter_model.safetensors"),
                      [(n, t.shape, np.float32) for n, t in tensors.items()],
                      lambda n: tensors[n], metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model or None,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "bias": "none",
        "target_modules": modules, "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
        "inference_mode": True,
    }
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(adapter_config, f, indent=2)


def save_merged(config: mc.ModelConfig, params: dict, cfg: LoraConfig, out_dir: str,
                dtype: str | None = None) -> None:
    """The adapters folded into the base (in float32), written as a llava-hf directory."""
    merged = with_adapters(params, cfg, np.float32)
    save_llava(config, merged["model"], out_dir, dtype=dtype or "float32")
