"""Delta-space merging benchmark: ``lorax_merge.peft.add_weighted_adapter`` next to PEFT's.

One run measures, with the same threads (2 by default) and on one device:

* one module (a 4096 x 4096 Linear) with 3 adapters of rank 16, float32: PEFT's
  ``add_weighted_adapter(..., "svd")`` and ``(..., "ties_svd", density=0.5)`` against ours with
  the default driver, each the whole call (adapter injection included); the relative Frobenius
  distance of ``B'A'`` to PEFT's for ``svd``; for ``ties_svd`` our error ``||M - B'A'||`` over
  PEFT's (optimal, full SVD) for the same merged delta ``M``; our other delta-space types alone;
* the peak extra memory of one ``ties_svd`` call, ours and PEFT's, as a multiple of one
  ``d x k`` float32 matrix: CPU, peak RSS of a fresh process (``VmHWM`` after resetting it);
  CUDA, ``torch.cuda.max_memory_allocated``;
* a tiny local Llama with 3 adapters (ranks 4, 8, 6, different alphas, one rsLoRA): every
  combination type merges, saves, reloads with ``PeftModel.from_pretrained`` and gives finite
  logits equal to those before saving (factor-space types on 3 rank-8 adapters: PEFT requires
  equal ranks there).

    python benchmarks/bench_delta.py                 # CPU (PEFT's SVDs take about a minute)
    python benchmarks/bench_delta.py --device cuda   # the same table on a GPU
    python benchmarks/bench_delta.py --size 1024     # smaller module, a smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parent, HERE.parent / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_common import import_lorax_merge  # noqa: E402

lorax_merge = import_lorax_merge()
import lorax_merge.peft as lm_peft  # noqa: E402

RANK, ADAPTERS, WEIGHTS, DENSITY = 16, ("a", "b", "c"), [1.0, 0.6, -0.4], 0.5
SVD_SPEEDUP_TARGET, TIES_SPEEDUP_TARGET, MEMORY_TARGET, SVD_PARITY = 100.0, 10.0, 3.0, 1e-4


class OneModule(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(size, size, bias=False)


def build_module(size: int, device: str):
    """A PeftModel with one ``size x size`` Linear and 3 rank-16 adapters, random factors."""
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(OneModule(size), LoraConfig(r=RANK, lora_alpha=32,
                               target_modules=["proj"]), ADAPTERS[0])  # fmt: skip
        for name, alpha in zip(ADAPTERS[1:], (16, 8)):
            model.add_adapter(name, LoraConfig(r=RANK, lora_alpha=alpha, target_modules=["proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model.to(device)


def product(model, name: str) -> torch.Tensor:
    layer = model.base_model.model.proj
    return layer.lora_B[name].weight.double() @ layer.lora_A[name].weight.double()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(model, fn, name: str, combination_type: str, device: str, **kw) -> float:
    sync(device)
    start = time.perf_counter()
    fn(model, list(ADAPTERS), WEIGHTS, name, combination_type, **kw)
    sync(device)
    return time.perf_counter() - start


def peft_call(model, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_weighted_adapter(*args, **kw)


def merged_delta(model) -> torch.Tensor:
    layer = model.base_model.model.proj
    return lorax_merge.delta.merged_delta(
        [layer.lora_A[n].weight.data for n in ADAPTERS],
        [layer.lora_B[n].weight.data for n in ADAPTERS],
        [layer.scaling[n] for n in ADAPTERS],
        WEIGHTS,
        "ties_svd",
        density=DENSITY,
    ).double()


_MEMORY_SCRIPT = """
import gc, json, sys, torch
sys.path[:0] = {paths!r}
import bench_delta as b
from bench_common import proc_status_kb, reset_peak_rss
side, size = sys.argv[1], int(sys.argv[2])
torch.set_num_threads({threads})
model = b.build_module(size, "cpu")
call = b.peft_call if side == "peft" else b.lm_peft.add_weighted_adapter
small = b.build_module(256, "cpu")  # warm the code path (BLAS, LAPACK, thread pool)
call(small, list(b.ADAPTERS), b.WEIGHTS, "warm", "ties_svd", density=b.DENSITY)
del small
gc.collect()
reset_peak_rss()
before = proc_status_kb("VmRSS")
call(model, list(b.ADAPTERS), b.WEIGHTS, "new", "ties_svd", density=b.DENSITY)
peak = proc_status_kb("VmHWM")
print(json.dumps({{"extra": (peak - before) * 1024 / (size * size * 4)}}))
"""


def peak_memory(side: str, size: int, device: str, threads: int) -> float:
    """Peak extra memory of one ties_svd call, in d x k float32 matrices."""
    if device == "cuda":
        model = build_module(size, device)
        call = peft_call if side == "peft" else lm_peft.add_weighted_adapter
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call(model, list(ADAPTERS), WEIGHTS, "new", "ties_svd", density=DENSITY)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / (size * size * 4)
    script = _MEMORY_SCRIPT.format(paths=[str(HERE), str(HERE.parent)], threads=threads)
    proc = subprocess.run([sys.executable, "-c", script, side, str(size)], capture_output=True,
                          text=True, timeout=1800)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])["extra"]


def module_table(size: int, device: str, threads: int, reps: int) -> list[str]:
    model = build_module(size, device)
    rows = []
    # PEFT once each (its full SVDs dominate), ours the median of `reps` fresh calls.
    peft_svd = timed(model, peft_call, "peft_svd", "svd", device)
    ours_svd = statistics.median(
        timed(model, lm_peft.add_weighted_adapter, f"svd{i}", "svd", device) for i in range(reps)
    )
    parity = float((product(model, "svd0") - product(model, "peft_svd")).norm()
                   / product(model, "peft_svd").norm())  # fmt: skip
    speedup = peft_svd / ours_svd
    rows.append(
        f"| svd | {peft_svd * 1e3:.0f} | {ours_svd * 1e3:.1f} | {speedup:.0f}x | "
        f">= {SVD_SPEEDUP_TARGET:.0f}x | {'yes' if speedup >= SVD_SPEEDUP_TARGET else 'NO'} | "
        f"B'A' vs PEFT: {parity:.1e} (<= {SVD_PARITY:.0e}: "
        f"{'yes' if parity <= SVD_PARITY else 'NO'}) |"
    )
    peft_ties = timed(model, peft_call, "peft_ties", "ties_svd", device, density=DENSITY)
    ours_ties = statistics.median(
        timed(model, lm_peft.add_weighted_adapter, f"ties{i}", "ties_svd", device, density=DENSITY)
        for i in range(reps)
    )
    merged = merged_delta(model)
    ratio = float((merged - product(model, "ties0")).norm()
                  / (merged - product(model, "peft_ties")).norm())  # fmt: skip
    speedup = peft_ties / ours_ties
    rows.append(
        f"| ties_svd (density {DENSITY}) | {peft_ties * 1e3:.0f} | {ours_ties * 1e3:.1f} | "
        f"{speedup:.0f}x | >= {TIES_SPEEDUP_TARGET:.0f}x | "
        f"{'yes' if speedup >= TIES_SPEEDUP_TARGET else 'NO'} | "
        f"error / PEFT's (optimal): {ratio:.5f} (<= 1.01: {'yes' if ratio <= 1.01 else 'NO'}) |"
    )
    for combination_type in ("cat", "magnitude_prune_svd", "dare_linear_svd", "dare_ties_svd"):
        ours = statistics.median(
            timed(
                model,
                lm_peft.add_weighted_adapter,
                f"{combination_type}{i}",
                combination_type,
                device,
                density=DENSITY,
                seed=i,
            )  # fmt: skip
            for i in range(reps)
        )
        rows.append(f"| {combination_type} | - | {ours * 1e3:.1f} | - | - | - | |")
    del model
    gc.collect()
    ours_mem = peak_memory("ours", size, device, threads)
    peft_mem = peak_memory("peft", size, device, threads)
    memory = (
        f"Peak extra memory of one ties_svd call, in {size} x {size} float32 matrices: "
        f"lorax_merge {ours_mem:.2f} (target <= {MEMORY_TARGET:.0f}: "
        f"{'yes' if ours_mem <= MEMORY_TARGET else 'NO'}), PEFT {peft_mem:.2f}."
    )
    header = [
        f"#### One module: 3 adapters of rank {RANK}, {size} x {size} float32, {device}, "
        f"{threads} threads",
        "",
        "| combination type | PEFT (ms) | lorax_merge (ms) | speedup | target | met | accuracy |",
        "|---|---:|---:|---:|---:|:-:|---|",
    ]
    return header + rows + ["", memory]


def llama_table(device: str) -> list[str]:
    from adapter_tools import examples
    from peft import LoraConfig, PeftModel, get_peft_model

    specs = {"sql": (4, 8, False), "chat": (8, 32, True), "code": (6, 16, False),
             "e1": (8, 16, False), "e2": (8, 8, False), "e3": (8, 4, True)}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = None
        for name, (r, alpha, rslora) in specs.items():
            config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, init_lora_weights=False,
                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                "gate_proj", "up_proj", "down_proj"])  # fmt: skip
            if model is None:
                model = get_peft_model(examples().build_base_model(), config, name)
            else:
                model.add_adapter(name, config)
    model = model.to(device).eval()
    tokens = torch.tensor([[1, 5, 9, 200, 17, 3, 88, 41]], device=device)
    rows = [
        "#### Tiny Llama (2 layers, hidden 64): every combination type, saved and reloaded",
        "",
        "| combination type | adapters (r, alpha) | merge (ms) | from_pretrained | logits finite "
        "| max abs diff to before saving |",
        "|---|---|---:|:-:|:-:|---:|",
    ]
    from lorax_merge.strategy_table import STRATEGIES, strategy_names

    for combination_type in strategy_names(in_peft=True):
        chosen = ["sql", "chat", "code"] if STRATEGIES[combination_type].space == "delta" else [
            "e1", "e2", "e3"]  # fmt: skip
        start = time.perf_counter()
        lm_peft.add_weighted_adapter(model, chosen, WEIGHTS, combination_type, combination_type,
                                     density=DENSITY, seed=1)  # fmt: skip
        elapsed = time.perf_counter() - start
        model.set_adapter(combination_type)
        with torch.no_grad(), warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
            warnings.simplefilter("ignore")
            before = model(tokens).logits
            model.save_pretrained(tmp, selected_adapters=[combination_type])
            base = examples().build_base_model().to(device)
            reloaded = PeftModel.from_pretrained(base, str(Path(tmp) / combination_type))
            logits = reloaded(tokens).logits
        finite = bool(torch.isfinite(logits).all())
        described = ", ".join(f"({specs[n][0]}, {specs[n][1]}{' rs' if specs[n][2] else ''})"
                              for n in chosen)  # fmt: skip
        diff = float((logits - before).abs().max())
        rows.append(f"| {combination_type} | {described} | {elapsed * 1e3:.0f} | yes | "
                    f"{'yes' if finite else 'NO'} | {diff:.1e} |")  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", type=int, default=4096, help="d = k of the module")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3, help="timed calls of ours (median)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    lines = [f"torch {torch.__version__}, lorax_merge {lorax_merge.__version__}", ""]
    lines += module_table(args.size, args.device, args.threads, args.reps)
    lines += [""] + llama_table(args.device)
    lines += ["", f"Total benchmark time: {time.perf_counter() - start:.0f} s"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
