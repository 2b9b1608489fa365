"""Learn merge weights on a tiny local Llama: the loss falls and the learned merge beats uniform.

Everything is local (no downloads) and takes under a minute on a CPU:

1. a tiny Llama base model (``make_example_adapters.build_base_model``: two layers, hidden 64,
   its norms set to 1 as in a freshly initialised Llama);
2. three LoRA adapters, each trained briefly on one "skill": continuing a counting sequence
   within its own band of 16 tokens (``count``: tokens 0-15 counting up, ``skip``: 16-31
   counting by 3, ``reverse``: 32-47 counting down);
3. a new task that needs the first two skills and not the third (sequences from the ``count``
   and ``skip`` bands), of which only four small batches are given;
4. :func:`lorax_merge.learn_weights` learns the merge weights with the merge in the loop: one
   weight per adapter with ``linear`` and ``ties``, and one per adapter and module with ``ties``;
5. the held-out loss and next-token accuracy of every learned merge and of the uniform merge
   (1/3 each) of the same strategy are printed side by side.

Usage::

    python examples/learn_weights.py [--steps 100] [--density 0.5]

Exits non-zero if a training loss does not fall or a learned merge does not beat the uniform one.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_example_adapters import build_base_model  # noqa: E402

try:
    import lorax_merge
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(1, str(HERE.parent))
    import lorax_merge

BAND = 16  # tokens per skill
SEQ_LEN = 24
#: skill name -> (first token of its band, step of its counting sequence)
SKILLS = {"count": (0, 1), "skip": (16, 3), "reverse": (32, -1)}
TASK_SKILLS = ("count", "skip")  # the new task needs these two


def sequences(skill: str, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` sequences of one skill: start anywhere in the band, step through it (mod 16)."""
    first, step = SKILLS[skill]
    start = torch.randint(BAND, (count, 1), generator=generator)
    return first + (start + step * torch.arange(SEQ_LEN)) % BAND


def task_batch(skills: Sequence[str], size: int, generator: torch.Generator) -> torch.Tensor:
    """A batch mixing the given skills in equal parts, shuffled."""
    parts = [sequences(s, size // len(skills), generator) for s in skills]
    batch = torch.cat(parts)
    return batch[torch.randperm(batch.shape[0], generator=generator)]


def next_token_loss(model: torch.nn.Module, params: dict, batch: torch.Tensor) -> torch.Tensor:
    logits = functional_call(model, params, (batch,), strict=False).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def accuracy(model: torch.nn.Module, params: dict, batch: torch.Tensor) -> float:
    with torch.no_grad():
        logits = functional_call(model, params, (batch,), strict=False).logits
    return float((logits[:, :-1].argmax(-1) == batch[:, 1:]).float().mean())


def train_adapters(model: torch.nn.Module, steps: int) -> list[dict[str, torch.Tensor]]:
    """One adapter per skill: re-initialise the LoRA factors, train them, keep a copy."""
    lora = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    adapters = []
    for index, skill in enumerate(SKILLS):
        generator = torch.Generator().manual_seed(100 + index)
        with torch.no_grad():
            for _, p in sorted(lora.items()):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        optimizer = torch.optim.Adam(lora.values(), lr=0.02)
        for _ in range(steps):
            optimizer.zero_grad()
            batch = sequences(skill, 32, generator)
            next_token_loss(model, {}, batch).backward()
            optimizer.step()
        adapters.append({n: p.detach().clone() for n, p in lora.items()})
    return adapters


def base_model() -> torch.nn.Module:
    model = build_base_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
    return model


#: (strategy, one weight per adapter and module)
RUNS = (("linear", False), ("ties", False), ("ties", True))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--density", type=float, default=0.5, help="density of ties")
    parser.add_argument("--steps", type=int, default=100, help="weight-learning steps")
    parser.add_argument("--adapter-steps", type=int, default=150, help="training steps per skill")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", module="transformers|peft")
    torch.manual_seed(0)
    torch.set_num_threads(1)  # a tiny model: more threads only add synchronisation

    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base_model(), LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    print(f"training {len(SKILLS)} adapters ({', '.join(SKILLS)}), {args.adapter_steps} steps each")
    adapters = train_adapters(model, args.adapter_steps)
    model.requires_grad_(False)

    data = torch.Generator().manual_seed(7)
    few_shot = [task_batch(TASK_SKILLS, 16, data) for _ in range(4)]  # the few given batches
    held_out = task_batch(TASK_SKILLS, 256, data)

    def loss_fn(merged, batch):
        return next_token_loss(model, merged, batch)

    def held_out_scores(merged):
        with torch.no_grad():
            return float(next_token_loss(model, merged, held_out)), accuracy(
                model, merged, held_out
            )

    print(f"learning merge weights: {args.steps} steps on {len(few_shot)} batches of 16\n")
    print(
        "| strategy | weights | merge weights (count, skip, reverse) | training loss "
        "| held-out loss | held-out next-token accuracy |"
    )
    print("|---|---|---|---|---:|---:|")
    ok = True
    uniform_scores = {}
    for strategy, per_module in RUNS:
        common = dict(strategy=strategy, density=args.density, seed=1234)
        if strategy not in uniform_scores:
            uniform = lorax_merge.learn_weights(adapters, loss_fn, [None], steps=0, **common)
            uniform_scores[strategy] = held_out_scores(uniform.merged)
            weights = ", ".join(["0.33"] * len(SKILLS))
            loss, acc = uniform_scores[strategy]
            print(f"| {strategy} | uniform | {weights} | - | {loss:.3f} | {acc:.1%} |")
        learned = lorax_merge.learn_weights(
            adapters, loss_fn, few_shot, steps=args.steps, lr=0.05, per_module=per_module, **common
        )
        shown = learned.weights.mean(0) if per_module else learned.weights
        weights = ", ".join(f"{w:.2f}" for w in shown.tolist())
        label = "learned per module (mean)" if per_module else "learned"
        first, last = learned.losses[0], learned.losses[-1]
        loss, acc = held_out_scores(learned.merged)
        print(
            f"| {strategy} | {label} | {weights} | {first:.3f} -> {last:.3f} | {loss:.3f} "
            f"| {acc:.1%} |"
        )
        ok = ok and last < first and loss < uniform_scores[strategy][0]
    verdict = "every training loss fell and every learned merge beat the uniform merge"
    print(f"\n{verdict}" if ok else "\nFAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
