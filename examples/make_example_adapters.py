"""Build small example PEFT LoRA adapters deterministically, without network access.

The adapters sit on a tiny Llama model defined here (two layers, hidden size 64), so everything is
built locally in about a second.  All three adapters have rank 8 but different target modules and
alphas:

* ``sql``      -- q_proj, v_proj                      (lora_alpha 16)
* ``support``  -- q_proj, k_proj, v_proj, o_proj      (lora_alpha 8)
* ``extract``  -- v_proj, gate_proj, up_proj, down_proj (lora_alpha 32, rsLoRA)

Usage::

    python examples/make_example_adapters.py OUT_DIR

writes ``OUT_DIR/base`` (the tiny base model, loadable with
``AutoModelForCausalLM.from_pretrained``) and ``OUT_DIR/adapters/{sql,support,extract}`` (PEFT
adapter folders).  The same call always writes the same tensors.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

#: Shape of the tiny Llama base model.
TINY_LLAMA = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


@dataclass(frozen=True)
class ExampleAdapter:
    """Recipe of one example adapter."""

    name: str
    target_modules: tuple[str, ...]
    r: int
    lora_alpha: float
    seed: int
    use_rslora: bool = False


EXAMPLES: tuple[ExampleAdapter, ...] = (
    ExampleAdapter("sql", ("q_proj", "v_proj"), r=8, lora_alpha=16, seed=101),
    ExampleAdapter(
        "support", ("q_proj", "k_proj", "v_proj", "o_proj"), r=8, lora_alpha=8, seed=202
    ),
    ExampleAdapter(
        "extract",
        ("v_proj", "gate_proj", "up_proj", "down_proj"),
        r=8,
        lora_alpha=32,
        seed=303,
        use_rslora=True,
    ),
)


def build_base_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """The tiny Llama model, with weights drawn from ``seed``."""
    config = LlamaConfig(**TINY_LLAMA)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.to(dtype).eval()


def make_adapter(
    out_dir: str | Path,
    *,
    target_modules: Sequence[str],
    r: int = 8,
    lora_alpha: float = 16,
    seed: int = 0,
    use_rslora: bool = False,
    dtype: torch.dtype = torch.float32,
    scale: float = 0.05,
    base_seed: int = 0,
    safe_serialization: bool = True,
) -> Path:
    """Create a PEFT LoRA adapter on the tiny base model and save it to ``out_dir``.

    Its ``lora_A`` and ``lora_B`` tensors are normal samples times ``scale`` drawn from ``seed`` (in
    sorted parameter-name order), so that the adapter changes the model's output, as a trained one
    would.
    """
    model = build_base_model(base_seed)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=list(target_modules),
        use_rslora=use_rslora,
        lora_dropout=0.0,
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(peft_model.named_parameters()):
            if ".lora_" in name:
                parameter.data = (torch.randn(parameter.shape, generator=generator) * scale).to(
                    dtype
                )
    out = Path(out_dir)
    peft_model.save_pretrained(str(out), safe_serialization=safe_serialization)
    # PEFT writes target_modules in set order, which varies between runs: sort it so that the
    # files are identical.
    config_path = out / "adapter_config.json"
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    if isinstance(saved.get("target_modules"), list):
        saved["target_modules"] = sorted(saved["target_modules"])
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def build_examples(work_dir: str | Path) -> tuple[Path, list[Path]]:
    """Write the base model and the three example adapters under ``work_dir``.

    Returns:
        ``(base_model_dir, [adapter_dir, ...])``.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    work = Path(work_dir)
    base_dir = work / "base"
    build_base_model().save_pretrained(str(base_dir))
    adapters = []
    for example in EXAMPLES:
        adapters.append(
            make_adapter(
                work / "adapters" / example.name,
                target_modules=example.target_modules,
                r=example.r,
                lora_alpha=example.lora_alpha,
                seed=example.seed,
                use_rslora=example.use_rslora,
            )
        )
    return base_dir, adapters


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: ``python examples/make_example_adapters.py OUT_DIR``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write base/ and adapters/ into")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    base_dir, adapters = build_examples(args.out_dir)
    print(f"base model: {base_dir}")
    for path in adapters:
        print(f"adapter:    {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
