"""The library baseline of ``bench_size.py``: llm-compressor's GPTQ (W{bits}A16, group-wise, its default settings) on the
built-in SmolLM2-135M with the bench's calibration windows, its held-out perplexity on the bench's held-out windows,
and the bytes of its saved decoder linears (compressed-tensors' packed format).

llm-compressor pins its own transformers, so it runs in an environment of its own::

    python -m venv /tmp/lc && /tmp/lc/bin/pip install torch==2.13.0 llmcompressor && /tmp/lc/bin/pip install -e . --no-deps
    /tmp/lc/bin/pip install omegaconf gensim gguf psutil
    /tmp/lc/bin/python benchmarks/library_quant.py --bits 4 3 --group-size 64      # rows into docs/size_library.json

It also checks our GPTQ against the library's on the same weight and Hessian (``--check``): real SmolLM2 weights,
their inputs' second moment from the calibration windows, the output error of both.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill_lr.analysis.tables import save_results
from distill_lr.builtin import resolve_model_dir
from distill_lr.config import load_config
from distill_lr.data import build_token_sets, load_documents

BENCH = ["data.num_sequences=256", "data.seq_len=256", "data.eval_sequences=64"]  # bench_size's text


def bench_tokens() -> tuple[Path, torch.Tensor, torch.Tensor]:
    cfg = load_config(None, BENCH)
    folder = resolve_model_dir(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    d = cfg.data
    tokens = build_token_sets(
        load_documents(d.source),
        tokenizer,
        num_sequences=d.num_sequences,
        seq_len=d.seq_len,
        eval_sequences=d.eval_sequences,
        eval_fraction=d.eval_fraction,
        seed=cfg.seed,
    )
    return folder, tokens.calibration, tokens.evaluation


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor) -> float:
    total = 0.0
    for row in ids:
        total += float(model(input_ids=row[None], labels=row[None]).loss) * (len(row) - 1)
    return math.exp(total / (len(ids) * (ids.shape[1] - 1)))


def saved_linear_bytes(folder: Path) -> int:
    """Bytes of the decoder layers' linear tensors (packed weights, scales, zero points) in a saved folder."""
    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as fh:
            for key in fh.keys():
                if ".layers." in key and "norm" not in key:
                    t = fh.get_slice(key)
                    total += math.prod(t.get_shape()) * {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I8": 1, "U8": 1, "I64": 8}[t.get_dtype()]
    return total


def library_row(folder: Path, calibration: torch.Tensor, evaluation: torch.Tensor, bits: int, group: int) -> dict:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": group}
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"])
    data = Dataset.from_dict({"input_ids": calibration.tolist(), "attention_mask": torch.ones_like(calibration).tolist()})
    start = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=len(calibration), max_seq_length=calibration.shape[1])
    seconds = time.perf_counter() - start
    model = model.float().eval()
    ppl = perplexity(model, evaluation)
    with tempfile.TemporaryDirectory() as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp, save_compressed=True)
        size = saved_linear_bytes(Path(tmp))
    import llmcompressor

    return {
        "row": f"llm-compressor int{bits}-gptq-g{group}",
        "family": "library",
        "bytes": size,
        "ppl": ppl,
        "seconds": round(seconds, 1),
        "command": f"python benchmarks/library_quant.py --bits {bits} --group-size {group}  (llmcompressor {llmcompressor.__version__})",
    }


def check_against_library(folder: Path, calibration: torch.Tensor, bits: int, group: int) -> None:
    """Our GPTQ and the library's on the same real weights and Hessians: their output errors, side by side."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    from distill_lr import quant

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    inputs: dict[str, torch.Tensor] = {}
    names = [
        "model.layers.3.self_attn.q_proj",
        "model.layers.3.mlp.down_proj",
        "model.layers.20.mlp.gate_proj",
        "model.layers.20.self_attn.o_proj",
    ]
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: inputs.__setitem__(n, inputs.get(n, 0) + a[0][0].T @ a[0][0]))
        for n in names
    ]
    with torch.no_grad():
        for row in calibration[:64]:
            model(input_ids=row[None])
    for h in hooks:
        h.remove()
    args = QuantizationArgs(num_bits=bits, symmetric=True, strategy="group", group_size=group, actorder="static")
    for name in names:
        W = model.get_submodule(name).weight.detach()
        H = inputs[name] / (64 * calibration.shape[1])
        groups = W.view(W.shape[0], -1, group)
        scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
        theirs, _, _ = quantize_weight(W[None].clone(), (2 * H)[None].clone(), scale[None], zero[None], None, args)
        ours = quant.gptq(W, H, quant.QuantSpec(bits, group)).dequantized()
        rtn = quant.rtn(W, quant.QuantSpec(bits, group)).dequantized()
        same = (theirs[0] - ours).abs().lt(1e-6).float().mean()
        errors = [quant.output_error(W, w, H) for w in (theirs[0], ours, rtn)]
        print(f"{name}: output error library {errors[0]:.5f}, ours {errors[1]:.5f}, rtn {errors[2]:.5f}; same entries {same:.2%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("docs/size_library.json"))
    parser.add_argument("--check", action="store_true", help="only compare our GPTQ with the library's on real weights")
    args = parser.parse_args()
    folder, calibration, evaluation = bench_tokens()
    if args.check:
        for bits in args.bits:
            check_against_library(folder, calibration, bits, args.group_size)
        return
    rows = json.loads(args.out.read_text()) if args.out.is_file() else []
    for bits in args.bits:
        row = library_row(folder, calibration, evaluation, bits, args.group_size)
        rows = [r for r in rows if r["row"] != row["row"]] + [row]
        save_results(rows, args.out)
        print(f"{row['row']}: {row['bytes'] / 1e6:.1f} MB, ppl {row['ppl']:.4g} ({row['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
