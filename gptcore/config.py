"""The run config: one YAML file, validated section by section.

    run:       name, seed, output folder
    data:      where the text comes from and how it is sharded
    tokenizer: BPE (ours) or sentencepiece, vocabulary size, split pattern
    model:     a preset plus any GPTConfig field as an override
    train:     the pre-training loop
    eval:      evaluation and sample generation
    finetune:  LoRA / full fine-tuning
    tracking:  MLflow and the Prefect result store

Every section forbids unknown keys, so a typo is an error that names the key and lists the
allowed ones, never a silently ignored setting. `--set section.key=value` overrides are parsed as
YAML scalars (`--set train.lr=3e-4`, `--set model.qk_norm=true`).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gptcore.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(Section):
    name: str = "tiny"
    seed: int = 1337
    out_dir: str | None = None  # default: runs/<name>


class DataSection(Section):
    source: str = "python-stdlib"  # python-stdlib | hf:NAME[:CONFIG][@SPLIT] | files:GLOB
    max_bytes: int | None = Field(default=None, gt=0)
    text_field: str = "text"
    shard_tokens: int = Field(default=10_000_000, gt=0)
    val_fraction: float = Field(default=0.02, gt=0.0, lt=1.0)
    num_proc: int | None = Field(default=None, gt=0)  # tokenizer processes; default: all cores

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        if v == "python-stdlib" or v.startswith("hf:") or v.startswith("files:"):
            return v
        raise ValueError("must be 'python-stdlib', 'hf:NAME[:CONFIG][@SPLIT]' or 'files:GLOB'")


class TokenizerSection(Section):
    backend: Literal["bpe", "sentencepiece"] = "bpe"
    vocab_size: int = Field(default=8192, gt=256)
    pattern: str = "gpt4"  # gpt2 | gpt4 | a regex
    special_tokens: list[str] = Field(default_factory=lambda: ["<|endoftext|>"])
    path: str | None = None  # a saved tokenizer folder, or "gpt2" for OpenAI's vocabulary
    train_bytes: int | None = Field(default=None, gt=0)  # train on at most this much text


def _model_section() -> type[Section]:
    """`model:` — `preset` plus every GPTConfig field as an optional override, derived from the dataclass
    (so a field added to GPTConfig is settable as `model.<field>` with no second list to keep)."""
    import dataclasses
    import typing

    from pydantic import create_model

    from gptcore.model.gptconfig import ATTN_IMPLS, MLP_NAMES, NORM_NAMES, POSITIONS, GPTConfig

    choices = {"norm": NORM_NAMES, "mlp": MLP_NAMES, "pos": POSITIONS, "attn_impl": ATTN_IMPLS}
    hints = typing.get_type_hints(GPTConfig)
    fields: dict[str, Any] = {"preset": (str, "tiny")}
    for f in dataclasses.fields(GPTConfig):
        kind = hints[f.name]
        if f.name in choices:
            kind = Literal[choices[f.name]]  # type: ignore[valid-type]
        elif typing.get_origin(kind) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if f.name == "dropout":
            field_ = Field(default=None, ge=0.0, lt=1.0)
        elif kind in (int, float):
            field_ = Field(default=None, gt=0)
        else:
            field_ = None
        fields[f.name] = (kind | None, field_)
    fields["vocab_size"] = (int | None, Field(default=None, gt=0))  # default: the tokenizer's

    def overrides(self) -> dict[str, Any]:
        """The GPTConfig fields this section sets (everything but `preset` that is not None)."""
        return {k: v for k, v in self.model_dump().items() if k != "preset" and v is not None}

    section = create_model("ModelSection", __base__=Section, **fields)
    section.overrides = overrides
    section.__doc__ = "`preset` names a GPTConfig preset; every other key overrides one GPTConfig field."
    return section


ModelSection = _model_section()


class TrainSection(Section):
    max_steps: int = Field(default=600, gt=0)
    batch_size: int = Field(default=16, gt=0)  # sequences per micro-batch per device
    grad_accum: int = Field(default=1, gt=0)
    block_size: int | None = Field(default=None, gt=0)  # default: model.block_size
    lr: float = Field(default=1e-3, gt=0.0)
    min_lr: float | None = Field(default=None, ge=0.0)  # default: lr / 10
    warmup_steps: int = Field(default=50, ge=0)
    schedule: Literal["cosine", "wsd"] = "cosine"  # wsd: warmup, stable at lr, decay over the last decay_fraction
    decay_fraction: float = Field(default=0.2, gt=0.0, le=1.0)
    weight_decay: float = Field(default=0.1, ge=0.0)
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: torch.optim.Muon for block matrices, AdamW for the rest
    beta1: float = Field(default=0.9, gt=0.0, lt=1.0)
    beta2: float = Field(default=0.95, gt=0.0, lt=1.0)
    grad_clip: float = Field(default=1.0, ge=0.0)  # 0 disables
    log_every: int = Field(default=10, gt=0)
    eval_every: int = Field(default=200, gt=0)
    eval_batches: int = Field(default=20, gt=0)
    ckpt_every: int = Field(default=200, gt=0)
    keep_last: int = Field(default=2, gt=0)
    max_bad_steps: int = Field(default=5, gt=0)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # autocast dtype
    compile: Literal["auto", "on", "off"] | bool = "auto"
    activation_checkpointing: bool = False
    fsdp: Literal["auto", "on", "off"] | bool = "auto"
    num_threads: int | None = Field(default=None, gt=0)
    progress: bool = True
    # processes: torchrun (torch.distributed.run) starts nproc_per_node ranks on each of nnodes machines
    nproc_per_node: int | Literal["auto"] = 1  # auto: the visible CUDA devices, else 1
    nnodes: int = Field(default=1, gt=0)
    node_rank: int = Field(default=0, ge=0)
    rdzv_endpoint: str | None = None  # HOST:PORT of node 0, needed when nnodes > 1
    node_deployment: str = "gptcore-node/gpu-node"  # the pipeline runs each node as a run of this deployment

    @field_validator("nproc_per_node")
    @classmethod
    def _positive_procs(cls, v):
        if v != "auto" and v < 1:
            raise ValueError("must be a positive number of processes or 'auto'")
        return v

    @model_validator(mode="after")
    def _nodes(self) -> "TrainSection":
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("train.nnodes > 1 needs train.rdzv_endpoint (HOST:PORT of node 0)")
        if self.node_rank >= self.nnodes:
            raise ValueError(f"train.node_rank {self.node_rank} must be below train.nnodes {self.nnodes}")
        return self

    @model_validator(mode="after")
    def _lr_order(self) -> "TrainSection":
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ValueError(f"train.min_lr ({self.min_lr}) must not exceed train.lr ({self.lr})")
        return self


class EvalSection(Section):
    """`eval:` — the one default for `gptcore evaluate` (with or without --config) and the pipeline's
    evaluate stage: 20 batches × 8 windows of the val split. Each prompt is the whole first line of
    a file (after <|endoftext|>, as documents start; no trailing space: "def " ends in a lone space
    token that training text never has before a word), continued greedily and with each seed under a
    mild repetition penalty and no repeated 4-grams (`gptcore generate` has both off unless asked)."""

    batches: int = Field(default=20, gt=0)
    prompts: list[str] = Field(default_factory=lambda: ["import os\n", "def main():\n", "class Config:\n"])
    sample_tokens: int = Field(default=48, gt=0)
    temperature: float = Field(default=0.8, ge=0.0)
    top_k: int | None = Field(default=50, gt=0)
    repetition_penalty: float = Field(default=1.1, gt=0.0)  # 1 = off (transformers' RepetitionPenalty)
    no_repeat_ngram_size: int = Field(default=4, ge=0)  # 0 = off (transformers' NoRepeatNGram); code repeats 3-grams
    seeds: list[int] = Field(default_factory=lambda: list(range(8)))  # 3 prompts × 8 seeds: 24 samples for the parse rate
    tasks: list[str] = Field(default_factory=lambda: ["val"])  # val | mc:PATH.jsonl | hellaswag


class FinetuneSection(Section):
    dataset: str = "python-docstrings"  # python-docstrings | python-packages | PATH.json(l) | hf:NAME
    task: Literal["auto", "instruct", "classify"] = "auto"
    method: Literal["lora", "full"] = "lora"
    rank: int = Field(default=8, gt=0)
    alpha: float = Field(default=16.0, gt=0.0)
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    targets: list[str] | None = None  # default: attention qkv + output, MLP in + out
    max_steps: int = Field(default=200, gt=0)
    batch_size: int = Field(default=16, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    lr: float = Field(default=1e-3, gt=0.0)
    min_lr: float | None = Field(default=None, ge=0.0)
    warmup_steps: int = Field(default=10, ge=0)
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_fraction: float = Field(default=0.2, gt=0.0, le=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    max_len: int | None = Field(default=None, gt=0)  # default: model.block_size
    max_examples: int | None = Field(default=None, gt=0)
    log_every: int = Field(default=10, gt=0)
    eval_every: int = Field(default=100, gt=0)
    ckpt_every: int = Field(default=100, gt=0)
    eval_batches: int = Field(default=20, gt=0)
    num_samples: int = Field(default=5, ge=0)
    activation_checkpointing: bool = False
    base_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    nproc_per_node: int | Literal["auto"] | None = None  # default: train.nproc_per_node


class TrackingSection(Section):
    enabled: bool = True
    experiment: str | None = None  # default: run.name
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    register_models: bool = True
    result_store: str = ".gptcore"
    log_every: int = Field(default=10, gt=0)  # batch this many metric rows per log_batch
    gate_seeds: int = Field(default=1, gt=0)  # >1: promote only a recipe better over this many seeds...
    gate_p: float = Field(default=0.05, gt=0.0, lt=1.0)  # ...at Welch's one-sided p below this


class Config(Section):
    run: RunSection = Field(default_factory=RunSection)
    data: DataSection = Field(default_factory=DataSection)
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection)
    model: ModelSection = Field(default_factory=ModelSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)

    @property
    def out_dir(self) -> Path:
        return Path(self.run.out_dir or f"runs/{self.run.name}")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def flat(self) -> dict[str, Any]:
        """`{"train.lr": 0.001, ...}` — the shape MLflow params want."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}


