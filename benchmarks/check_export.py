"""A compressed folder exported as compressed-tensors (+ a LoRA adapter of its corrections) computes what our loader does.

Exports ``RUN`` to ``<workdir>/ct`` (and ``<workdir>/lora`` for a qlr folder), loads the export with plain transformers
(no remote code; PEFT on top for the adapter) and our loader, both in float32, and prints the largest logit difference
over 256 tokens of real text (torch's own source, on every machine); exits non-zero above ``--atol``::

    python scripts/compress.py output=/tmp/qlr4 method=qlr quant.bits=4 quant.group_size=64 quant.correction_rank=16
    python benchmarks/check_export.py /tmp/qlr4 --workdir /tmp/qlr4-export
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill_lr.checkpoint.compressed import load_compressed
from distill_lr.checkpoint.export import decompress_for_peft, export


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--workdir", type=Path, required=True, help="where the exports go (new, empty or earlier exports)")
    parser.add_argument("--atol", type=float, default=1e-3)
    args = parser.parse_args()
    has_corrections = bool(json.loads((args.run / "config.json").read_text())["distill_lr"].get("quant", {}).get("corrections"))
    print(export(args.run, args.workdir / "ct", "compressed-tensors"))
    theirs = AutoModelForCausalLM.from_pretrained(args.workdir / "ct", dtype=torch.float32).eval()
    if has_corrections:
        from peft import PeftModel

        print(export(args.run, args.workdir / "lora", "lora"))
        decompress_for_peft(theirs)
        theirs = PeftModel.from_pretrained(theirs, args.workdir / "lora").eval()
    ours = load_compressed(args.run, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.workdir / "ct")
    text = " ".join(Path(torch.__file__).read_text().split()[:400])  # any real text; the library's own source is on every machine
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        a, b = theirs(ids).logits, ours(ids).logits
    diff = (a - b).abs().max().item()
    print(f"\nlargest logit difference over {ids.shape[1]} tokens: {diff:.2e} (logits up to {b.abs().max().item():.1f}); atol {args.atol}")
    sys.exit(0 if diff <= args.atol else 1)


if __name__ == "__main__":
    main()
