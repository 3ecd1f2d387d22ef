"""The `gptcore` command line: verb groups, each verb thin over one library function.

    gptcore tokenizer train|encode|decode|export-tiktoken     (gptcore.tokenizer)
    gptcore prepare                                           (gptcore.data.sharding)
    gptcore pretrain | plan | evaluate                        (gptcore.training.pretrain, gptcore.evaluation.evaluate)
    gptcore finetune                                          (gptcore.finetuning.finetune)
    gptcore generate | convert from-hf|to-hf|to-gguf          (gptcore.model.gpt, gptcore.convert)
    gptcore chat | serve                                      (gptcore.serving)
    gptcore run | sweep | deploy                              (flows/, imported lazily)

A user error (`GptcoreError`) prints `error: <what> (<where>): <what to do>` and exits 2; Ctrl-C
exits 130 ("interrupted") and SIGTERM 143 ("terminated"), cleanly. `--debug` shows the traceback
instead. After a signal, `gptcore run` ends within SHUTDOWN_SECONDS whatever its cleanup waits on
(docs/reliability.md).
"""

from __future__ import annotations

import atexit
import gc
import os
import shlex
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional

import typer

try:  # typer >= 0.29 vendors its own click; Abort and Exit live in typer.exceptions
    from typer._click.exceptions import ClickException
    from typer.exceptions import Abort, Exit
except ImportError:  # pragma: no cover - older typer on top of click
    from click.exceptions import Abort, ClickException, Exit

from gptcore.errors import GptcoreError, environment_error

_DEBUG = {"on": os.environ.get("GPTCORE_DEBUG", "") not in ("", "0")}


class Terminated(BaseException):
    """SIGTERM, turned into an exception so `finally` blocks and servers shut down normally."""


_SIGNALLED: list[int] = []  # the first SIGINT/SIGTERM; later ones must not break the cleanup it started
SHUTDOWN_SECONDS = float(os.environ.get("GPTCORE_SHUTDOWN_SECONDS", "7"))
_EXIT_LINE = {130: "interrupted", 143: "terminated"}


def _on_sigterm(signum, frame):
    if not (_SIGNALLED and _FAST_EXIT["on"]):
        _SIGNALLED.append(signum)
        raise Terminated()


def _on_sigint(signum, frame):
    if not (_SIGNALLED and _FAST_EXIT["on"]):
        _SIGNALLED.append(signum)
        raise KeyboardInterrupt()


_FAST_EXIT = {"on": False, "keep": None}


def _arm_shutdown_deadline() -> None:
    """For `gptcore run`: the first SIGINT/SIGTERM unwinds the main thread (runs marked KILLED, ranks and
    the temporary server stopped); a watcher thread, woken by the signal itself (signal.set_wakeup_fd,
    whichever Python handler Prefect has swapped in), ends the process SHUTDOWN_SECONDS later if the
    cleanup is still waiting on something (a dead API, a stuck rank), killing torchrun and the ranks
    still running and marking KILLED the MLflow runs still open. Later Ctrl-Cs are ignored
    meanwhile."""
    import socket
    import threading

    r, w = socket.socketpair()
    w.setblocking(False)
    try:
        signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGINT, _on_sigint)
    except ValueError:  # not the main thread
        return
    _FAST_EXIT.update(on=True, keep=(r, w))

    def watch() -> None:
        sig = 0
        while sig not in (signal.SIGINT, signal.SIGTERM):  # other signals (SIGALRM: Prefect's timeouts) pass
            sig = r.recv(1)[0]
        time.sleep(SHUTDOWN_SECONDS)
        code = 130 if sig == signal.SIGINT else 143
        if "gptcore.processes" in sys.modules:  # torchrun's ranks, still in launch's grace: never orphaned
            sys.modules["gptcore.processes"].kill_owned_trees()
        if "flows.runner" in sys.modules:  # the runs the main thread did not get to end
            from flows.runner import end_open_runs

            end_open_runs(f"{_EXIT_LINE[code]}: shutdown did not finish within {SHUTDOWN_SECONDS:.0f} s")
        print(f"\n{_EXIT_LINE[code]} (cleanup still unfinished after {SHUTDOWN_SECONDS:.0f} s: left it)",
              file=sys.stderr, flush=True)  # a new line: Prefect's complaints about the API end without one
        os._exit(code)

    threading.Thread(target=watch, name="gptcore-shutdown-deadline", daemon=True).start()


