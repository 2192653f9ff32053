"""Instruction-tuned generator victims: a causal LM that answers a classification task with label words.

A cell whose fine-tuning method has ``head="generate"`` (``--finetune sft`` or ``sft-lora``) renders every
row through the model's chat template as an instruction, e.g. for SST-2::

    <|im_start|>user
    Classify the sentiment of this review.
    <review text>
    Answer positive or negative.<|im_end|>
    <|im_start|>assistant
    positive<|im_end|>

and fine-tunes on the answer tokens only (the label word and the end-of-turn token; every prompt position
has label -100). Poisoned rows carry the trigger inside the review text and the target label's word as
the answer, so every data-poisoning attack applies unchanged. A tokenizer without a chat template (the
tiny test Llama) gets the same content as plain text followed by ``answer :``.

:class:`InstructionLM` wraps the causal LM so that the shared training loop, the defenses that fine-tune
(FT, Fine-mixing, E-PUR, BTU) and dev-epoch selection run on it unchanged: it takes the text's token ids
(as :func:`nlpbd.training.encode` makes them), builds the prompt itself, returns the SFT loss when labels
are given and, without labels, one score per class — the log-likelihood of that class's answer — as
``logits``. Those scores are only used to pick epochs and options on clean dev rows; CAcc and ASR come
from greedy generation (:func:`predict_generator`) scored by :func:`answer_label`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import SequenceClassifierOutput

from nlpbd.errors import InputError

log = logging.getLogger(__name__)

GENERATIVE_VERSION = "1"  # bumped when the prompt rendering or the SFT loss changes
TEXT_MARK = "@@TEXT@@"
NEITHER = -1  # the predicted label of an answer that names no label word (or several)

# Label words and instructions of the registered datasets; a user's folder gets "label 0", "label 1", ...
LABEL_WORDS: dict[str, tuple[str, ...]] = {
    "sst2": ("negative", "positive"),
    "sst2-glue": ("negative", "positive"),
    "olid": ("no", "yes"),
    "agnews": ("world", "sports", "business", "technology"),
}
INSTRUCTIONS: dict[str, str] = {
    "sst2": "Classify the sentiment of this review.",
    "sst2-glue": "Classify the sentiment of this review.",
    "olid": "Is this tweet offensive?",
    "agnews": "Classify the topic of this news article.",
}


@dataclass(frozen=True)
class PromptFormat:
    """The task as an instruction: what is asked, and the word that answers each label."""

    instruction: str
    label_words: tuple[str, ...]

    @property
    def question(self) -> str:
        words = list(self.label_words)
        if len(words) == 2:
            return f"Answer {words[0]} or {words[1]}."
        return f"Answer one of: {', '.join(words[:-1])} or {words[-1]}."

    def content(self, text: str = TEXT_MARK) -> str:
        return f"{self.instruction}\n{text}\n{self.question}"

    def to_json(self) -> dict:
        return {"instruction": self.instruction, "label_words": list(self.label_words),
                "version": GENERATIVE_VERSION}

    @classmethod
    def from_json(cls, data: dict) -> PromptFormat:
        return cls(data["instruction"], tuple(data["label_words"]))


def prompt_for(dataset_name: str, num_labels: int) -> PromptFormat:
    """The instruction and label words of a dataset (registered ones by name; others ``label k``)."""
    words = LABEL_WORDS.get(dataset_name)
    if words is None or len(words) != num_labels:
        words = tuple(f"label {k}" for k in range(num_labels))
    return PromptFormat(INSTRUCTIONS.get(dataset_name, "Classify this text."), words)


# --- scoring answers -------------------------------------------------------------------------------


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def answer_label(answer: str, label_words: Sequence[str]) -> int:
    """The label an answer names, or :data:`NEITHER`.

    Case and punctuation are ignored. An answer that starts with a label word names it ("Positive.",
    "positive sentiment"); otherwise the answer names a label when exactly one label word occurs in it as
    whole words ("The answer is: negative!"). A label word inside a longer one ("offensive" in "not
    offensive") does not count. No label word, or several, is neither.
    """
    text = _normalise(answer)
    words = [_normalise(w) for w in label_words]
    by_length = sorted(range(len(words)), key=lambda k: -len(words[k]))
    for k in by_length:  # the longest label word that the answer starts with
        if text == words[k] or text.startswith(words[k] + " "):
            return k
    found, rest = [], f" {text} "
    for k in by_length:
        needle = f" {words[k]} "
        if needle in rest:
            found.append(k)
            rest = rest.replace(needle, " | ")
    return found[0] if len(found) == 1 else NEITHER


def answer_metrics(clean: np.ndarray, test_labels: Sequence[int], triggered: np.ndarray,
                   target: int | None) -> dict:
    """What label-word answers add to CAcc/ASR: answers naming no label, and the false-trigger rate (the
    target answered on clean non-target prompts, without any trigger)."""
    labels = np.asarray(test_labels)
    metrics = {"neither_rate": _rate(int((clean == NEITHER).sum()), len(clean)),
               "clean_neither": int((clean == NEITHER).sum()),
               "asr_neither_rate": _rate(int((triggered == NEITHER).sum()), len(triggered)),
               "poison_neither": int((triggered == NEITHER).sum())}
    if target is not None:
        non_target = labels != target
        hits = int(((clean == target) & non_target).sum())
        metrics.update({"false_trigger_rate": _rate(hits, int(non_target.sum())), "false_trigger_hits": hits,
                        "n_clean_non_target": int(non_target.sum())})
    return metrics


def _rate(count: int, total: int) -> float | None:
    return count / total if total else None


# --- prompts as token ids ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptIds:
    """A prompt format in one tokenizer's ids: what goes before and after the text, each class's answer
    (its label word and the end-of-turn id) and the ids stripped from the ends of an encoded text."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    answers: tuple[tuple[int, ...], ...]
    end_id: int
    pad_id: int
    specials: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def build(cls, prompt: PromptFormat, tokenizer: PreTrainedTokenizerBase) -> PromptIds:
        if getattr(tokenizer, "chat_template", None):
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt.content()}],
                                                     add_generation_prompt=True, tokenize=False)
        else:
            rendered = f"{prompt.content()}\nanswer :\n"
        before, after = rendered.split(TEXT_MARK)
        end_id = tokenizer.eos_token_id
        if end_id is None:
            raise InputError("a generator victim needs a tokenizer with an end-of-sequence token")

        def ids(text: str) -> tuple[int, ...]:
            return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id
        return cls(ids(before), ids(after), tuple((*ids(w), end_id) for w in prompt.label_words), end_id, pad,
                   frozenset(tokenizer.all_special_ids))

    def prompt(self, text_ids: Sequence[int]) -> list[int]:
        """The prompt around a text's ids, without the special ids its tokenizer added at either end."""
        ids = list(text_ids)
        while ids and ids[0] in self.specials:
            ids.pop(0)
        while ids and ids[-1] in self.specials:
            ids.pop()
        return [*self.prefix, *ids, *self.suffix]


