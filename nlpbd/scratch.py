"""What a defense may touch on disk: a scratch area of its own and weights-only views of granted models.

A cached artifact's directory holds its ``artifact.json``, whose build payload names the attack and its
settings (triggers, target, poison rate); its parent is the cache root, where every other artifact
lies. So a defense gets neither: its context holds an :class:`~nlpbd.cache.ArtifactCache` rooted in
``<cache>/defense-scratch/<defense>/`` for its own intermediate builds (PSIMs, MLM-head grafts), and
every model it is granted (the suspect release, θ_pre, the victim) as a *view*: a directory in that
scratch area with only the model's weights, config and tokenizer files, weights hard-linked (copied
where links are not possible), JSON files rewritten without the paths they were loaded from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from nlpbd.cache import ArtifactCache, atomic_directory

SCRATCH_DIR = "defense-scratch"
# A model, as ``from_pretrained`` reads it: weights, config, tokenizer, adapter (PEFT victims).
WEIGHT_SUFFIXES = (".safetensors", ".bin")
MODEL_FILES = frozenset({"config.json", "generation_config.json", "adapter_config.json",
                         "model.safetensors.index.json", "pytorch_model.bin.index.json", "tokenizer.json",
                         "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
                         "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                         "chat_template.jinja"})
TOKENIZER_FILES = MODEL_FILES - {"generation_config.json", "adapter_config.json", "model.safetensors.index.json",
                                 "pytorch_model.bin.index.json"}
# Where a saved config may remember the directory it came from (a cache path).
PATH_KEYS = ("_name_or_path", "name_or_path", "base_model_name_or_path")


def _wanted(path: Path, files: frozenset[str], weights: bool) -> bool:
    return path.is_file() and (path.name in files or (weights and path.suffix in WEIGHT_SUFFIXES))


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(source, target)


def _without_paths(source: Path, target: Path) -> None:
    data = json.loads(source.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k not in PATH_KEYS}
        if "base_model_name_or_path" in json.loads(source.read_text(encoding="utf-8")):
            data["base_model_name_or_path"] = None  # PEFT keeps the key; the pipeline names the base itself
    target.write_text(json.dumps(data, indent=2))


def _view_key(source: Path, weights: bool) -> str:
    """Changes whenever a file of the source changes (size or mtime), so a view is never stale."""
    h = hashlib.sha256(f"{source.resolve()}|{weights}".encode())
    for path in sorted(source.iterdir()):
        if path.is_file():
            stat = path.stat()
            h.update(f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def build_view(source: Path, views: Path, weights: bool = True) -> Path:
    """A directory under ``views`` holding only the model files of ``source`` (tokenizer files and config
    only, with ``weights=False``); built once per source version."""
    final = views / _view_key(source, weights)
    if final.is_dir():
        return final
    files = MODEL_FILES if weights else TOKENIZER_FILES
    with atomic_directory(final) as tmp:
        for path in sorted(source.iterdir()):
            if not _wanted(path, files, weights):
                continue
            if path.suffix == ".json":
                _without_paths(path, tmp / path.name)
            elif path.suffix in WEIGHT_SUFFIXES:
                _link_or_copy(path, tmp / path.name)
            else:
                shutil.copyfile(path, tmp / path.name)
    return final


@dataclass(frozen=True)
class DefenseScratch:
    """A defense's own area of the cache: its artifact cache, its model views, its temporary outputs."""

    root: Path

    @classmethod
    def of(cls, cache_root: Path, defense: str) -> DefenseScratch:
        return cls(Path(cache_root) / SCRATCH_DIR / defense)

    @property
    def cache(self) -> ArtifactCache:
        return ArtifactCache(self.root / "cache")

    @property
    def views(self) -> Path:
        return self.root / "views"

    def view(self, location: str, weights: bool = True) -> str:
        """A local model directory as a view; a hub id stays as it is (it names no local path)."""
        path = Path(location)
        return str(build_view(path, self.views, weights)) if path.is_dir() else location

    def model_ref(self, ref, name: str):
        """``ref`` (a :class:`~nlpbd.models.ModelRef`) as a view with a neutral name; its identity (the key
        of cached work built on it, a hash) is unchanged."""
        return replace(ref, name=name, location=self.view(ref.location), info={})

    def output_dir(self) -> Path:
        """An empty directory for a defense's output (a purified model), moved into the cache by the pipeline."""
        from nlpbd.cache import temporary_sibling

        out = temporary_sibling(self.root / "out" / "purified")
        out.mkdir(parents=True)
        return out