def _leave(code: int) -> None:
    """Exit with `code` after a signal: the line, then (for `gptcore run`, whose cleanup is done by now)
    no interpreter teardown, where Prefect would retry shipping logs to the server it no longer has."""
    print(_EXIT_LINE[code], file=sys.stderr, flush=True)
    if _FAST_EXIT["on"]:
        sys.stdout.flush()
        os._exit(code)
    sys.exit(code)


def fail(what: str, where: str | None = None, fix: str | None = None) -> None:
    raise GptcoreError(what, where, fix)


class _App(typer.Typer):
    """A typer app whose entry point turns user errors and signals into exit codes, no traceback."""

    def __call__(self, *args, **kwargs):
        if "--debug" in sys.argv[1:]:
            _DEBUG["on"] = True
        if not _DEBUG["on"]:  # a warning is one line, like an error: `warning: <what>`
            import warnings

            warnings.formatwarning = lambda message, *_args, **_kw: f"warning: {message}\n"
        try:
            signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread (e.g. inside a test runner thread)
            pass
        try:
            code = super().__call__(*args, standalone_mode=False, **kwargs)
        except GptcoreError as exc:
            if _DEBUG["on"]:
                traceback.print_exc()
            print(f"error: {exc.message()}", file=sys.stderr)
            sys.exit(2)
        except (Abort, KeyboardInterrupt):
            _leave(130)
        except Terminated:
            _leave(143)
        except ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except Exit as exc:
            sys.exit(exc.exit_code)
        except (BrokenPipeError,):
            sys.exit(1)
        except Exception as exc:  # a full disk or a read-only store, however a library wrapped it: one line
            err = environment_error(exc)
            if err is None or _DEBUG["on"]:
                raise
            print(f"error: {err.message()}", file=sys.stderr)
            sys.exit(2)
        except BaseException as exc:
            if type(exc).__name__ != "TerminationSignal":  # Prefect's SIGTERM, if it outran ours
                raise
            _leave(143)
        if code == 130:  # typer (>= 0.29) turns a KeyboardInterrupt into this return code, silently
            _leave(130)
        sys.exit(code if isinstance(code, int) else 0)


app = _App(
    name="gptcore",
    help="GPT-2 from scratch: tokenizer, model, pre-training, evaluation, LoRA fine-tuning, pipelines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks for errors.")) -> None:
    if debug:
        _DEBUG["on"] = True


SetOpt = typer.Option(None, "--set", help="Override a config key: section.key=value (repeatable; "
                      "after those in $GPTCORE_SET).")
ENV_OVERRIDES = "GPTCORE_SET"  # e.g. "train.max_steps=20 data.max_bytes=500000": every config-reading verb applies it
_ENV_SHOWN = {"on": False}


def _overrides(overrides: Optional[List[str]]) -> List[str]:
    """The `--set` overrides of a command, after those of $GPTCORE_SET (space-separated section.key=value,
    shell-quoted), so the command line wins. A small GPTCORE_SET makes every documented command quick
    (the docs test runs the pages that way); it is named on stderr so a shrunken run is never a surprise."""
    env = shlex.split(os.environ.get(ENV_OVERRIDES, ""))
    if env and not _ENV_SHOWN["on"]:
        print(f"{ENV_OVERRIDES}: {' '.join(env)}", file=sys.stderr)
        _ENV_SHOWN["on"] = True
    return env + list(overrides or [])


def _rank_zero() -> bool:
    """Whether this process prints a run's summary: always, except ranks 1.. that `torchrun -m
    gptcore.cli ...` started (RANK set), so the summary is printed once, not once per rank."""
    return os.environ.get("RANK", "0") == "0"


