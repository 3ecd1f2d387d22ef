"""The split patterns (regexes that cut text into chunks before BPE), and where each may be cut safely.

`PATTERNS` are tiktoken's regexes (equivalent to OpenAI's originals, with possessive quantifiers).

`LINE_CUTS[pattern]` is a regex of places where no chunk of `pattern` ever starts before and ends
after, so the text's chunks are the chunks of its pieces, cut there, in order. The trainer counts
each distinct piece (most lines of code repeat) once instead of every occurrence. For gpt4's
pattern the cut is at a newline followed by a line that has a visible character:
`\\n(?=[^\\S\\r\\n]*\\S)`. Why no chunk spans it: the only alternatives that can hold a newline are
`\\s*[\\r\\n]`, `[^\\s\\p{L}\\p{N}]++[\\r\\n]*+` (both end at the last newline of their run, and the
next line starts with no \\r or \\n before its visible character) and the whitespace runs `\\s++$`,
`\\s+(?!\\S)`, `\\s`, which are never reached inside a run that holds a newline and is followed by
a visible character, because `\\s*[\\r\\n]` comes first and matches up to that newline (`\\s++$` fails
there: the run does not reach the end). tests/test_tokenizer_train.py checks it against plain
`findall` on adversarial text. gpt2's pattern keeps "\\n   " + " x" together as "\\n   ", so it has
no such cut (its text is counted chunk by chunk).
"""

PATTERNS = {
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
}

LINE_CUTS = {PATTERNS["gpt4"]: r"\n(?=[^\S\r\n]*\S)"}  # the cut consumes the "\n"; each piece but the last gets it back
