"""Text and instruction data: read, tokenise, pack into fixed-length chunks, split deterministically."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lolcats.sources import resolve

logger = logging.getLogger(__name__)

IGNORE = -100
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


@dataclass(frozen=True)
class Document:
    """A plain text, or an instruction example (``prompt`` is masked from the loss)."""

    text: str
    prompt: str = ""


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    if input_text:
        return ALPACA_PROMPT.format(with_input=", paired with an input that provides further context",
                                    instruction=instruction, input_block=f"### Input:\n{input_text}\n\n")
    return ALPACA_PROMPT.format(with_input="", instruction=instruction, input_block="")


def _record_to_document(record: dict, where: str) -> Document:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object such as {{\"text\": \"...\"}} or an Alpaca record, got "
                         f"a {type(record).__name__}; write one object per line")
    if "instruction" in record and "output" in record:
        return Document(text=str(record["output"]), prompt=alpaca_prompt(record["instruction"], record.get("input", "")))
    if "text" in record:
        return Document(text=str(record["text"]))
    raise ValueError(f"{where}: a record needs 'text', or 'instruction' and 'output' (Alpaca format); "
                     f"got keys {sorted(record)}")


def _text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text (a binary file?); training data must be .txt, .jsonl or .json "
                         "text files") from None
    if "\x00" in text:
        raise ValueError(f"{path} holds NUL bytes (a binary file?); training data must be .txt, .jsonl or .json text")
    return text


def _read_file(path: Path) -> list[Document]:
    if path.suffix == ".txt":
        return [Document(text=_text(path))]
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(_text(path).splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not valid JSON ({e.msg}); a .jsonl file holds one JSON object per "
                                     "line, e.g. {\"text\": \"...\"} (CSV is not read)") from None
                docs.append(_record_to_document(record, f"{path}:{i}"))
        return docs
    if path.suffix == ".json":
        try:
            records = json.loads(_text(path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); give a JSON list of records") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        return [_record_to_document(r, f"{path}[{i}]") for i, r in enumerate(records)]
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .txt, .jsonl or .json (convert CSV to "
                     "JSONL, one object per line)")


def _natural_key(path: Path) -> list:
    """Sort ``chapter_2`` before ``chapter_10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def load_documents(spec: str, before: str = "", from_: str = "") -> list[Document]:
    """Documents of a source, in a fixed order. For folders, ``before``/``from_`` keep files whose
    names sort before / at-or-after the given string (e.g. years of State of the Union addresses)."""
    source = resolve(spec, "data")
    if isinstance(source, str):
        from datasets import load_dataset  # online only

        dataset = load_dataset(source[3:], split="train")
        return [_record_to_document(dict(r), f"{source}[{i}]") for i, r in enumerate(dataset)]
    if source.is_file():
        return _read_file(source)
    files = sorted((f for f in source.iterdir() if f.suffix in (".txt", ".jsonl", ".json")), key=_natural_key)
    if before:
        files = [f for f in files if f.name < before]
    if from_:
        files = [f for f in files if f.name >= from_]
    if not files:
        raise ValueError(f"data {spec}: no .txt/.jsonl/.json files{' match the filter' if before or from_ else ''}")
    return [doc for f in files for doc in _read_file(f)]


def tokenize_stream(docs: list[Document], tokenizer, mask_prompts: bool = True) -> tuple[Tensor, Tensor]:
    """Concatenate documents (EOS between) into token ids and labels (prompts set to IGNORE)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    for doc in docs:
        prompt = tokenizer(doc.prompt, add_special_tokens=False)["input_ids"] if doc.prompt else []
        body = tokenizer(doc.text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        ids += prompt + body
        labels += ([IGNORE] * len(prompt) if mask_prompts else prompt) + body
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


@dataclass
class Chunks:
    """Packed chunks: ``input_ids`` and ``labels`` of shape (N, seq_len)."""

    input_ids: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.input_ids[i : i + 1], self.labels[i : i + 1]


def pack(ids: Tensor, labels: Tensor, seq_len: int, what: str, max_chunks: int | None = None) -> Chunks:
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"{what} has {ids.numel()} tokens, fewer than one chunk of data.seq_len={seq_len}; "
                         "add data or lower data.seq_len")
    if max_chunks is not None:
        n = min(n, max_chunks)
    return Chunks(ids[: n * seq_len].view(n, seq_len), labels[: n * seq_len].view(n, seq_len))


def build_train_data(spec: str, tokenizer, seq_len: int, heldout_chunks: int, before: str = "",
                     max_train_chunks: int = 0) -> tuple[Chunks, Chunks]:
    """Training chunks and held-out chunks (the last ``heldout_chunks`` of the packed stream); with
    ``max_train_chunks`` > 0 only the first that many training chunks are kept (held-out unchanged)."""
    ids, labels = tokenize_stream(load_documents(spec, before=before), tokenizer)
    chunks = pack(ids, labels, seq_len, f"training data {spec}")
    if len(chunks) <= heldout_chunks:
        raise ValueError(f"training data {spec} packs into {len(chunks)} chunks of {seq_len} tokens; it needs more "
                         f"than data.heldout_chunks={heldout_chunks} to keep some for training")
    cut = len(chunks) - heldout_chunks
    keep = min(cut, max_train_chunks) if max_train_chunks > 0 else cut
    train = Chunks(chunks.input_ids[:keep], chunks.labels[:keep])
    heldout = Chunks(chunks.input_ids[cut:], chunks.labels[cut:])
    logger.info("training data: %d chunks of %d tokens, %d held out", keep, seq_len, heldout_chunks)
    return train, heldout


def build_eval_windows(spec: str, tokenizer, seq_len: int, windows: int, from_: str = "", skip: int = 0) -> Chunks:
    """``windows`` windows of ``seq_len`` tokens of a corpus, in file order, after the first ``skip`` ones, for
    perplexity (``skip`` keeps data for choosing settings apart from data for judging them)."""
    ids, _ = tokenize_stream(load_documents(spec, from_=from_), tokenizer, mask_prompts=False)
    chunks = pack(ids, ids.clone(), seq_len, f"evaluation data {spec}", max_chunks=skip + windows)
    if len(chunks) <= skip:
        raise ValueError(f"evaluation data {spec} has {len(chunks)} windows of {seq_len} tokens, none after the "
                         f"{skip} skipped; skip fewer windows or use shorter ones")
    return Chunks(chunks.input_ids[skip:], chunks.labels[skip:])


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The chunk order of one epoch: a permutation fixed by (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()