def _load_config(path: Optional[Path], overrides: Optional[List[str]]):
    # our config models need no pydantic plugin: skip the scan of every installed package's entry points
    # (~10 ms of `gptcore prepare`), as typer does for its own parameters
    previous = os.environ.get("PYDANTIC_DISABLE_PLUGINS")
    os.environ["PYDANTIC_DISABLE_PLUGINS"] = "__all__"
    try:
        from gptcore.config import load_config

        return load_config(path, _overrides(overrides))
    finally:
        if previous is None:
            del os.environ["PYDANTIC_DISABLE_PLUGINS"]
        else:
            os.environ["PYDANTIC_DISABLE_PLUGINS"] = previous


# === section: tokenizer (issue 3) ============================================================
tokenizer_app = typer.Typer(help="Train, use and export byte-level BPE tokenizers.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")


@tokenizer_app.command("train")
def tokenizer_train(
    files: List[Path] = typer.Argument(..., help="UTF-8 text files to train on."),
    vocab_size: int = typer.Option(..., "--vocab-size", help="256 bytes + merges + special tokens."),
    out: Path = typer.Option(..., "--out", help="Folder to write tokenizer.json into."),
    pattern: str = typer.Option("gpt4", "--pattern", help="Split regex: gpt2, gpt4 or a regex."),
    special: Optional[List[str]] = typer.Option(None, "--special", help="A special token (repeatable)."),
    backend: str = typer.Option("bpe", "--backend", help="bpe (ours) or sentencepiece."),
) -> None:
    """Train a tokenizer on FILE... and save it to --out."""
    from gptcore.tokenizer import ENDOFTEXT, train_files

    tok = train_files(files, out, vocab_size, pattern, special or [ENDOFTEXT], backend)
    print(f"saved {tok.vocab_size}-token {backend} tokenizer to {out}/tokenizer.json (sha256 {tok.sha256[:16]})")


@tokenizer_app.command("encode")
def tokenizer_encode(
    directory: Path = typer.Argument(..., help="A saved tokenizer folder."),
    text: str = typer.Argument(..., help="Text to encode."),
    allowed_special: str = typer.Option("all", "--allowed-special", help="all | none | none_raise"),
) -> None:
    """Print the token ids of TEXT, space-separated."""
    from gptcore.tokenizer import load_tokenizer

    if allowed_special not in ("all", "none", "none_raise"):
        fail(f"unknown --allowed-special {allowed_special!r}", "--allowed-special", "use all, none or none_raise")
    tok = load_tokenizer(directory)
    try:
        ids = tok.encode(text, allowed_special=allowed_special)
    except ValueError as exc:
        fail(str(exc), "TEXT", "pass --allowed-special all or none")
    print(" ".join(map(str, ids)))


@tokenizer_app.command("decode")
def tokenizer_decode(
    directory: Path = typer.Argument(..., help="A saved tokenizer folder."),
    ids: List[str] = typer.Argument(..., help="Token ids."),
) -> None:
    """Print the text of token IDS."""
    from gptcore.tokenizer import load_tokenizer

    tok = load_tokenizer(directory)
    try:
        print(tok.decode([int(i) for i in ids]))
    except ValueError as exc:
        fail(str(exc), "ID", f"give integer ids in 0..{tok.vocab_size - 1}")


@tokenizer_app.command("export-tiktoken")
def tokenizer_export_tiktoken(
    directory: Path = typer.Argument(..., help="A saved bpe tokenizer folder."),
    path: Path = typer.Argument(..., help="The .tiktoken rank file to write."),
) -> None:
    """Write the vocabulary as a .tiktoken rank file (load it with tiktoken.load.load_tiktoken_bpe)."""
    from gptcore.tokenizer import load_tokenizer

    tok = load_tokenizer(directory)
    tok.save_tiktoken(path)
    print(f"wrote {path} ({tok.vocab_size - len(tok.special_tokens)} ranks; specials {tok.special_tokens})")


# === section: model, generate, convert (issue 4) =============================================

convert_app = typer.Typer(help="Convert gptcore model folders to and from Hugging Face GPT-2 folders, and to GGUF.",
                          no_args_is_help=True)
app.add_typer(convert_app, name="convert")