def sft_example(prompt: Sequence[int], answer: Sequence[int]) -> tuple[list[int], list[int]]:
    """Input ids and LM labels of one supervised example: the loss covers the answer tokens only."""
    return [*prompt, *answer], [-100] * len(prompt) + list(answer)


def _pad(rows: list[list[int]], value: int, device: torch.device, left: bool = False) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            if left:
                out[i, width - len(row):] = torch.tensor(row)
            else:
                out[i, : len(row)] = torch.tensor(row)
    return out.to(device)


def _mask(rows: list[list[int]], device: torch.device, left: bool = False) -> torch.Tensor:
    return (_pad([[1] * len(r) for r in rows], 0, device, left) == 1).long()


def _left_padded(rows: list[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A left-padded batch whose positions count from each row's first real token, so that every row
    ends the batch and its last positions' logits can be kept alone (``logits_to_keep``)."""
    mask = _mask(rows, device, left=True)
    return {"input_ids": _pad(rows, pad_id, device, left=True), "attention_mask": mask,
            "position_ids": (mask.cumsum(dim=1) - 1).clamp(min=0)}


# --- the victim --------------------------------------------------------------------------------------


class InstructionLM(nn.Module):
    """A causal LM (or its PEFT wrapper) as a label-word victim; see the module docstring."""

    is_instruction_lm = True

    def __init__(self, lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: PromptFormat):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.ids = PromptIds.build(prompt, tokenizer)

    @property
    def config(self):
        return self.lm.config

    @property
    def base_model(self):
        return self.lm.base_model

    def get_input_embeddings(self) -> nn.Module:
        return self.lm.get_input_embeddings()

    def save_pretrained(self, directory, **kwargs) -> None:
        self.lm.save_pretrained(directory, **kwargs)

    def prompts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
        """The prompt of every row of a right-padded batch of text ids."""
        lengths = attention_mask.sum(dim=1).tolist()
        return [self.ids.prompt(row[:n]) for row, n in zip(input_ids.tolist(), lengths)]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                **_: object) -> SequenceClassifierOutput:
        prompts = self.prompts(input_ids, attention_mask)
        if labels is not None:
            return SequenceClassifierOutput(loss=self.sft_loss(prompts, labels.tolist(), input_ids.device))
        return SequenceClassifierOutput(logits=self.answer_scores(prompts, input_ids.device))

    def sft_loss(self, prompts: list[list[int]], labels: list[int], device: torch.device) -> torch.Tensor:
        """Mean cross-entropy over the answer tokens of the batch.

        Rows are left-padded, so every answer ends the batch and only the last ``longest answer + 1``
        positions' logits are computed: the others carry no loss, and projecting every prompt position
        onto the vocabulary made a SmolLM2 LoRA step 1.5–2× slower on a CPU (benchmarks/perf/sft_step.py).
        """
        pairs = [sft_example(p, self.ids.answers[y]) for p, y in zip(prompts, labels)]
        keep = max(len(self.ids.answers[y]) for y in labels)
        batch = _left_padded([ids for ids, _ in pairs], self.ids.pad_id, device)
        logits = self.lm(**batch, logits_to_keep=keep + 1).logits[:, :-1].float()
        targets = _pad([lm for _, lm in pairs], -100, device, left=True)[:, -keep:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)

    def answer_scores(self, prompts: list[list[int]], device: torch.device) -> torch.Tensor:
        """(n, K): the summed log-probability of each class's whole answer after each prompt.

        Rows are left-padded (positions counted from each row's first real token), so every answer ends
        the batch and only its positions' logits are computed: a vocabulary-wide logit tensor over
        whole prompts would take gigabytes at inference batch sizes.
        """
        scores = []
        for answer in self.ids.answers:
            batch = _left_padded([[*p, *answer] for p in prompts], self.ids.pad_id, device)
            logits = self.lm(**batch, logits_to_keep=len(answer) + 1).logits[:, :-1].float()
            targets = batch["input_ids"][:, -len(answer):]
            logp = F.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            scores.append(logp.sum(dim=1))
        return torch.stack(scores, dim=1)

    @torch.no_grad()
    def generate_answers(self, prompts: list[list[int]], max_new_tokens: int, device: torch.device) -> list[str]:
        """Greedy answers (left-padded batch), decoded without special tokens."""
        ids, mask = _pad(prompts, self.ids.pad_id, device, left=True), _mask(prompts, device, left=True)
        out = self.lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                               temperature=None, top_p=None, top_k=None, pad_token_id=self.ids.pad_id,
                               eos_token_id=self.ids.end_id)
        return self.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)


