"""Our byte-level BPE as a Hugging Face `tokenizers` pipeline (tokenizer.json), and back.

A `tokenizers.Tokenizer` that gives our ids on every text is four pieces:

    pre_tokenizer  Split(our split regex, "isolated")  then  ByteLevel (bytes -> printable chars)
    model          BPE(vocab spelled through bytes_to_unicode, our merges in rank order,
                       ignore_merges=True: a chunk that is a whole token is that token, as tiktoken)
    decoder        ByteLevel (printable chars -> bytes -> UTF-8)
    added tokens   our special tokens ("<|endoftext|>"), special=True

The one trap is the regex engine. `tokenizers` compiles the split pattern with Oniguruma, which
reads an interval followed by `+` (`\\p{N}{1,3}+`, possessive in Python's `regex`, in tiktoken
and in PCRE) as a *repeated group*, `(?:\\p{N}{1,3})+`: "1040" becomes one chunk instead of "104",
"0". `hf_split_pattern` rewrites every possessive interval `X{m,n}+` as the atomic group
`(?>X{m,n})`, which both engines read as "match up to n, never give back". Any other difference
between the engines is caught by `check_split`, which splits a probe text covering every
character class with both and refuses the export (a `ConfigError`) on the first disagreement.
"""

from __future__ import annotations

import json
from pathlib import Path

import regex

from gptcore.errors import CheckpointError, ConfigError
from gptcore.tokenizer.formats import bytes_to_unicode, unicode_to_bytes

# Every character class the split patterns distinguish, with the boundaries that trip engines up:
# digit runs of every length, contractions in both cases, each kind of whitespace, marks, emoji.
PROBE = (
    "Hello world! It's 1040 and 12345678 o'clock. DON'T we'LL I'M you'Ve they'Re he'D 'S\n"
    "def f(x):\n\tif x >= 10:\n\t\treturn x**2  # comment   \n\n\n    pass\r\n\r\n"
    "  leading and trailing spaces   \n \n\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u2000\u2028\u3000end\u00a0 "
    "Ünïcödé naïve café ñ ß Ⅻ ² ٣٤٥ १२३ 漢字かなカナ 한국어 Ελληνικά русский עברית العربية "
    "e\u0301 a\u0308\u0301 👍🏽 👨‍👩‍👧 🇺🇸 ... !!! ??? ;;; {[(<>)]} $5.00 100% #tag @user ~/path\\to "
    "x1 1x 1.5e-10 0x1F ++--== &&|| \u200b\u200d\ufeff\u00ad tab\tend\t \n  \t\n"
    "   "
)


def hf_split_pattern(pattern: str) -> str:
    """`pattern` rewritten so Oniguruma splits like Python's `regex`: each possessive interval
    `X{m,n}+` becomes the atomic group `(?>X{m,n})` (the other possessives, `X++`, `X*+`, `X?+`,
    mean the same in both engines and are kept).

        >>> hf_split_pattern(r"\\p{N}{1,3}+| ?\\p{L}++")
        '(?>\\\\p{N}{1,3})| ?\\\\p{L}++'
    """
    out: list[str] = []  # pieces emitted so far; `atom` indexes the start of the last atom in out
    opens: list[int] = []  # out-indices of open groups
    atom = None
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":  # an escape: \p{..}, \x{..}, \N{..}, \uXXXX, \xXX or one escaped char
            j = i + 2
            if i + 1 < n and pattern[i + 1] in "pPxNu" and j < n and pattern[j] == "{":
                j = pattern.index("}", j) + 1
            elif i + 1 < n and pattern[i + 1] in "pP":
                j = i + 3
            elif i + 1 < n and pattern[i + 1] == "x":
                j = i + 4
            elif i + 1 < n and pattern[i + 1] == "u":
                j = i + 6
            atom = len(out)
            out.append(pattern[i:j])
            i = j
        elif c == "[":  # a character class, possibly nested, ']' first is literal
            j = i + 1
            if j < n and pattern[j] == "^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            depth = 1
            while j < n and depth:
                if pattern[j] == "\\":
                    j += 2
                    continue
                depth += {"[": 1, "]": -1}.get(pattern[j], 0)
                j += 1
            atom = len(out)
            out.append(pattern[i:j])
            i = j
        elif c == "(":
            j = i + 1
            if pattern.startswith("(?", i):  # (?:  (?i:  (?=  (?!  (?<=  (?<!  (?>  (?P<name>
                m = regex.match(r"\(\?(?:P?<[A-Za-z_]\w*>|[=!>:]|<[=!]|[a-zA-Z-]+[:)])", pattern[i:])
                j = i + (len(m.group()) if m else 2)
            opens.append(len(out))
            out.append(pattern[i:j])
            atom = None
            i = j
        elif c == ")":
            out.append(c)
            atom = opens.pop() if opens else None
            i += 1
        elif c == "{" and atom is not None and (m := regex.match(r"\{\d*(?:,\d*)?\}", pattern[i:])):
            j = i + len(m.group())
            if j < n and pattern[j] == "+":  # possessive interval: the trap
                out[atom:] = ["(?>" + "".join(out[atom:]) + m.group() + ")"]
                j += 1
            else:
                out.append(m.group())
            atom = None
            i = j
        else:
            atom = None if c in "|*+?^$" else len(out)
            out.append(c)
            i += 1
    return "".join(out)