# --------------------------------------------------------------------------------------------
# loading, overrides and readable errors


def _closest(name: str, allowed: list[str]) -> str:
    near = difflib.get_close_matches(name, allowed, n=1)
    hint = f"did you mean '{near[0]}'? " if near else ""
    return f"{hint}allowed: {', '.join(allowed)}"


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)


def _to_config_error(err: ValidationError, source: str) -> ConfigError:
    e = err.errors()[0]
    loc = tuple(str(p) for p in e["loc"])
    key = ".".join(loc) or "<root>"
    if e["type"] == "extra_forbidden":
        return ConfigError(f"unknown config key '{key}'", source, _closest(loc[-1], _allowed_keys(loc)))
    msg = e["msg"].removeprefix("Value error, ")
    if isinstance(e.get("input"), dict):  # a rule across keys of a section: the message names them
        return ConfigError(msg, source, "set the keys it names consistently")
    if e["type"] == "literal_error":
        return ConfigError(f"bad value {e.get('input')!r} for '{key}'", source, msg.lower())
    return ConfigError(f"bad value {e.get('input')!r} for '{key}'", source, msg)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`"train.lr=3e-4"` → (["train", "lr"], 0.0003): the value is read as a YAML scalar."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' has no '='", "--set", "write it as section.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key '{key}' is not section.key", "--set", f"sections: {', '.join(Config.model_fields)}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads "3e-4" as a string; accept it as the float a user meant
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return parts, value