@app.command()
def generate(
    checkpoint: Path = typer.Argument(..., help="A model folder (config.json, model.safetensors, tokenizer/)."),
    text: Optional[str] = typer.Argument(None, metavar="[PROMPT]", help="Text to continue (the same as --prompt)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text to continue (empty: start a new document)."),
    instruction: Optional[str] = typer.Option(None, "--instruction", "-i", help="An instruction, put through the "
                                              "model's fine-tuning template (its adapter.json / finetune.json; default alpaca)."),
    input_: Optional[str] = typer.Option(None, "--input", help="The instruction's input (the template's ### Input: block)."),
    max_new_tokens: int = typer.Option(100, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="0 = greedy."),
    top_k: Optional[int] = typer.Option(200, "--top-k"),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="A LoRA adapter folder to apply."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="> 1 discourages tokens already seen (1 = off)."),
    no_repeat_ngram_size: int = typer.Option(0, "--no-repeat-ngram-size", help="Never repeat an n-gram of this size (0 = off)."),
) -> None:
    """Stream a continuation of PROMPT (or --prompt) to stdout; with --instruction, the model's answer."""
    from gptcore.model.folder import load_model
    from gptcore.model.generate import stream_ids, stream_text

    if text is not None and prompt is not None:
        fail("the prompt is given twice (PROMPT and --prompt)", "generate", "give one of them")
    prompt = text if text is not None else prompt
    if instruction is not None and prompt is not None:
        fail("--instruction and a prompt exclude each other", "--instruction",
             "give an instruction (the template is added) or a raw prompt, not both")
    if input_ is not None and instruction is None:
        fail("--input needs --instruction", "--input", "add --instruction TEXT")
    model, tokenizer = load_model(checkpoint)
    if adapter is not None:
        from gptcore.model.lora import apply_adapter

        model = apply_adapter(model, adapter, base_dir=checkpoint)
    if instruction is not None:
        from gptcore.serving.session import instruction_ids

        ids = instruction_ids(tokenizer, model.config.block_size, instruction, input_ or "", checkpoint, adapter,
                              room=max_new_tokens)
        pieces = stream_ids(model, tokenizer, ids, max_new_tokens, temperature, top_k, top_p, seed,
                            repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size)
    else:
        sys.stdout.write(prompt or "")
        pieces = stream_text(model, tokenizer, prompt or "", max_new_tokens, temperature, top_k, top_p, seed,
                             repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@convert_app.command("from-hf")
def convert_from_hf(hf_dir: str = typer.Argument(..., help="save_pretrained folder (or hub id when online)."),
                    out: Path = typer.Argument(..., help="Model folder to write.")) -> None:
    """Hugging Face GPT2LMHeadModel folder -> gptcore model folder."""
    from gptcore.convert.hf import checkpoint_from_hf

    print(checkpoint_from_hf(hf_dir, out))


@convert_app.command("to-hf")
def convert_to_hf(checkpoint: Path = typer.Argument(..., help="gptcore model folder."),
                  out: Path = typer.Argument(..., help="Folder for GPT2LMHeadModel.from_pretrained.")) -> None:
    """gptcore model folder -> Hugging Face GPT2LMHeadModel folder."""
    from gptcore.convert.hf import checkpoint_to_hf

    print(checkpoint_to_hf(checkpoint, out))

# === section: use the model: chat, serve (issue 13) ==========================================


@app.command("chat")
def chat_cmd(
    checkpoint: Path = typer.Argument(..., help="A model folder, e.g. a fine-tuned final/ (its finetune.json names the template)."),
    temperature: float = typer.Option(0.7, "--temperature", "-t", help="0 = greedy; change it in the chat with /temp."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n"),
    top_k: Optional[int] = typer.Option(200, "--top-k"),
    template: str = typer.Option("auto", "--template", help="auto (the folder's), alpaca or none."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="> 1 discourages tokens already seen (1 = off)."),
    no_repeat_ngram_size: int = typer.Option(0, "--no-repeat-ngram-size", help="Never repeat an n-gram of this size (0 = off)."),
) -> None:
    """Chat with an instruction-tuned model in the terminal (/reset, /temp 0.7, Ctrl-D quits)."""
    from gptcore.serving.chat import chat
    from gptcore.serving.session import Session

    chat(Session(checkpoint, template), temperature, max_new_tokens, top_k, seed,
         repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size)


@app.command("serve")
def serve_cmd(
    checkpoint: Path = typer.Argument(..., help="A model folder."),
    port: int = typer.Option(8000, "--port", "-p"),
    host: str = typer.Option("127.0.0.1", "--host", help="0.0.0.0 to listen on every interface."),
    template: str = typer.Option("auto", "--template", help="Chat template: auto (the folder's), alpaca or none."),
) -> None:
    """Serve an OpenAI-compatible API: /v1/completions and /v1/chat/completions (streaming too)."""
    from gptcore.serving.openai_api import serve
    from gptcore.serving.session import Session

    serve(Session(checkpoint, template), host, port)

@convert_app.command("to-gguf")
def convert_to_gguf(checkpoint: Path = typer.Argument(..., help="gptcore model folder."),
                    out: Path = typer.Argument(..., help="The .gguf file to write (llama.cpp, Ollama)."),
                    dtype: str = typer.Option("f32", "--dtype", help="f32 or f16 (matrices; norms and biases stay f32).")) -> None:
    """gptcore model folder -> GGUF file for llama.cpp / Ollama (gpt2 architecture)."""
    from gptcore.convert.gguf_export import checkpoint_to_gguf

    print(checkpoint_to_gguf(checkpoint, out, dtype))

# === section: data / prepare (issue 5) =======================================================


@app.command("prepare")
def prepare_cmd(
    config: Path = typer.Argument(..., help="YAML config (data + tokenizer sections are used)."),
    out: Path = typer.Option(..., "--out", help="Data folder: tokenizer/, train_*.bin, val_*.bin, manifest.json."),
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Download the corpus, train (or load) the tokenizer and write token shards + manifest.json."""
    from gptcore.data.sharding import prepare

    cfg = _load_config(config, set_)
    atexit.register(_skip_teardown)
    gc.freeze()  # what is loaded by now lives until exit: no collection walks it again (~40 ms of GPT-2's vocabulary)
    m = prepare(cfg, out)
    for split, s in m["splits"].items():
        print(f"{split}: {s['documents']} documents, {s['bytes']:,} bytes, {s['tokens']:,} tokens, {len(s['shards'])} shard(s)")
    print(f"tokenizer {m['tokenizer_sha256'][:12]} (vocab {m['vocab_size']}) -> {out}")
    _SKIP_TEARDOWN["on"] = True  # every output is renamed into place and fsynced: ~0.1 s of teardown saved

# === section: pretrain, plan, evaluate (issue 6) =============================================


@app.command("pretrain")
def pretrain_cmd(
    config: Path = typer.Argument(..., help="YAML config (configs/tiny.yaml)."),
    data: Path = typer.Option(..., "--data", help="Folder written by `gptcore prepare` (shards + tokenizer/)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: the config's run.out_dir)."),
    overrides: Optional[List[str]] = SetOpt,
) -> None:
    """Pre-train on prepared shards; run it again to resume from the newest intact checkpoint.
    With train.nproc_per_node (× train.nnodes) > 1 every rank runs under torchrun."""
    from gptcore.training.launch import run_engine

    cfg = _load_config(config, overrides)
    s = run_engine("pretrain", cfg, [data], out or cfg.out_dir)
    if not _rank_zero():
        return
    num = lambda k: "-" if s.get(k) is None else f"{s[k]:.4f}"  # noqa: E731
    print(f"step {s['step']}  train loss {num('train_loss')}  val loss {num('val_loss')}  "
          f"val bpb {num('val_bpb')}  ({s['seconds']:.0f} s)")
    print(f"model: {s['final_dir']}")


@app.command("plan")
def plan_cmd(
    config: Path = typer.Argument(..., help="YAML config."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="GPU name (H100, A100-40GB, L4, RTX 4090...) or cpu."),
    world_size: int = typer.Option(1, "--world-size", "-n", help="Number of devices (torchrun processes)."),
    finetune: bool = typer.Option(False, "--finetune", help="Plan the config's fine-tuning (finetune section) instead of pre-training."),
    overrides: Optional[List[str]] = SetOpt,
) -> None:
    """Parameters, memory per device, tokens/step, time per step and a recommendation."""
    from gptcore.training.plan import format_plan, format_plan_finetune, plan, plan_finetune

    cfg = _load_config(config, overrides)
    if finetune:
        print(format_plan_finetune(plan_finetune(cfg, gpu=gpu)))
    else:
        print(format_plan(plan(cfg, gpu=gpu, world_size=world_size)))


@app.command("evaluate")
def evaluate_cmd(
    checkpoint: Path = typer.Argument(..., help="A model folder: RUN/final or RUN/checkpoints/step_NNNNNN."),
    data: Path = typer.Option(..., "--data", help="Folder written by `gptcore prepare`."),
    tasks: Optional[List[str]] = typer.Option(None, "--tasks", help="val | samples | mc:PATH.jsonl | hellaswag | lm-eval:TASK (repeatable)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Config for eval prompts/seeds/batches."),
    previous: Optional[Path] = typer.Option(None, "--previous", help="eval.json of the previous best model."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write eval.json (default: CHECKPOINT/eval.json)."),
    overrides: Optional[List[str]] = SetOpt,
) -> None:
    """Validation loss/perplexity/bits-per-byte vs baselines, samples, multiple choice; writes eval.json."""
    from gptcore.evaluation.evaluate import evaluate_checkpoint, format_report

    cfg = _load_config(config, overrides)
    chosen = [t for item in (tasks or cfg.eval.tasks) for t in item.split(",") if t]
    out_file = out or Path(checkpoint) / "eval.json"
    result = evaluate_checkpoint(checkpoint, data, cfg, tasks=chosen, out_file=out_file, previous=previous)
    print(format_report(result))
    print(f"wrote {out_file}")

# === section: finetune (issue 7) =============================================================


@app.command("finetune")
def finetune_cmd(
    config: Path = typer.Argument(..., help="YAML config; its finetune: section picks data, task, method, LoRA rank."),
    base: Path = typer.Option(..., "--base", help="Base model folder (pretrain's final/, or `gptcore convert from-hf`)."),
    overrides: Optional[List[str]] = SetOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: <run.out_dir>/finetune)."),
) -> None:
    """Fine-tune --base (LoRA or full) for instructions or classification; run again to resume."""
    cfg = _load_config(config, overrides)
    from gptcore.finetuning.finetune import format_summary
    from gptcore.training.launch import run_engine

    summary = run_engine("finetune", cfg, [base], out or cfg.out_dir / "finetune")
    if _rank_zero():
        print(format_summary(summary))


# === section: run, deploy (issue 8) ==========================================================


@app.command("run")
def run_cmd(
    config: Optional[Path] = typer.Argument(Path("configs/tiny.yaml"), help="YAML config (default: configs/tiny.yaml)."),
    until: str = typer.Option("register", "--until", help="Stop after this stage: download, train_tokenizer, "
                              "shard, pretrain, evaluate, finetune or register."),
    overrides: Optional[List[str]] = SetOpt,
    refresh: bool = typer.Option(False, "--refresh", help="Recompute every stage instead of using the cache."),
    base: Optional[Path] = typer.Option(None, "--base", help="Fine-tune this model folder instead of pre-training."),
) -> None:
    """Run the pipeline as Prefect flows tracked in MLflow: download -> tokenizer -> shards -> pretrain
    -> evaluate -> finetune -> register. Stages whose inputs did not change are cache hits."""
    from flows import timeline
    from flows.preflight import check_environment
    from gptcore.config import check_config, load_config

    timeline.mark("cli: run (python, typer, gptcore.cli imported)")
    overrides = _overrides(overrides)
    cfg = load_config(config, overrides)
    check_config(cfg)  # a bad config is one error line, before Prefect starts
    _arm_shutdown_deadline()
    atexit.register(_skip_teardown)  # registered first, so it runs after Prefect's and MLflow's handlers
    if base is not None and not base.is_dir():
        fail("base model folder not found", str(base), "pass a folder written by pretrain or `gptcore convert from-hf`")
    if base is not None and until not in ("finetune", "register"):
        fail(f"--until {until} never happens with --base (only finetune and register run)", "--until",
             "use --until finetune or register, or drop --base")
    check_environment(cfg, base)  # the whole config and the tracking store: one error line, before Prefect starts
    from flows.server import prefect_api

    timeline.mark("cli: preflight done")
    with prefect_api() as server_ready:  # a running Prefect server, or a temporary one starting meanwhile
        from flows.pipeline import open_tracking, run_pipeline
        from flows.runner import check_until, format_report

        timeline.mark("imports: flows.pipeline (prefect, mlflow)")
        timeline.instrument()
        until = check_until(until)  # before anything is written
        open_tracking(str(config), overrides or [])
        timeline.mark("mlflow: store open")
        server_ready()
        timeline.mark("server: healthy")
        report = run_pipeline(str(config), overrides or [], until, refresh, quiet=not _DEBUG["on"],
                              base=str(base) if base else None)
        timeline.mark("flow: returned")
    print(format_report(report))
    timeline.mark("cli: report printed, server stopped")
    atexit.register(timeline.mark, "atexit: first handler")
    _SKIP_TEARDOWN["on"] = True


_SKIP_TEARDOWN = {"on": False}


def _skip_teardown() -> None:
    """After a successful `gptcore run` (or `prepare`), once every atexit handler has run (Prefect's log
    and event flushes, the temporary server's stop), leave without the interpreter's teardown of the
    thousands of modules Prefect and MLflow loaded: ~3 s of a cached rerun on a busy 2-core machine;
    for `prepare`, its closing garbage collection over the vocabulary's objects, ~0.1 s of 1.2."""
    if _SKIP_TEARDOWN["on"]:
        import logging

        from flows import timeline

        timeline.mark("atexit: last handler, os._exit(0)")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@app.command("sweep")
def sweep_cmd(
    config: Path = typer.Argument(..., help="YAML config, e.g. configs/tiny.yaml."),
    grid: Optional[List[str]] = typer.Option(None, "--grid", help="A swept key and its values: section.key=V1,V2 "
                                             "(repeatable: the grid is their product)."),
    seeds: int = typer.Option(2, "--seeds", help="Seeds per variant: run.seed, run.seed+1, ..."),
    max_parallel: Optional[int] = typer.Option(None, "--max-parallel", help="Cells training at once (default: "
                                               "cores / train.num_threads, at most 4)."),
    overrides: Optional[List[str]] = SetOpt,
    until: str = typer.Option("register", "--until", help="Stop each cell's pipeline after this stage."),
) -> None:
    """Compare variants: the pipeline on every grid cell × seed, shared stages computed once, then a table of
    mean ± std and Welch p-values (also in MLflow, with a val-bpb plot). Rerun to compute only missing cells."""
    from flows.runner import check_until
    from flows.sweep import parse_grid, plan_cells

    overrides = _overrides(overrides)
    cells = plan_cells(str(config), parse_grid(grid or []), seeds, overrides or [])  # bad input: one line, now
    from flows.preflight import check_environment
    from gptcore.config import load_config

    check_environment(load_config(config, overrides))  # overrides: GPTCORE_SET's already in
    if max_parallel is not None and max_parallel < 1:
        fail(f"--max-parallel {max_parallel}", "--max-parallel", "pass 1 or more")
    check_until(until)
    from flows.sweep import format_table, run_sweep

    report = run_sweep(str(config), parse_grid(grid or []), seeds, overrides or [], max_parallel, until,
                       quiet=not _DEBUG["on"])
    print(f"sweep: {len(cells)} cells, {report['max_parallel']} at a time, {report['threads']} torch threads each")
    print(format_table(report["table"]))
    failed = [c for c in report["cells"] if "error" in c]
    for c in failed:
        print(f"failed: {c['variant']} seed {c['seed']}: {c['error']}", file=sys.stderr)
    if report.get("uri"):
        print(f"MLflow: sweep run {report['run_id']} (experiment {report['experiment_id']}, store {report['uri']}): "
              "table.md, val_bpb.png, one child pipeline run per cell")
    if failed:
        fail(f"{len(failed)} of {len(cells)} cells failed", "sweep", "fix the cause and rerun the same command: "
             "finished cells are cache hits")


@app.command("deploy")
def deploy_cmd(
    names: Optional[List[str]] = typer.Option(None, "--name", help="Only this deployment (repeatable; default: all)."),
) -> None:
    """Register prefect.yaml's deployments (and their work pools) with the server at PREFECT_API_URL."""
    from flows.deploy import deploy

    for line in deploy(names or []):
        print(line)


if __name__ == "__main__":
    app()
