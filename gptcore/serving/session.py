"""A model folder ready to answer prompts: raw continuation, or through its fine-tuning template.

    s = Session("artifacts/finetune/<key>")            # finetune.json says prompt_template: alpaca
    s.complete("Return the sum of a and b.", temperature=0)       # the answer, as fine-tuning trained it
    for piece in s.stream(s.chat_ids([("hi", "hello!")], "and now?"), 64): print(piece, end="")

Prompts are built with the very token ids fine-tuning trained on (`gptcore.data.sft.Encoder`):
each turn is `### Instruction: ... ### Response:` followed by the reply and <|endoftext|>, so a
conversation looks to the model like the training examples it saw, one after another. A model
without a template (pre-trained only) continues the text as given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from gptcore.errors import CheckpointError, ConfigError

TEMPLATE_FILE = "finetune.json"  # written by fine-tuning into final/
TEMPLATES = ("alpaca",)


def read_prompt_template(model_dir: str | Path) -> str | None:
    """The prompt template a fine-tuned model folder was trained with ("alpaca"), None if it has none."""
    path = Path(model_dir) / TEMPLATE_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("prompt_template")
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"cannot read {TEMPLATE_FILE} ({exc.__class__.__name__})", str(path),
                              "fine-tune again, or delete the file to use the model without a template") from None


def prompt_template(model_dir: str | Path, adapter_dir: str | Path | None = None) -> str:
    """The template to put an instruction through: the adapter's (its adapter.json) when one is applied,
    else the folder's (finetune.json), else the default, alpaca (the one gptcore fine-tunes with)."""
    if adapter_dir is not None:
        from gptcore.model.lora import read_adapter_meta

        template = read_adapter_meta(adapter_dir).get("prompt_template")
    else:
        template = read_prompt_template(model_dir)
    template = template or TEMPLATES[0]
    if template not in TEMPLATES:
        raise ConfigError(f"unknown prompt template {template!r}", str(adapter_dir or model_dir),
                          f"known templates: {', '.join(TEMPLATES)}")
    return template


def instruction_ids(tokenizer, block_size: int, instruction: str, input: str = "", model_dir: str | Path = ".",
                    adapter_dir: str | Path | None = None, room: int = 0) -> list[int]:
    """The token ids of one instruction (and its input) in the model's template, exactly as fine-tuning
    encoded its prompts (`gptcore.data.sft.Encoder`), the input cut so `room` new tokens fit."""
    from gptcore.data.sft import Encoder

    prompt_template(model_dir, adapter_dir)  # the only template is alpaca: this checks the folder names it
    return Encoder(tokenizer, block_size).prompt_ids({"instruction": instruction, "input": input},
                                                     room=min(room, block_size // 2))


@dataclass
class Reply:
    """What a finished stream produced: its text, how many tokens, and why it ended
    ("stop": <|endoftext|> or a stop string; "length": max_new_tokens)."""

    text: str = ""
    prompt_tokens: int = 0
    tokens: int = 0
    finish_reason: str = "length"


class Session:
    """A loaded model + tokenizer + prompt template (`template`: "auto" = the folder's, "none", "alpaca")."""

    def __init__(self, model_dir: str | Path, template: str | None = "auto", device: str = "cpu"):
        from gptcore.model.folder import load_model

        self.model_dir = Path(model_dir)
        self.model, self.tokenizer = load_model(model_dir, device)
        self.template = read_prompt_template(model_dir) if template == "auto" else (None if template in (None, "none") else template)
        if self.template is not None and self.template not in TEMPLATES:
            raise ConfigError(f"unknown prompt template {self.template!r}", "--template", f"use auto, none or {', '.join(TEMPLATES)}")
        self.block_size = self.model.config.block_size
        self.encoder = None
        if self.template:
            from gptcore.data.sft import Encoder

            self.encoder = Encoder(self.tokenizer, self.block_size)

    @property
    def name(self) -> str:
        return self.model_dir.name

    # ---- prompts -------------------------------------------------------------------------------
    def chat_ids(self, history: Sequence[tuple[str, str]], message: str, room: int = 0) -> list[int]:
        """Token ids for `message` after the (user, assistant) turns of `history`; the oldest turns are
        dropped so that `room` new tokens still fit in the block (the current message is kept)."""
        if self.encoder is None:  # no template: the conversation is one running text
            text = "".join(u + a for u, a in history) + message
            ids = self.tokenizer.encode(text, allowed_special="all") or [self.tokenizer.eot_id]
            return ids[-max(1, self.block_size - room):]
        eot = self.tokenizer.eot_id
        turns = [self.encoder.prompt_ids({"instruction": u, "input": ""}) + self.encoder._enc(a) + [eot] for u, a in history]
        ids = self.encoder.prompt_ids({"instruction": message, "input": ""}, room=room)
        budget = self.block_size - room
        for t in reversed(turns):
            if len(ids) + len(t) > budget:
                break
            ids = t + ids
        return ids

    def prompt_ids(self, prompt: str, room: int = 0) -> list[int]:
        """One prompt: through the template when the model has one, else as raw text."""
        return self.chat_ids((), prompt, room)

    # ---- generation ----------------------------------------------------------------------------
    def stream(self, ids: list[int], max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, stop: Sequence[str] = (),
               reply: Reply | None = None, **penalties) -> Iterator[str]:
        """Yield the continuation of `ids` piece by piece, ending at <|endoftext|>, at the first stop
        string (not yielded) or after max_new_tokens. Text that might begin a stop string is held
        back until it is clearly not one. `reply` receives the totals. `penalties`:
        repetition_penalty, no_repeat_ngram_size (gptcore.model.generate; off by default)."""
        from gptcore.model.generate import check_sampling, stream_ids

        check_sampling(max_new_tokens, temperature, top_k, top_p, **penalties)
        reply = Reply() if reply is None else reply
        reply.prompt_tokens = len(ids)
        stops = [s for s in stop if s]
        hold = max((len(s) - 1 for s in stops), default=0)
        stats: dict = {}
        pending = ""
        for piece in stream_ids(self.model, self.tokenizer, ids, max_new_tokens, temperature, top_k, top_p, seed,
                                stats=stats, **penalties):
            pending += piece
            cut = min((pending.find(s) for s in stops if s in pending), default=-1)
            if cut >= 0:
                reply.text += pending[:cut]
                reply.tokens, reply.finish_reason = stats["tokens"], "stop"
                if cut:
                    yield pending[:cut]
                return
            if len(pending) > hold:
                out, pending = pending[: len(pending) - hold], pending[len(pending) - hold:]
                reply.text += out
                yield out
        reply.text += pending
        if pending:
            yield pending
        reply.tokens = stats.get("tokens", 0)
        reply.finish_reason = "stop" if stats.get("eot") else "length"

    def complete(self, prompt: str, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop: Sequence[str] = ()) -> str:
        """The whole reply to one prompt (template applied when the model has one)."""
        ids = self.prompt_ids(prompt, room=min(max_new_tokens, self.block_size // 2))
        return "".join(self.stream(ids, max_new_tokens, temperature, top_k, top_p, seed, stop))