def config_from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), source: str = "<config>") -> Config:
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in (data or {}).items()}
    for item in overrides:
        (section, key), value = parse_override(item)
        if section not in Config.model_fields:
            raise ConfigError(f"unknown config section '{section}'", "--set", _closest(section, list(Config.model_fields)))
        if not isinstance(data.get(section, {}), dict):
            raise ConfigError(f"config section '{section}' is not a mapping", source, "write it as 'section:' with keys below it")
        data.setdefault(section, {})[key] = value
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise _to_config_error(err, source) from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or the defaults when `path` is None) and apply `--set` overrides."""
    if path is None:
        return config_from_dict({}, overrides)
    p = Path(path)
    if not p.is_file():
        raise ConfigError("config file not found", str(p), "pass the path of a YAML config, e.g. configs/tiny.yaml")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"config is not valid YAML: {first}", str(p), "fix the YAML syntax") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("config must be a mapping of sections", str(p), f"top-level keys: {', '.join(Config.model_fields)}")
    cfg = config_from_dict(data, overrides, source=str(p))
    if cfg.run.name == "tiny" and "name" not in (data.get("run") or {}):
        cfg.run.name = p.stem
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


def check_config(cfg: Config) -> None:
    """Everything that can be checked before any work (no torch needed): the model shape (GPTConfig's
    own checks — n_embd % n_head, rope's even head size, ... — with the vocabulary the tokenizer
    section will give), train.block_size within model.block_size, the fine-tuning precision rules."""
    from gptcore.model.gptconfig import GPTConfig

    over = cfg.model.overrides()
    over.setdefault("vocab_size", 50257 if cfg.tokenizer.path == "gpt2" else cfg.tokenizer.vocab_size)
    gcfg = GPTConfig.preset(cfg.model.preset, **over)  # raises ConfigError naming the model.* key
    T = cfg.train.block_size or gcfg.block_size
    if T > gcfg.block_size:
        raise ConfigError(f"train.block_size {T} exceeds model.block_size {gcfg.block_size}", "train.block_size",
                          "lower it or raise model.block_size")
    if cfg.finetune.base_dtype == "bfloat16" and cfg.finetune.method == "full":
        raise ConfigError("full fine-tuning keeps float32 master weights", "finetune.base_dtype",
                          "use base_dtype auto/float32 with method full, or method lora")