def _hf_split(hf_pattern: str):
    """tokenizers' Split pre-tokenizer (Oniguruma) on `hf_pattern`; a pattern it cannot compile is a ConfigError."""
    from tokenizers import Regex, pre_tokenizers

    try:
        return pre_tokenizers.Split(Regex(hf_pattern), behavior="isolated")
    except Exception as exc:  # Oniguruma refuses the syntax
        raise ConfigError(f"Hugging Face tokenizers cannot compile the split pattern ({exc})", "tokenizer.pattern",
                          "use gpt2, gpt4 or a regex without engine-specific syntax") from None


def check_split(pattern: str, hf_pattern: str, text: str = PROBE) -> None:
    """Raise ConfigError unless Oniguruma splits `text` with `hf_pattern` exactly as `regex` splits
    it with `pattern` (our encoder drops text no alternative matches; HF would keep it)."""
    ours = regex.findall(pattern, text)
    theirs = [s for s, _ in _hf_split(hf_pattern).pre_tokenize_str(text)]
    if ours != theirs:
        k = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        a = ours[k] if k < len(ours) else None
        b = theirs[k] if k < len(theirs) else None
        raise ConfigError(f"Hugging Face tokenizers (Oniguruma) splits this pattern differently: chunk {k} is "
                          f"{b!r} there, {a!r} here", "tokenizer.pattern",
                          "use gpt2, gpt4 or a regex that Oniguruma reads the same way (no \\G, no possessive "
                          "intervals inside lookarounds, every character matched)")


def _spell(tokenizer) -> list[str]:
    """id -> the token's bytes as GPT-2's printable characters ("Ġthe")."""
    b2u = bytes_to_unicode()
    specials = {i: s for s, i in tokenizer.special_tokens.items()}
    return [specials[i] if i in specials else "".join(b2u[b] for b in tokenizer.token_bytes(i))
            for i in range(tokenizer.vocab_size)]


