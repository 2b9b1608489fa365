"""End-to-end demo: build example adapters, merge them with ``lorax-merge``, load them in PEFT.

Steps, all local (no network, no downloads):

1. build a tiny Llama base model and three example PEFT LoRA adapters
   (``make_example_adapters.py``);
2. merge them with the ``lorax-merge`` command once per strategy, factor space (the LoRAX
   server's) and delta space (PEFT's ``cat`` and ``*_svd`` types), printing each command and its
   summary;
3. load every merged adapter with ``PeftModel.from_pretrained`` on the base model and run a forward
   pass;
4. compare with PEFT's own ``add_weighted_adapter``: the factor-space strategies under
   ``--weighting peft``, and the delta-space concatenation, which is exact.

Usage::

    python examples/demo.py [--work DIR] [--device auto|cpu|cuda]

Without ``--work`` everything is written to a temporary folder that is removed at the end.  Exits
non-zero if any step fails.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_example_adapters import build_examples  # noqa: E402

try:
    import lorax_merge
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(1, str(HERE.parent))
    import lorax_merge

# lorax-merge runs as `python -m lorax_merge`, finding the same package as this script.
PACKAGE_ROOT = str(Path(lorax_merge.__file__).resolve().parent.parent)

from lorax_merge.strategy_table import STRATEGIES, strategy_names  # noqa: E402

WEIGHTS = ("1.0", "0.6", "0.4")
DENSITY = "0.5"
SEED = "1234"


def run_merge(
    adapters: Sequence[Path], output: Path, strategy: str, extra: Sequence[str], work: Path
) -> str:
    """Run ``lorax-merge`` as a separate process; print the command and return its summary."""
    args = [str(p.relative_to(work)) for p in adapters] + [
        "--output",
        str(output.relative_to(work)),
    ]
    args += ["--strategy", strategy, "--weights", *WEIGHTS]
    if STRATEGIES[strategy].uses_density:
        args += ["--density", DENSITY]
    if STRATEGIES[strategy].is_random:
        args += ["--seed", SEED]
    args += extra
    args.append("--overwrite")
    print(f"$ lorax-merge {shlex.join(args)}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "lorax_merge", *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"lorax-merge failed with exit code {proc.returncode}")
    summary = proc.stdout.strip()
    print(f"  {summary}")
    return summary


def forward(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit code."""
    parser = argparse.ArgumentParser(
        description="Merge example LoRA adapters with lorax-merge and load them in PEFT."
    )
    parser.add_argument("--work", help="folder for the example files (default: a temporary folder)")
    parser.add_argument(
        "--device", default="auto", help="--device passed to lorax-merge (default auto)"
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    with tempfile.TemporaryDirectory(prefix="lorax-merge-demo-") as scratch:
        work = Path(args.work).resolve() if args.work else Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        device = [] if args.device == "auto" else ["--device", args.device]
        base_dir, adapters = build_examples(work)
        print(f"Built the tiny base model and {len(adapters)} example adapters in {work}:")
        for path in adapters:
            print(f"  {path.relative_to(work)}")

        input_ids = torch.arange(1, 17).unsqueeze(0)
        base_logits = forward(LlamaForCausalLM.from_pretrained(str(base_dir)).eval(), input_ids)

        print(
            "\nMerging with each strategy, then loading the result with PeftModel.from_pretrained:"
        )
        for strategy in STRATEGIES:
            output = work / "merged" / strategy
            run_merge(adapters, output, strategy, device, work)
            model = PeftModel.from_pretrained(
                LlamaForCausalLM.from_pretrained(str(base_dir)), str(output)
            ).eval()
            logits = forward(model, input_ids)
            change = (logits - base_logits).abs().max().item()
            if not torch.isfinite(logits).all() or change == 0.0:
                raise SystemExit(
                    f"{strategy}: the merged adapter gave non-finite or unchanged logits"
                )
            print(
                f"  forward pass: logits {tuple(logits.shape)}, all finite, "
                f"max |change| vs base {change:.4f}"
            )

        print("\nParity with PEFT's add_weighted_adapter (--weighting peft in factor space):")
        # the deterministic types: factor space under PEFT weighting, and delta space's exact one
        deterministic = strategy_names(random=False)
        parity = [n for n in deterministic if STRATEGIES[n].refactor == "none"]
        parity += [n for n in deterministic if STRATEGIES[n].refactor == "concat"]
        for strategy in parity:
            output = work / "merged" / f"peft-{strategy}"
            factor = STRATEGIES[strategy].space == "factor"
            weighting = ["--weighting", "peft"] if factor else []
            run_merge(adapters, output, strategy, [*weighting, *device], work)
            model = PeftModel.from_pretrained(
                LlamaForCausalLM.from_pretrained(str(base_dir)), str(adapters[0]), adapter_name="a0"
            )
            names = ["a0"]
            for i, path in enumerate(adapters[1:], start=1):
                model.load_adapter(str(path), adapter_name=f"a{i}")
                names.append(f"a{i}")
            model.add_weighted_adapter(
                names,
                [float(w) for w in WEIGHTS],
                "merged",
                combination_type=strategy,
                density=float(DENSITY),
            )
            expected = get_peft_model_state_dict(model, adapter_name="merged")
            ours = load_file(str(output / "adapter_model.safetensors"))
            if sorted(expected) != sorted(ours):
                raise SystemExit(f"{strategy}: tensor names differ from PEFT's")
            diff = max((expected[k].float() - ours[k].float()).abs().max().item() for k in ours)
            print(f"  {strategy}: {len(ours)} tensors, max |difference| from PEFT = {diff:.3g}")
            if diff > 1e-6:
                raise SystemExit(f"{strategy}: differs from PEFT's add_weighted_adapter")
        print(f"\nDemo finished in {time.perf_counter() - started:.1f} s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
