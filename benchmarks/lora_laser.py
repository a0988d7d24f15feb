"""LoRA before LASER: does rank reduction help more, less or the same after a fine-tune?

The built-in SmolLM2-135M is fine-tuned with PEFT LoRA on the code domain (the calibration files of
``builtin:python``) for a few CPU minutes and merged; then

1. ``distill-lr spectra --compare ADAPTER``: how the fine-tune moved each matrix (relative change, effective rank,
   overlap of the top singular subspaces);
2. ``distill-lr laser sweep`` on the base and on the fine-tuned model, both scored on held-out code (files the
   fine-tune never saw): each intervention's change of the held-out loss, before against after.

With ``--base int4`` the same is done QLoRA-style: the base is the built-in model with every decoder linear
quantized to 4 bits by round to nearest (``distill-lr compress method=dense quant.bits=4 quant.method=rtn``, then
``distill-lr export``: the integers dequantized, which is the weight QLoRA's forward multiplies by), LoRA trains over
that frozen base, and LASER is swept on the int4 base and on the int4 base with the adapter merged.

Writes ``lora_laser.md``, ``lora_laser.json`` and ``lora_laser.png`` (each intervention's loss change on the base
against the fine-tuned model) to ``--out``::

    python benchmarks/lora_laser.py
    python benchmarks/lora_laser.py --steps 20 --layers 4 20 --types mlp_out --rhos 0.1
    python benchmarks/lora_laser.py --base int4 --out runs/qlora_laser
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from bench_domain import held_out, perplexity
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill_lr import cli
from distill_lr.analysis.tables import device_name, markdown_table, save_results
from distill_lr.builtin import BUILTIN_CODE, builtin_model_dir
from distill_lr.data import build_token_sets, load_documents

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def int4_base(out: Path) -> Path:
    """The built-in model with its decoder linears quantized to int4 (round to nearest, groups of 128), dequantized into
    a plain checkpoint that PEFT can wrap."""
    quantized = out / "int4"
    settings = ["method=dense", "quant.bits=4", "quant.method=rtn", "data.num_sequences=8", "data.eval_sequences=4", "plot=false"]
    assert cli.main(["compress", *settings, f"output={quantized}", "overwrite=true"]) == 0
    assert cli.main(["export", str(quantized), "--output", str(out / "int4-dense")]) == 0
    return out / "int4-dense"


def fine_tune(args: argparse.Namespace, base: Path, tokenizer: AutoTokenizer, out: Path) -> tuple[torch.nn.Module, dict]:
    """LoRA on the code calibration windows over the frozen ``base``; the adapter saved to ``out/adapter``, the merged
    model to ``out/merged``."""
    import peft

    windows = build_token_sets(
        load_documents(BUILTIN_CODE), tokenizer, num_sequences=args.sequences, seq_len=256, eval_sequences=0, eval_fraction=0.1, seed=0
    ).calibration
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, lora_dropout=0.0)
    model = peft.get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    generator, losses, start = torch.Generator().manual_seed(0), [], time.perf_counter()
    model.train()
    for step in range(args.steps):
        batch = windows[torch.randint(len(windows), (args.batch,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == args.steps - 1:
            print(f"lora step {step + 1}/{args.steps}: loss {losses[-1]:.4f}", flush=True)
    model.eval()
    model.save_pretrained(out / "adapter")
    merged = model.merge_and_unload()
    merged.save_pretrained(out / "merged")
    tokenizer.save_pretrained(out / "merged")
    return merged, {
        "steps": args.steps,
        "first_loss": losses[0],
        "last_loss": sum(losses[-10:]) / len(losses[-10:]),
        "seconds": time.perf_counter() - start,
    }


def sweep(model: str, args: argparse.Namespace, out: Path) -> dict:
    argv = [
        "laser",
        "--model",
        model,
        "sweep",
        "--data",
        BUILTIN_CODE,
        "--tasks",
        "--out",
        str(out),
        "--eval-sequences",
        str(args.eval_sequences),
    ]
    argv += ["--layers", *map(str, args.layers), "--types", *args.types, "--rhos", *map(str, args.rhos)]
    assert cli.main(argv) == 0
    return json.loads((out / "laser_sweep.json").read_text())


def changes(result: dict) -> dict[tuple[int, str, float], float]:
    dense = result["dense"]["loss"]
    return {(r["layer"], r["type"], r["value"]): r["loss"] - dense for r in result["rows"]}


def plot(before: dict, after: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(before)
    x, y = [before[k] for k in keys], [after[k] for k in keys]
    fig, ax = plt.subplots(figsize=(5, 5))
    for t in dict.fromkeys(k[1] for k in keys):
        ax.scatter([before[k] for k in keys if k[1] == t], [after[k] for k in keys if k[1] == t], label=t, s=18)
    low, high = min(x + y), max(x + y)
    ax.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1)
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.axvline(0, color="grey", linewidth=0.5)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_xlabel("held-out code loss change, base model")
    ax.set_ylabel("held-out code loss change, after LoRA on code")
    ax.set_title("LASER before and after a LoRA fine-tune")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sequences", type=int, default=256, help="code windows of 256 tokens to fine-tune on")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 8, 16, 24, 29])
    parser.add_argument("--types", nargs="+", default=["q", "mlp_in", "mlp_out"])
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.1, 0.01])
    parser.add_argument("--eval-sequences", type=int, default=32, help="held-out windows of 256 tokens per domain, and of the sweeps")
    parser.add_argument("--base", choices=("bf16", "int4"), default="bf16", help="int4: QLoRA-style, over an int4 base")
    parser.add_argument("--out", type=Path, default=Path("runs/lora_laser"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir())
    windows = {domain: held_out(domain, tokenizer, args.eval_sequences) for domain in ("code", "wiki")}
    base_dir = int4_base(args.out) if args.base == "int4" else builtin_model_dir()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    dense = {domain: perplexity(base, w) for domain, w in windows.items()}
    merged, tuned = fine_tune(args, base_dir, tokenizer, args.out)
    adapted = {domain: perplexity(merged, w) for domain, w in windows.items()}
    compare = ["--compare", str(args.out / "adapter"), "--activations", "0", "--out", str(args.out / "spectra")]
    assert cli.main(["spectra", "--model", str(base_dir), *compare]) == 0
    spectra = json.loads((args.out / "spectra" / "spectra.json").read_text())
    moved = [(name, m["compare"]) for layer in spectra["layers"] for name, m in layer.items() if "compare" in m]
    before = changes(sweep(str(base_dir), args, args.out / "laser-base"))
    after = changes(sweep(str(args.out / "merged"), args, args.out / "laser-lora"))
    result = {"device": device_name(), "base": args.base, "fine_tune": tuned, "perplexity": {"base": dense, "lora": adapted}, "laser": {}}
    result["laser"] = {"base": {str(k): v for k, v in before.items()}, "lora": {str(k): v for k, v in after.items()}}
    save_results(result, args.out / "lora_laser.json")
    plot(before, after, args.out / "lora_laser.png")
    cells = [(f"layer {k[0]} {k[1]} ρ={k[2]}", f"{before[k]:+.4f}", f"{after[k]:+.4f}") for k in sorted(before)]
    mean = {
        name: sum(m[key] for _, m in moved) / len(moved) for name, key in (("change", "weight_change"), ("rank", "effective_rank_change"))
    }
    lines = [
        "Base: " + ("the built-in model, decoder linears int4 (RTN, g128), dequantized." if args.base == "int4" else "the built-in model."),
        f"LoRA r={args.rank} on {args.sequences} code windows, {args.steps} steps of {args.batch} "
        f"({tuned['seconds']:.0f} s, {device_name()}): training loss {tuned['first_loss']:.3f} → {tuned['last_loss']:.3f}.",
        f"Held-out perplexity, base → LoRA: code {dense['code']:.3f} → {adapted['code']:.3f}, "
        f"wiki {dense['wiki']:.3f} → {adapted['wiki']:.3f}.",
        f"Spectra: over {len(moved)} matrices the fine-tune changed ‖ΔW‖/‖W‖ by {mean['change']:.3g} on average and the effective rank by "
        f"{mean['rank']:+.3f}.",
        f"LASER (held-out code loss change against each model's own dense loss): best on the base {min(before.values()):+.4f}, after LoRA "
        f"{min(after.values()):+.4f}; interventions that lower the loss: {sum(v < 0 for v in before.values())} of {len(before)} before, "
        f"{sum(v < 0 for v in after.values())} after; the fine-tuned model's change is the smaller (kinder) one in "
        f"{sum(after[k] < before[k] for k in before)} of {len(before)}.",
        "",
        markdown_table(("intervention", "base", "after LoRA"), cells, "lrr"),
    ]
    (args.out / "lora_laser.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