def to_hf_tokenizer(tokenizer):
    """A `tokenizers.Tokenizer` that encodes every text to our ids (special tokens included)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if not hasattr(tokenizer, "merges"):
        raise ConfigError("only our byte-level BPE tokenizers export to Hugging Face", "tokenizer",
                          "train the tokenizer with backend: bpe")
    hf_pattern = hf_split_pattern(tokenizer.pattern)
    check_split(tokenizer.pattern, hf_pattern)
    spelled = _spell(tokenizer)
    special_ids = set(tokenizer.special_tokens.values())
    vocab = {s: i for i, s in enumerate(spelled) if i not in special_ids}
    merges = [(spelled[a], spelled[b]) for a, b in tokenizer.merges]
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([_hf_split(hf_pattern),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    # the added tokens take the ids after the merges; add them in id order so each gets its own id
    for s, i in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1]):
        hf.add_special_tokens([AddedToken(s, special=True, normalized=False)])
        if hf.token_to_id(s) != i:
            raise ConfigError(f"special token {s!r} has id {i}, Hugging Face gives it {hf.token_to_id(s)}",
                              "tokenizer.special_tokens", "special tokens must take the ids right after the merges")
    return hf


def hf_tokenizer_files(tokenizer, model_max_length: int) -> dict[str, str]:
    """{file name: text} for a transformers tokenizer folder: tokenizer.json, tokenizer_config.json
    (model_max_length, bos/eos/pad = <|endoftext|> when the tokenizer has it, no cleanup of spaces)."""
    hf = to_hf_tokenizer(tokenizer)
    eot = next((s for s, i in tokenizer.special_tokens.items() if i == tokenizer.eot_id), None)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # loads tokenizer.json as is (GPT2Tokenizer rebuilds its own split)
        "model_max_length": int(model_max_length),
        "bos_token": eot, "eos_token": eot, "pad_token": eot, "unk_token": None,
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # decode must give back the exact text
        "padding_side": "right",
        "gptcore_split_pattern": tokenizer.pattern,  # ours, before the Oniguruma rewrite: `from-hf` restores it
        "added_tokens_decoder": {str(i): {"content": s, "special": True, "normalized": False, "lstrip": False,
                                          "rstrip": False, "single_word": False}
                                 for s, i in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])},
    }
    return {"tokenizer.json": hf.to_str(pretty=False) + "\n", "tokenizer_config.json": json.dumps(config, indent=2) + "\n"}


# ----------------------------------------------------------------------------- and back


def _our_pattern(hf_pattern: str, original: str | None = None) -> str:
    """The split pattern for our encoder: the one tokenizer_config.json says we exported when it
    translates to `hf_pattern`, else gpt2/gpt4 by name when `hf_pattern` is their translation, else
    the HF pattern itself (Python's `regex` reads atomic groups and possessives too)."""
    from gptcore.tokenizer import PATTERNS

    for pat in ([original] if original else []) + list(PATTERNS.values()):
        if hf_split_pattern(pat) == hf_pattern or pat == hf_pattern:
            return pat
    return hf_pattern


def from_hf_tokenizer_json(path: str | Path):
    """Our `BPETokenizer` from a byte-level BPE `tokenizer.json` (ours, GPT-2's or cl100k-style).

    The ids must be the 256 single bytes first, then one token per merge in merge order, then the
    added tokens: that is what a byte-level BPE is; anything else is a clear error."""
    from gptcore.tokenizer import BPETokenizer

    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        model = spec["model"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot read tokenizer.json ({exc.__class__.__name__})", str(path),
                              "pass a folder written by save_pretrained") from None
    fix = "only byte-level BPE tokenizers (GPT-2 style) convert"
    if model.get("type") != "BPE":
        raise CheckpointError(f"tokenizer model is {model.get('type')!r}, not BPE", str(path), fix)
    config = path.with_name("tokenizer_config.json")
    try:
        original = json.loads(config.read_text(encoding="utf-8")).get("gptcore_split_pattern") if config.exists() else None
    except (OSError, ValueError, AttributeError):
        original = None
    pattern = _pattern_of(spec.get("pre_tokenizer"), str(path), original)
    byte_of = unicode_to_bytes()
    try:
        as_bytes = {s: bytes(byte_of[c] for c in s) for s in model["vocab"]}
    except KeyError:
        raise CheckpointError("vocabulary is not byte-level (a token has a character outside GPT-2's byte table)",
                              str(path), fix) from None
    vocab = model["vocab"]
    order = [0] * 256
    for s, i in vocab.items():
        if i < 256:
            if len(as_bytes[s]) != 1:
                raise CheckpointError(f"id {i} is {s!r}, not a single byte", str(path), fix)
            order[i] = as_bytes[s][0]
    merges = []
    for m in model.get("merges", []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        want = 256 + len(merges)
        if vocab.get(a + b) != want:
            raise CheckpointError(f"merge {a!r} + {b!r} does not create id {want}", str(path), fix)
        merges.append((vocab[a], vocab[b]))
    specials = {t["content"]: int(t["id"]) for t in spec.get("added_tokens", []) if t.get("special", True)}
    try:
        return BPETokenizer.from_merges(merges, pattern, specials, byte_order=order)
    except Exception as exc:
        raise CheckpointError(f"cannot rebuild the tokenizer: {exc}", str(path), fix) from None


def _pattern_of(pre, where: str, original: str | None) -> str:
    """Our split pattern for a tokenizer.json pre_tokenizer: Split(regex)+ByteLevel, or GPT-2's ByteLevel."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    split = [s for s in steps if s.get("type") == "Split"]
    if split:
        pat = split[0].get("pattern", {})
        return _our_pattern(pat.get("Regex") or regex.escape(pat.get("String", "")), original)
    if any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps):
        from gptcore.tokenizer import PATTERNS

        return PATTERNS["gpt2"]  # ByteLevel's built-in regex is GPT-2's split
    raise CheckpointError("tokenizer.json has no split regex (pre_tokenizer Split or ByteLevel)", where,
                          "only byte-level BPE tokenizers (GPT-2 style) convert")