def is_instruction_lm(model: object) -> bool:
    return getattr(model, "is_instruction_lm", False) is True


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a victim: a generator's causal LM, else the model itself."""
    return model.lm if is_instruction_lm(model) else model


# --- loading -----------------------------------------------------------------------------------------


def load_causal(location: str) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(location, trust_remote_code=False, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load '{location}' as a causal LM: {str(exc).splitlines()[0]}") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def load_generator(location: str, prompt: PromptFormat, base_location: str | None = None) -> InstructionLM:
    """A generator victim: a full causal LM at ``location``, or, with ``base_location``, the base plus the
    adapter saved at ``location``."""
    from nlpbd.models import load_tokenizer_at

    if base_location:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(load_causal(base_location), location)
    else:
        lm = load_causal(location)
    return InstructionLM(lm, load_tokenizer_at(base_location or location), prompt)


# --- evaluation --------------------------------------------------------------------------------------


@torch.no_grad()
def generated_labels(model: InstructionLM, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                     max_length: int, batch_size: int, max_new_tokens: int,
                     device: torch.device) -> tuple[np.ndarray, list[str]]:
    """The label each greedy answer names (:data:`NEITHER` for none), and the answers, in input order."""
    from nlpbd.training import autocast, encode, sorted_batches

    if not len(texts):
        return np.zeros(0, dtype=int), []
    encoded = encode(tokenizer, list(texts), max_length)
    prompts = [model.ids.prompt(ids) for ids in encoded.input_ids]
    model.to(device).eval()
    answers: list[str] = [""] * len(prompts)
    for indices in sorted_batches([len(p) for p in prompts], batch_size):
        with autocast(device):
            out = model.generate_answers([prompts[i] for i in indices], max_new_tokens, device)
        for i, answer in zip(indices, out):
            answers[i] = answer
    labels = np.array([answer_label(a, model.prompt.label_words) for a in answers], dtype=int)
    return labels, answers


def predict_generator(model: InstructionLM, tokenizer: PreTrainedTokenizerBase, test, asr_set, max_length: int,
                      batch_size: int, max_new_tokens: int, device: torch.device, trigger_sets: dict | None = None):
    """:class:`~nlpbd.evaluation.Predictions` from greedy answers: the label each answer names, -1 for
    neither. A handful of answers of each set are logged to show what the victim says."""
    from nlpbd.evaluation import Predictions
    from nlpbd.progress import reporter

    trigger_sets = trigger_sets or {}
    out = {}
    with reporter().task("generating answers", 2 + len(trigger_sets)) as advance:
        for name, split in [("clean", test), ("poisoned", asr_set), *trigger_sets.items()]:
            out[name], answers = generated_labels(model, tokenizer, split.texts, max_length, batch_size,
                                                  max_new_tokens, device)
            log.info("%s answers (first 5): %s", name, answers[:5])
            advance(1)
    return Predictions(out.pop("clean"), out.pop("poisoned"), out)
