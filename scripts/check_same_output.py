"""Hash every file a set of fixed compressions writes, to show that a code change leaves results byte-identical.

    python scripts/check_same_output.py --save before.json        # on the code before a change
    python scripts/check_same_output.py --compare before.json     # after it: exit 1 on any difference

Cases: tiny random Llama / Mistral / Mixtral checkpoints with ``svd``, ``whiten`` and ``distill``, and
(``--builtin``) the built-in SmolLM2 at 16 x 128 tokens with ``whiten`` and ``distill`` (1 epoch).
Wall times are the only run-to-run difference in ``report.json`` and the manifest: their ``seconds``
entries are dropped before those two files are hashed, and the temporary folder's path is replaced. The loading
code copied beside the weights is code, not a result: it is left out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from distill_lr.config import load_config
from distill_lr.driver import compress
from distill_lr.testing import save_tiny, write_corpus

TINY = ("llama", "mistral", "mixtral")
METHODS = ("svd", "whiten", "distill")
VOLATILE = ("seconds", "prepass_seconds")  # wall times
JSON_WITH_TIMES = ("report.json", "distill_lr_manifest.json")
CODE = ("lowrank.py", "modeling_distill_lr.py")  # the loading code copied beside the weights: it changes with the code


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def folder_hashes(folder: Path, root: Path) -> dict[str, str]:
    """sha256 of each file, with the run's temporary root folder (in configs and reports) written as ``<root>``."""
    hashes = {}
    for path in sorted(p for p in folder.iterdir() if p.name not in CODE):
        data = path.read_bytes().replace(str(root).encode(), b"<root>")
        if path.name in JSON_WITH_TIMES:
            data = json.dumps(_scrub(json.loads(data)), sort_keys=True).encode()
        hashes[path.name] = hashlib.sha256(data).hexdigest()
    return hashes


def tiny_cases(root: Path) -> dict[str, list[str]]:
    corpus = write_corpus(root / "corpus.jsonl")
    cases = {}
    for kind in TINY:
        model = save_tiny(root / kind, kind)
        for method in METHODS:
            cases[f"{kind}-{method}"] = [
                f"model={model}",
                f"data.source={corpus}",
                "data.num_sequences=16",
                "data.seq_len=32",
                "data.eval_sequences=4",
                "data.eval_fraction=0.2",
                "batch_size=4",
                "train.epochs=1",
                "train.batch_size=4",
                "ranks.target=0.3",
                f"method={method}",
            ]
    return cases


def builtin_cases() -> dict[str, list[str]]:
    small = ["data.num_sequences=16", "data.seq_len=128", "data.eval_sequences=8", "train.epochs=1"]
    return {f"smollm2-{method}": [*small, f"method={method}"] for method in ("whiten", "distill")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--save", type=Path, help="write the hashes to this JSON file")
    mode.add_argument("--compare", type=Path, help="compare the hashes with this JSON file")
    parser.add_argument("--builtin", action="store_true", help="also the built-in SmolLM2 (a few minutes on 2 cores)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the thread count can change float sums: fix it
    hashes: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cases = tiny_cases(root) | (builtin_cases() if args.builtin else {})
        for name, overrides in cases.items():
            out = root / "out" / name
            compress(load_config(None, [*overrides, f"output={out}"]))
            hashes[name] = folder_hashes(out, root)
            print(f"{name}: {hashlib.sha256(json.dumps(hashes[name], sort_keys=True).encode()).hexdigest()}")
    if args.save:
        args.save.write_text(json.dumps(hashes, indent=2, sort_keys=True) + "\n")
        return 0
    reference = json.loads(args.compare.read_text())
    different = [
        f"{case}/{file}"
        for case in sorted(set(reference) & set(hashes))
        for file in sorted(set(reference[case]) | set(hashes[case]))
        if reference[case].get(file) != hashes[case].get(file)
    ]
    missing = sorted(set(reference) - set(hashes))
    for item in different:
        print(f"DIFFERENT {item}")
    print(f"{len(hashes)} cases compared, {len(different)} files differ" + (f", not run: {missing}" if missing else ""))
    return 1 if different else 0


if __name__ == "__main__":
    sys.exit(main())
