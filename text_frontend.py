"""The text front-end: a request's text -> what the engine reads, with a map back to the caller's characters.

`read_text(text, reading, ssml)` returns `Speech` stretches and `Pause`s. Every character of a `Speech`'s text
keeps where it came from in the caller's text (`Speech.source`), so word timestamps can be mapped back.

The steps, per stretch of text: paralinguistic tags (`[laugh]`: kept for an engine that has them, dropped
otherwise), the lexicon (`Lexicon`: a word or phrase -> an alias or IPA), then normalization (numbers, money,
dates, times, units, phone numbers, emails, URLs, abbreviations, symbols: English thoroughly, other languages'
numbers where num2words has them). SSML (`<speak>...`) is read by a small tokenizer of our own: linear, no
recursion, no DTDs, positions in every error.

Every pattern here is linear on hostile input: bounded repetition, no nested unbounded quantifiers, and each
pass is one `finditer` over the text, so `read_text` is linear in the text's length.
"""

from __future__ import annotations

import bisect
import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from num2words import CONVERTER_CLASSES, num2words

# ---------------------------------------------------------------------------------------------------------------------
# The API


@dataclass(frozen=True)
class Speech:
    """What the engine reads: `text`, and for each of its characters where it came from in the caller's text.

    `source` has len(text) + 1 offsets: text[i] came from the caller's character source[i]; non-decreasing;
    source[-1] is the end of the stretch it came from. `phonemes`: spans [start, end) of `text` to read as IPA."""

    text: str
    source: tuple[int, ...]
    rate: float = 1.0
    phonemes: tuple[tuple[int, int, str], ...] = ()


@dataclass(frozen=True)
class Pause:
    seconds: float
    at: int  # offset in the caller's text where the break stands


Segment = Speech | Pause


class TextError(ValueError):
    """Malformed SSML, a bad inline break or a bad lexicon. `position`: the offset in the caller's text (None for a
    lexicon's rule; `rule` is then its index)."""

    def __init__(self, message: str, position: int | None = None, rule: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.position = position
        self.rule = rule


# Chatterbox Turbo's tokenizer has these as added tokens. A tag the engine has (Reading.keep_tags) passes through
# untouched; a known tag the engine lacks is dropped, never spoken as words.
PARALINGUISTIC_TAGS: frozenset[str] = frozenset(
    {"[laugh]", "[chuckle]", "[sigh]", "[cough]", "[sniff]", "[groan]", "[shush]", "[clear throat]", "[gasp]"}
)

MAX_TRUSTED_RULES = 1000
MAX_REQUEST_RULES = 100
MAX_MATCH_CHARS = 100
MAX_ALIAS_CHARS = 200
MAX_PATTERN_CHARS = 500
MAX_SSML_DEPTH = 64
MAX_BREAK_SECONDS = 10.0
BREAK_STRENGTHS = {"none": 0.0, "x-weak": 0.1, "weak": 0.25, "medium": 0.4, "strong": 0.75, "x-strong": 1.2}
PROSODY_RATES = {"x-slow": 0.5, "slow": 0.75, "medium": 1.0, "default": 1.0, "fast": 1.25, "x-fast": 1.75}
MIN_RATE, MAX_RATE = 0.25, 4.0


@dataclass(frozen=True)
class Rule:
    """One lexicon rule: a whole word or phrase (`match`) or, trusted only, a regex (`pattern`)."""

    match: str | None = None
    pattern: str | None = None
    alias: str | None = None
    ipa: str | None = None
    case_sensitive: bool = False


_RULE_KEYS = frozenset({"match", "pattern", "alias", "ipa", "case_sensitive"})


class Lexicon:
    """Pronunciation rules, applied before normalization (a replacement is spoken as written).

    Literal rules apply as one alternation of escaped phrases (longest first), so many rules cost one pass;
    a trusted file's regex rules each take a pass of their own, in order."""

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self._layers = _compile_layers(self.rules)

    @classmethod
    def parse(cls, rules: list[dict[str, Any]], trusted: bool) -> Lexicon:
        """Validate rules as JSON gives them; `trusted` (the server's start-up file) may use `pattern`."""
        cap = MAX_TRUSTED_RULES if trusted else MAX_REQUEST_RULES
        if not isinstance(rules, list):
            raise TextError("lexicon: expected a list of rules")
        if len(rules) > cap:
            raise TextError(f"lexicon: {len(rules)} rules, at most {cap} allowed")
        parsed = []
        for index, raw in enumerate(rules):
            parsed.append(_parse_rule(index, raw, trusted))
        return cls(parsed)

    def merged(self, other: Lexicon | None) -> Lexicon:
        """These rules with `other`'s over them: `server_lexicon.merged(request_lexicon)`, the request wins."""
        if other is None or not other.rules:
            return self
        if not self.rules:
            return other
        return Lexicon(other.rules + self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __repr__(self) -> str:
        return f"Lexicon({len(self.rules)} rules)"


def _parse_rule(index: int, raw: object, trusted: bool) -> Rule:
    def fail(message: str) -> TextError:
        return TextError(f"lexicon rule {index}: {message}", rule=index)

    if not isinstance(raw, dict):
        raise fail("expected an object")
    unknown = sorted(set(raw) - _RULE_KEYS)
    if unknown:
        raise fail(f"unknown field {unknown[0]!r}")
    strings: dict[str, str | None] = {}
    for key, limit in (("match", MAX_MATCH_CHARS), ("pattern", MAX_PATTERN_CHARS), ("alias", MAX_ALIAS_CHARS),
                       ("ipa", MAX_ALIAS_CHARS)):  # fmt: skip
        value = raw.get(key)
        if value is not None and not isinstance(value, str):
            raise fail(f"{key!r} must be a string")
        if value is not None and len(value) > limit:
            raise fail(f"{key!r} is longer than {limit} characters")
        strings[key] = value
    case_sensitive = raw.get("case_sensitive", False)
    if not isinstance(case_sensitive, bool):
        raise fail("'case_sensitive' must be true or false")
    match, pattern = strings["match"], strings["pattern"]
    if pattern is not None and not trusted:
        raise fail("'pattern' is allowed only in the server's lexicon; use 'match'")
    if (match is None) == (pattern is None):
        raise fail("needs exactly one of 'match' or 'pattern'")
    if match is not None and not match.strip():
        raise fail("'match' is empty")
    if pattern is not None:
        try:
            compiled = re.compile(pattern, 0 if case_sensitive else re.IGNORECASE)
        except re.error as error:
            raise fail(f"bad 'pattern': {error}") from None
        if compiled.match(""):
            raise fail("'pattern' matches the empty string")
    if not strings["alias"] and not strings["ipa"]:
        raise fail("needs an 'alias' or an 'ipa'")
    return Rule(match.strip() if match else None, pattern, strings["alias"] or None, strings["ipa"] or None,
                case_sensitive)  # fmt: skip


@dataclass(frozen=True)
class Reading:
    """How to read: per engine and request."""

    language: str = "en"
    normalize: bool = True
    keep_tags: frozenset[str] = frozenset()  # paralinguistic tags the engine has (Turbo): passed through untouched
    phonemes: bool = False  # the engine can take IPA phonemes (Piper)
    lexicon: Lexicon | None = None


def read_text(text: str, reading: Reading, ssml: bool | None = None) -> list[Segment]:
    """The caller's text as Speech stretches and Pauses.

    ssml None: SSML when the text (stripped) starts with <speak (or <?xml, or <!DOCTYPE: refused); True: must be SSML;
    False: plain text. Plain text still honours inline `<break time="..."/>` (ElevenLabs and Cartesia convention)."""
    if ssml is None:
        head = text.lstrip()[:6].lower()
        ssml = head in ("<speak", "<!doct") or head.startswith("<?xml")
    items = _parse_ssml(text, reading) if ssml else _plain_items(text)
    return _assemble(items, reading)


# ---------------------------------------------------------------------------------------------------------------------
# Text with its source map, and the one way it is edited


@dataclass
class _Chunk:
    """A stretch of text with its source map; `kind`: _PLAIN (tags, lexicon and normalization still to come),
    _FIXED (spoken as written) or _IPA (read as `ipa`)."""

    text: str
    src: list[int]
    rate: float = 1.0
    kind: int = 0
    ipa: str = ""
    boundary: bool = False  # the space or newline a <p> or <s> put here


_PLAIN, _FIXED, _IPA = 0, 1, 2


@dataclass(frozen=True)
class _Boundary:
    at: int
    paragraph: bool


_Item = _Chunk | _Boundary | Pause

# A replacement: a string for the whole match, or parts (text, start, end) with start/end relative to the match
# (ordered, non-overlapping), each part's characters mapped over its own span; None leaves the match as it is.
_Parts = list[tuple[str, int, int]]
_Repl = Callable[[re.Match[str]], "str | _Parts | None"]


def _spread(out: list[int], count: int, first: int, end: int) -> None:
    """`count` characters made from the caller's [first, end): spread evenly, non-decreasing, inside the span."""
    span = end - first
    if span <= 1:
        out.extend([first] * count)
    else:
        out.extend(first + (j * span) // count for j in range(count))


def _emit(pieces: list[str], out: list[int], src: list[int], start: int, end: int, repl: str | _Parts) -> None:
    for piece, a, b in [(repl, 0, end - start)] if isinstance(repl, str) else repl:
        first = src[start + a]
        stop = src[start + b - 1] + 1 if b > a else first
        pieces.append(piece)
        _spread(out, len(piece), first, stop)


def _sub(text: str, src: list[int], pattern: re.Pattern[str], repl: _Repl) -> tuple[str, list[int]]:
    """`pattern`'s matches replaced by `repl`, the source map carried along (one pass, linear)."""
    pieces: list[str] = []
    out: list[int] = []
    last = 0
    for m in pattern.finditer(text):
        r = repl(m)
        if r is None:
            continue
        start, end = m.span()
        pieces.append(text[last:start])
        out.extend(src[last:start])
        _emit(pieces, out, src, start, end, r)
        last = end
    if not pieces:
        return text, src
    pieces.append(text[last:])
    out.extend(src[last:])
    return "".join(pieces), out


_UNCHANGED = _Chunk("", [0], kind=-1)  # make()'s answer for a match to leave as it is


def _split(chunk: _Chunk, pattern: re.Pattern[str], make: Callable[[re.Match[str]], _Chunk | None]) -> list[_Chunk]:
    """A plain chunk cut at `pattern`'s matches, each match replaced by make(match) (None: dropped; _UNCHANGED:
    left in the text)."""
    out: list[_Chunk] = []
    last = 0
    text, src = chunk.text, chunk.src
    for m in pattern.finditer(text):
        start, end = m.span()
        made = make(m)
        if made is _UNCHANGED:
            continue
        if start > last:
            out.append(_Chunk(text[last:start], src[last : start + 1], chunk.rate))
        if made is not None:
            out.append(made)
        last = end
    if last == 0 and not out:
        return [chunk]
    if last < len(text):
        out.append(_Chunk(text[last:], src[last:], chunk.rate))
    return out


def _fixed(text: str, src: list[int], start: int, end: int, repl: str | _Parts, rate: float) -> _Chunk:
    pieces: list[str] = []
    out: list[int] = []
    _emit(pieces, out, src, start, end, repl)
    out.append(src[end - 1] + 1 if end > start else src[start])
    return _Chunk("".join(pieces), out, rate, _FIXED)


# ---------------------------------------------------------------------------------------------------------------------
# Plain text: only inline breaks are markup

_ATTRS = r"(?:\s{1,16}[A-Za-z][\w:-]{0,31}\s{0,4}=\s{0,4}(?:\"[^\"<>]{0,64}\"|'[^'<>]{0,64}'))"
_INLINE_BREAK = re.compile(rf"<break({_ATTRS}{{1,4}})\s{{0,16}}/?>", re.IGNORECASE)
_ATTR_PAIR = re.compile(r"([A-Za-z][\w:-]{0,31})\s{0,4}=\s{0,4}(?:\"([^\"<>]{0,64})\"|'([^'<>]{0,64})')")


def _plain_items(text: str) -> list[_Item]:
    items: list[_Item] = []
    last = 0
    for m in _INLINE_BREAK.finditer(text):
        attrs: dict[str, tuple[str, int]] = {}
        for a in _ATTR_PAIR.finditer(m.group(1)):
            value = a.group(2) if a.group(2) is not None else a.group(3)
            vstart = m.start(1) + (a.start(2) if a.group(2) is not None else a.start(3))
            attrs[a.group(1).lower()] = (value, vstart)
        if m.start() > last:
            items.append(_Chunk(text[last : m.start()], list(range(last, m.start() + 1))))
        items.append(Pause(_break_seconds(attrs, m.start()), m.start()))
        last = m.end()
    if last < len(text):
        items.append(_Chunk(text[last:], list(range(last, len(text) + 1))))
    return items


_TIME = re.compile(r"\s{0,8}(\d{1,6}(?:\.\d{1,6})?|\.\d{1,6})\s{0,8}(ms|s)\s{0,8}", re.IGNORECASE)


def _break_seconds(attrs: dict[str, tuple[str, int]], at: int) -> float:
    if "time" in attrs:
        value, where = attrs["time"]
        m = _TIME.fullmatch(value)
        if not m:
            raise TextError(f'SSML: bad break time "{value}" at character {where} (e.g. "700ms" or "1.5s")', where)
        seconds = float(m.group(1)) / (1000.0 if m.group(2).lower() == "ms" else 1.0)
        return min(seconds, MAX_BREAK_SECONDS)
    if "strength" in attrs:
        value, where = attrs["strength"]
        if value.strip().lower() not in BREAK_STRENGTHS:
            raise TextError(f'SSML: bad break strength "{value}" at character {where}', where)
        return BREAK_STRENGTHS[value.strip().lower()]
    return BREAK_STRENGTHS["medium"]


# ---------------------------------------------------------------------------------------------------------------------
# SSML: an iterative tokenizer and element stack of our own

_NAME = r"[A-Za-z_][\w.:-]{0,63}"
_OPEN = re.compile(rf"<({_NAME})")
_ATTR = re.compile(rf"\s{{1,256}}({_NAME})\s{{0,256}}=\s{{0,256}}(?:\"([^\"<]{{0,4096}})\"|'([^'<]{{0,4096}})')")
_OPEN_END = re.compile(r"\s{0,256}(/?)>")
_CLOSE = re.compile(rf"</({_NAME})\s{{0,256}}>")
_ENTITY = re.compile(r"&(?:(amp|lt|gt|quot|apos)|#([0-9]{1,7})|#[xX]([0-9a-fA-F]{1,6}));")
_SPECIAL = re.compile(r"[<&]")
_NAMED = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'"}
_CAPTURING = frozenset({"say-as", "sub", "phoneme"})


def _entity(m: re.Match[str]) -> str:
    if m.group(1):
        return _NAMED[m.group(1)]
    code = int(m.group(2)) if m.group(2) else int(m.group(3), 16)
    if code == 0 or code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
        raise TextError(f"SSML: character reference at character {m.start()} is not a character", m.start())
    return chr(code)


@dataclass
class _Element:
    name: str
    at: int
    attrs: dict[str, tuple[str, int]]
    rate: float = 1.0


class _Buffer:
    """Text gathered with each character's source."""

    def __init__(self, at: int) -> None:
        self.chars: list[str] = []
        self.src: list[int] = []
        self.end = at

    def extend(self, text: str, src: list[int]) -> None:
        """`src`: len(text) + 1 offsets."""
        self.chars.append(text)
        self.src.extend(src[:-1])
        self.end = src[-1]

    def add(self, text: str, first: int, end: int, step: bool) -> None:
        self.chars.append(text)
        self.src.extend(range(first, first + len(text)) if step else [first] * len(text))
        self.end = end


def _parse_ssml(text: str, reading: Reading) -> list[_Item]:
    items: list[_Item] = []
    stack: list[_Element] = []
    buffers = [_Buffer(0)]  # [0]: the main text; more while inside <say-as>, <sub>, <phoneme>
    rate = 1.0
    root_done = False

    def flush() -> None:
        main = buffers[0]
        if main.chars:
            items.append(_Chunk("".join(main.chars), [*main.src, main.end], rate))
            buffers[0] = _Buffer(main.end)

    def add_text(piece: str, first: int, end: int, step: bool) -> None:
        if not stack:
            if piece.strip():
                raise TextError(f"SSML: text outside <speak> at character {first}", first)
            return
        buffers[-1].add(piece.replace("\n", " "), first, end, step)

    def add_chunk(chunk: _Chunk) -> None:
        if len(buffers) > 1 or chunk.kind == _PLAIN:  # inside another capture (its text only), or text to read
            buffers[-1].extend(chunk.text, chunk.src)
        else:
            flush()
            chunk.rate = rate
            items.append(chunk)

    def boundary(at: int, paragraph: bool) -> None:
        if len(buffers) == 1:
            flush()
            items.append(_Boundary(at, paragraph))

    def open_element(el: _Element, self_closing: bool, end: int) -> None:
        nonlocal rate, root_done
        if not stack:
            if root_done:
                raise TextError(f"SSML: <{el.name}> at character {el.at} comes after </speak>", el.at)
            if el.name != "speak":
                raise TextError(f"SSML: the root element must be <speak>, not <{el.name}> (character {el.at})", el.at)
        elif el.name == "speak":
            raise TextError(f"SSML: <speak> at character {el.at} inside <speak>", el.at)
        if el.name == "break":
            seconds = _break_seconds(el.attrs, el.at)
            if len(buffers) == 1:
                flush()
                items.append(Pause(seconds, el.at))
        elif el.name == "prosody" and "rate" in el.attrs:
            flush()
            el.rate = rate
            rate = min(MAX_RATE, max(MIN_RATE, rate * _prosody_rate(*el.attrs["rate"])))
        elif el.name in ("p", "s"):
            boundary(el.at, el.name == "p")
        elif el.name in _CAPTURING:
            if el.name == "sub" and "alias" not in el.attrs:
                raise TextError(f"SSML: <sub> at character {el.at} needs an alias", el.at)
            if el.name == "phoneme" and "ph" not in el.attrs:
                raise TextError(f"SSML: <phoneme> at character {el.at} needs ph", el.at)
            buffers.append(_Buffer(end))
        if self_closing:
            close_element(el, end, end)
        else:
            if len(stack) >= MAX_SSML_DEPTH:
                raise TextError(f"SSML: elements nested deeper than {MAX_SSML_DEPTH} at character {el.at}", el.at)
            stack.append(el)

    def close_element(el: _Element, at: int, end: int) -> None:
        nonlocal rate, root_done
        if el.name == "speak" and not stack:
            flush()
            root_done = True
        elif el.name == "prosody" and "rate" in el.attrs:
            flush()
            rate = el.rate
        elif el.name in ("p", "s"):
            boundary(at, el.name == "p")
        elif el.name in _CAPTURING:
            captured = buffers.pop()
            inner = _Chunk("".join(captured.chars), [*captured.src, captured.end], rate)
            if not inner.text:
                inner.src = [at, at]
            add_chunk(_captured(el, inner, reading))

    pos, n = 0, len(text)
    while pos < n:
        m = _SPECIAL.search(text, pos)
        nxt = m.start() if m else n
        if nxt > pos:
            add_text(text[pos:nxt], pos, nxt, True)
        if m is None:
            break
        pos = nxt
        if text[pos] == "&":
            em = _ENTITY.match(text, pos)
            if em is None:
                raise TextError(f"SSML: unknown or malformed entity at character {pos}", pos)
            add_text(_entity(em), pos, em.end(), False)
            pos = em.end()
        elif text.startswith("<!--", pos):
            end = text.find("-->", pos + 4)
            if end < 0:
                raise TextError(f"SSML: comment at character {pos} is never closed", pos)
            pos = end + 3
        elif text.startswith("<!", pos):
            raise TextError(f"SSML: declarations (<!DOCTYPE, <!ENTITY, CDATA) are not allowed (character {pos})", pos)
        elif text.startswith("<?", pos):
            end = text.find("?>", pos + 2)
            if end < 0 or stack or root_done:
                raise TextError(f"SSML: bad processing instruction at character {pos}", pos)
            pos = end + 2
        elif text.startswith("</", pos):
            cm = _CLOSE.match(text, pos)
            if cm is None:
                raise TextError(f"SSML: malformed closing tag at character {pos}", pos)
            name = cm.group(1)
            if not stack:
                raise TextError(f"SSML: </{name}> at character {pos} closes nothing", pos)
            top = stack.pop()
            if top.name != name:
                raise TextError(
                    f"SSML: </{name}> at character {pos} does not close <{top.name}> opened at character {top.at}", pos
                )
            close_element(top, pos, cm.end())
            pos = cm.end()
        else:
            om = _OPEN.match(text, pos)
            if om is None:
                raise TextError(f"SSML: '<' at character {pos} does not start a tag (write &lt;)", pos)
            name = om.group(1)
            attrs: dict[str, tuple[str, int]] = {}
            p = om.end()
            while (am := _ATTR.match(text, p)) is not None:
                key = am.group(1)
                if key in attrs:
                    raise TextError(
                        f"SSML: attribute {key} repeated in <{name}> at character {am.start(1)}", am.start(1)
                    )
                group = 2 if am.group(2) is not None else 3
                raw, vstart = am.group(group), am.start(group)
                try:
                    value = _ENTITY.sub(_entity, raw)
                except TextError as error:
                    raise TextError(error.message, vstart) from None
                if "&" in _ENTITY.sub("", raw):
                    where = vstart + _ENTITY.sub(lambda e: "x" * len(e.group()), raw).index("&")
                    raise TextError(f"SSML: unknown or malformed entity at character {where}", where)
                attrs[key] = (value, vstart)
                p = am.end()
            end_m = _OPEN_END.match(text, p)
            if end_m is None:
                raise TextError(f"SSML: bad attribute syntax in <{name}> at character {p}", p)
            open_element(_Element(name, pos, attrs), end_m.group(1) == "/", end_m.end())
            pos = end_m.end()
    if stack:
        top = stack[-1]
        raise TextError(f"SSML: <{top.name}> opened at character {top.at} is never closed", top.at)
    if not root_done:
        raise TextError("SSML: no <speak> element", 0)
    flush()
    return items


def _prosody_rate(value: str, at: int) -> float:
    v = value.strip().lower()
    if v in PROSODY_RATES:
        return PROSODY_RATES[v]
    m = re.fullmatch(r"([+-]?)(\d{1,6}(?:\.\d{1,6})?)(%?)", v)
    if m:
        number = float(m.group(2))
        if m.group(3):
            factor = 1 + number / 100 if m.group(1) else number / 100
            if m.group(1) == "-":
                factor = 1 - number / 100
        else:
            factor = number
        if factor > 0:
            return factor
    raise TextError(f'SSML: bad prosody rate "{value}" at character {at}', at)


def _captured(el: _Element, inner: _Chunk, reading: Reading) -> _Chunk:
    """What <say-as>, <sub> or <phoneme> makes of its text."""
    text, src = inner.text, inner.src
    if el.name == "sub":
        return (
            _fixed(text, src, 0, len(text), el.attrs["alias"][0], inner.rate)
            if text
            else _Chunk(el.attrs["alias"][0], [src[0]] * (len(el.attrs["alias"][0]) + 1), inner.rate, _FIXED)
        )
    if el.name == "phoneme":
        alphabet = el.attrs.get("alphabet", ("ipa", 0))[0].lower()
        lead = len(text) - len(text.lstrip())
        core = text.strip()
        if reading.phonemes and alphabet == "ipa" and core:
            return _Chunk(core, src[lead : lead + len(core) + 1], inner.rate, _IPA, el.attrs["ph"][0])
        return inner
    interpret = el.attrs.get("interpret-as", ("", 0))[0].strip().lower()
    fmt = el.attrs.get("format", ("", 0))[0].strip().lower()
    said = _say_as(text, interpret, fmt, _language(reading.language)) if text.strip() else None
    return inner if said is None else _fixed(text, src, 0, len(text), said, inner.rate)


# ---------------------------------------------------------------------------------------------------------------------
# Assembly: chunks through tags, lexicon and normalization, then Speech stretches between Pauses


def _assemble(items: list[_Item], reading: Reading) -> list[Segment]:
    segments: list[Segment] = []
    parts: list[_Chunk] = []
    current_rate: list[float] = [1.0]
    last_char = [""]  # the last non-space character gathered for the Speech being built

    def finish() -> None:
        if parts:
            speech = _speech(parts, current_rate[0])
            if speech is not None:
                segments.append(speech)
            parts.clear()
        last_char[0] = ""

    def add(chunk: _Chunk) -> None:
        if not chunk.text:
            return
        if parts and chunk.rate != current_rate[0]:
            finish()
        current_rate[0] = chunk.rate
        parts.append(chunk)
        stripped = chunk.text.rstrip()
        if stripped:
            last_char[0] = stripped[-1]

    for item in items:
        if isinstance(item, Pause):
            finish()
            segments.append(item)
        elif isinstance(item, _Boundary):
            if parts and parts[-1].boundary:  # one separator between two boundaries, a newline if either has one
                if item.paragraph:
                    parts[-1] = _Chunk("\n", parts[-1].src, parts[-1].rate, _FIXED, boundary=True)
            elif last_char[0]:
                rate = current_rate[0]
                if last_char[0] not in _SENTENCE_END:
                    parts.append(_Chunk(".", [item.at, item.at], rate, _FIXED))
                parts.append(_Chunk("\n" if item.paragraph else " ", [item.at, item.at], rate, _FIXED, boundary=True))
                last_char[0] = "."
        elif item.kind != _PLAIN:
            add(item)
        else:
            for chunk in _process(item, reading):
                add(chunk)
    finish()
    return segments


_SENTENCE_END = frozenset(".!?;:…。！？")
_SPACES = re.compile(r"\s+")


def _speech(chunks: list[_Chunk], rate: float) -> Speech | None:
    texts: list[str] = []
    src: list[int] = []
    spans: list[tuple[int, int, str]] = []
    length = 0
    for chunk in chunks:
        if chunk.kind == _IPA:
            spans.append((length, length + len(chunk.text), chunk.ipa))
        texts.append(chunk.text)
        src.extend(chunk.src[:-1])
        length += len(chunk.text)
    src.append(chunks[-1].src[-1])
    text = "".join(texts)
    # Whitespace: a run without a newline -> one space; with newlines -> those newlines alone.
    removed_at: list[int] = []  # old end of each whitespace run
    removed: list[int] = []  # characters removed up to and including that run
    total = 0

    def squeeze(m: re.Match[str]) -> str | _Parts | None:
        nonlocal total
        run = m.group()
        if run == " ":
            return None
        lines = run.count("\n")
        if lines:
            new: str | _Parts = [("\n", i, i + 1) for i, c in enumerate(run) if c == "\n"]
        else:
            new = [(" ", 0, 1)]
        total += len(run) - (lines or 1)
        removed_at.append(m.end())
        removed.append(total)
        return new

    text, src = _sub(text, src, _SPACES, squeeze)

    def moved(pos: int) -> int:
        k = bisect.bisect_right(removed_at, pos)
        return pos - (removed[k - 1] if k else 0)

    lead = len(text) - len(text.lstrip())
    body = text.strip()
    if not body:
        return None
    source = tuple(src[lead : lead + len(body) + 1])
    phonemes = tuple((moved(a) - lead, moved(b) - lead, ipa) for a, b, ipa in spans)
    return Speech(body, source, rate, phonemes)


def _process(chunk: _Chunk, reading: Reading) -> list[_Chunk]:
    """A plain chunk through tags, the lexicon and normalization."""
    out: list[_Chunk] = []
    for piece in _tags(chunk, reading.keep_tags):
        if piece.kind != _PLAIN:
            out.append(piece)
            continue
        for part in _apply_lexicon(piece, reading.lexicon, reading.phonemes):
            if part.kind == _PLAIN and reading.normalize:
                part = _normalize(part, reading.language)
            if part.kind == _PLAIN:
                part.kind = _FIXED
            out.append(part)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Paralinguistic tags


def _tag_name(tag: str) -> str:
    return tag.strip().strip("[]").strip().lower()


@functools.lru_cache(maxsize=32)
def _tag_pattern(keep: frozenset[str]) -> tuple[re.Pattern[str], dict[str, str]]:
    kept = {_tag_name(t): (t if t.startswith("[") else f"[{t}]") for t in keep}
    names = {_tag_name(t) for t in PARALINGUISTIC_TAGS} | set(kept)
    names.discard("")
    alternation = "|".join(re.escape(name).replace(r"\ ", r" {1,4}") for name in sorted(names, key=len, reverse=True))
    return re.compile(rf"\[ ?(?:{alternation}) ?\]", re.IGNORECASE), kept


def _tags(chunk: _Chunk, keep: frozenset[str]) -> list[_Chunk]:
    if "[" not in chunk.text:
        return [chunk]
    pattern, kept = _tag_pattern(keep)

    def make(m: re.Match[str]) -> _Chunk | None:
        name = " ".join(_tag_name(m.group()).split())
        if name not in kept:
            return None
        s, e = m.span()
        tag = kept[name]
        if m.group() == tag:
            return _Chunk(tag, chunk.src[s : e + 1], chunk.rate, _FIXED)
        return _fixed(chunk.text, chunk.src, s, e, tag, chunk.rate)

    return _split(chunk, pattern, make)


# ---------------------------------------------------------------------------------------------------------------------
# Lexicon


@dataclass(frozen=True)
class _Literals:
    pattern: re.Pattern[str]
    exact: dict[str, int]  # case-sensitive phrase -> rule index (earliest wins)
    folded: dict[str, int]  # lower-cased phrase -> rule index


@dataclass(frozen=True)
class _Regex:
    pattern: re.Pattern[str]
    rule: int


def _compile_layers(rules: tuple[Rule, ...]) -> list[_Literals | _Regex]:
    """Consecutive literal rules -> one alternation; each regex rule its own layer; in priority order."""
    layers: list[_Literals | _Regex] = []
    group: list[int] = []

    def close_group() -> None:
        if not group:
            return
        exact: dict[str, int] = {}
        folded: dict[str, int] = {}
        alternatives: dict[str, int] = {}
        for i in group:
            rule = rules[i]
            assert rule.match is not None
            phrase = " ".join(rule.match.split())
            table, key = (exact, phrase) if rule.case_sensitive else (folded, phrase.lower())
            table.setdefault(key, i)
            body = r"\s{1,4}".join(re.escape(word) for word in phrase.split())
            alternatives.setdefault(body if rule.case_sensitive else f"(?i:{body})", len(phrase))
        ordered = sorted(alternatives, key=lambda a: -alternatives[a])
        layers.append(_Literals(re.compile(rf"(?<!\w)(?:{'|'.join(ordered)})(?!\w)"), exact, folded))
        group.clear()

    for i, rule in enumerate(rules):
        if rule.pattern is None:
            group.append(i)
        else:
            close_group()
            flags = 0 if rule.case_sensitive else re.IGNORECASE
            layers.append(_Regex(re.compile(rule.pattern, flags), i))
    close_group()
    return layers


def _apply_lexicon(chunk: _Chunk, lexicon: Lexicon | None, phonemes: bool) -> list[_Chunk]:
    if lexicon is None or not lexicon.rules:
        return [chunk]
    pieces = [chunk]
    rules = lexicon.rules
    for layer in lexicon._layers:

        def make(m: re.Match[str], layer: _Literals | _Regex = layer, piece: _Chunk = chunk) -> _Chunk | None:
            if isinstance(layer, _Regex):
                index = layer.rule
            else:
                phrase = " ".join(m.group().split())
                found = [i for i in (layer.exact.get(phrase), layer.folded.get(phrase.lower())) if i is not None]
                if not found:
                    return _UNCHANGED
                index = min(found)
            rule = rules[index]
            s, e = m.span()
            if m.group() == "":
                return _UNCHANGED
            if phonemes and rule.ipa:
                return _Chunk(m.group(), piece.src[s : e + 1], piece.rate, _IPA, rule.ipa)
            if rule.alias is None:
                return _UNCHANGED
            return _fixed(piece.text, piece.src, s, e, rule.alias, piece.rate)

        next_pieces: list[_Chunk] = []
        for piece in pieces:
            if piece.kind != _PLAIN:
                next_pieces.append(piece)
                continue
            next_pieces.extend(_split(piece, layer.pattern, functools.partial(make, layer=layer, piece=piece)))
        pieces = next_pieces
    return pieces


# ---------------------------------------------------------------------------------------------------------------------
# Number words (num2words), per language


@dataclass(frozen=True)
class _Lang:
    base: str  # "en", "de", ... ("" when unreadable)
    region: str  # "US", "GB", ... or ""
    n2w: str | None  # num2words' code, None when it lacks the language


@functools.lru_cache(maxsize=256)
def _language(code: str) -> _Lang:
    m = re.fullmatch(r"\s*([A-Za-z]{2,3})(?:[-_]([A-Za-z0-9]{2,8}))?(?:[-_][A-Za-z0-9-_]{0,32})?\s*", code or "")
    if m is None:
        return _Lang("", "", None)
    base, region = m.group(1).lower(), (m.group(2) or "").upper()
    if f"{base}_{region}" in CONVERTER_CLASSES:
        return _Lang(base, region, f"{base}_{region}")
    return _Lang(base, region, base if base in CONVERTER_CLASSES else None)


def _clean(words: str, lang: str) -> str:
    if lang.startswith("en"):
        return words.replace("-", " ").replace(",", "").replace(" and ", " ")
    return words


@functools.lru_cache(maxsize=8192)
def _words(value: int, lang: str, to: str = "cardinal") -> str | None:
    try:
        words = num2words(value, lang=lang, to=to)
    except Exception:  # num2words raises whatever its language module does (NotImplementedError, ValueError, ...)
        return None
    return _clean(str(words), lang) if isinstance(words, str) and words else None


@functools.lru_cache(maxsize=256)
def _minus(lang: str) -> str | None:
    negative, positive = _words(-7, lang), _words(7, lang)
    if negative and positive and negative != positive and negative.endswith(positive):
        return negative[: -len(positive)].strip() or None
    return None


def _point(lang: str) -> str | None:
    word = getattr(CONVERTER_CLASSES.get(lang), "pointword", None)
    return word if isinstance(word, str) and word else None


def _digit_words(digits: str, lang: str) -> str | None:
    words = [_words(int(d), lang) for d in digits if d.isdigit()]
    return None if not words or None in words else " ".join(w for w in words if w)


def _number(digits: str, frac: str | None, lang: str, negative: bool = False) -> str | None:
    """An integer (digits, separators already gone) with an optional fraction, as words."""
    if len(digits) > 1 and digits[0] == "0" and not frac:
        words = _digit_words(digits, lang)
    else:
        words = _words(int(digits), lang)
    if words and frac:
        point, rest = _point(lang), _digit_words(frac, lang)
        words = f"{words} {point} {rest}" if point and rest else None
    if words and negative:
        minus = _minus(lang)
        words = f"{minus} {words}" if minus else None
    return words


def _digits_of(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


# ---------------------------------------------------------------------------------------------------------------------
# Normalization passes


_R = TypeVar("_R", bound=_Repl)


@dataclass(frozen=True)
class _Pass:
    pattern: re.Pattern[str]
    repl: _Repl
    needs: tuple[str, ...] = ()  # runs only where one of these is in the text (nothing: always)
    digits: bool = True  # runs only where the text has a digit


_DIGIT = re.compile(r"\d")


def _normalize(chunk: _Chunk, language: str) -> _Chunk:
    lang = _language(language)
    passes = _english_passes(lang.n2w or "en", lang.region) if lang.base == "en" else _number_passes(lang)
    text, src = chunk.text, chunk.src
    digits = _DIGIT.search(text) is not None  # passes take digits away, never add them
    for p in passes:
        if (digits or not p.digits) and (not p.needs or any(n in text for n in p.needs)):
            text, src = _sub(text, src, p.pattern, p.repl)
    return _Chunk(text, src, chunk.rate, _FIXED)


_NEXT_STARTS_SENTENCE = re.compile(r"[ \t]{0,8}(?:\n|$)|[ \t]{1,8}[A-Z\"“(]")
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]  # fmt: skip
_MONTH_OF = {name.lower(): i + 1 for i, name in enumerate(_MONTHS)} | {
    name[:3].lower(): i + 1 for i, name in enumerate(_MONTHS)
}
_MONTH_OF["sept"] = 9
_MONTH_RE = "|".join(sorted({*_MONTHS, *(m[:3] for m in _MONTHS), "Sept"}, key=len, reverse=True))
_MONTH_RE = f"(?:{_MONTH_RE}|{_MONTH_RE.upper()})"


def _ends_sentence(m: re.Match[str]) -> bool:
    return _NEXT_STARTS_SENTENCE.match(m.string, m.end()) is not None


# Integers: grouped by thousands, or a bounded run of digits. Not after a letter or digit (mp3, A4 stay words).
_INT_EN = r"\d{1,3}(?:,\d{3}){1,5}|\d{1,15}"
_NUM_EN = rf"(?<![^\W_])(?<!\d\.)(?P<int>{_INT_EN})(?:\.(?P<frac>\d{{1,15}}))?(?!\d|\.\d)"
_SIGN = r"(?P<sign>(?<![\w.,)\]\-−])[-−])?"

_UNITS: dict[str, tuple[str, str]] = {
    "km/h": ("kilometer per hour", "kilometers per hour"), "kph": ("kilometer per hour", "kilometers per hour"),
    "mph": ("mile per hour", "miles per hour"), "km": ("kilometer", "kilometers"), "m": ("meter", "meters"),
    "cm": ("centimeter", "centimeters"), "mm": ("millimeter", "millimeters"), "mi": ("mile", "miles"),
    "kg": ("kilogram", "kilograms"), "g": ("gram", "grams"), "mg": ("milligram", "milligrams"),
    "lb": ("pound", "pounds"), "lbs": ("pound", "pounds"), "oz": ("ounce", "ounces"),
    "°C": ("degree Celsius", "degrees Celsius"), "°F": ("degree Fahrenheit", "degrees Fahrenheit"),
    "° C": ("degree Celsius", "degrees Celsius"), "° F": ("degree Fahrenheit", "degrees Fahrenheit"),
    "°": ("degree", "degrees"), "GB": ("gigabyte", "gigabytes"), "MB": ("megabyte", "megabytes"),
    "KB": ("kilobyte", "kilobytes"), "kB": ("kilobyte", "kilobytes"), "TB": ("terabyte", "terabytes"),
    "GHz": ("gigahertz", "gigahertz"), "MHz": ("megahertz", "megahertz"), "kHz": ("kilohertz", "kilohertz"),
    "Hz": ("hertz", "hertz"), "ms": ("millisecond", "milliseconds"), "s": ("second", "seconds"),
    "sec": ("second", "seconds"), "min": ("minute", "minutes"), "h": ("hour", "hours"), "hr": ("hour", "hours"),
    "hrs": ("hour", "hours"), "%": ("percent", "percent"), "L": ("liter", "liters"), "l": ("liter", "liters"),
    "ml": ("milliliter", "milliliters"), "mL": ("milliliter", "milliliters"), "ft": ("foot", "feet"),
    "in": ("inch", "inches"),
}  # fmt: skip
_UNIT_RE = "|".join(re.escape(u) for u in sorted(_UNITS, key=len, reverse=True))

_CURRENCIES: dict[str, tuple[str, str, str | None, str | None]] = {
    "$": ("dollar", "dollars", "cent", "cents"), "USD": ("dollar", "dollars", "cent", "cents"),
    "€": ("euro", "euros", "cent", "cents"), "EUR": ("euro", "euros", "cent", "cents"),
    "£": ("pound", "pounds", "penny", "pence"), "GBP": ("pound", "pounds", "penny", "pence"),
    "¥": ("yen", "yen", None, None), "JPY": ("yen", "yen", None, None),
    "₹": ("rupee", "rupees", "paisa", "paise"), "INR": ("rupee", "rupees", "paisa", "paise"),
    "CAD": ("Canadian dollar", "Canadian dollars", "cent", "cents"),
    "AUD": ("Australian dollar", "Australian dollars", "cent", "cents"),
    "CHF": ("Swiss franc", "Swiss francs", "centime", "centimes"), "CNY": ("yuan", "yuan", None, None),
}  # fmt: skip
_CODES = "USD|EUR|GBP|JPY|INR|CAD|AUD|CHF|CNY"
_SCALES = {"k": "thousand", "K": "thousand", "thousand": "thousand", "M": "million", "mn": "million",
           "million": "million", "B": "billion", "bn": "billion", "billion": "billion", "T": "trillion",
           "trillion": "trillion"}  # fmt: skip
_SCALE_RE = "thousand|million|billion|trillion|bn|mn|[kKMBT]"

_ABBREVIATIONS = {"Mr": "Mister", "Mrs": "Missus", "Ms": "Miz", "Prof": "Professor", "Jr": "Junior", "Sr": "Senior",
                  "Mt": "Mount", "Capt": "Captain", "Gen": "General", "Lt": "Lieutenant", "Col": "Colonel",
                  "Sgt": "Sergeant", "Rev": "Reverend", "Gov": "Governor", "Sen": "Senator", "Rep": "Representative",
                  "Dr": "Doctor", "St": "Saint"}  # fmt: skip
_SUFFIX_TITLES = frozenset({"Jr", "Sr"})
_LATIN = {"etc": "et cetera", "e.g": "for example", "i.e": "that is", "vs": "versus", "approx": "approximately"}


def _plural(words: str) -> str:
    if words.endswith("y"):
        return words[:-1] + "ies"
    return words + ("es" if words.endswith("x") else "s")


def _year(value: int, lang: str) -> str | None:
    if lang.startswith("en") and 1000 <= value <= 2099:
        return _words(value, lang, "year")
    return _words(value, lang)


def _date_words(year: int | None, month: int, day: int | None, lang: str, day_first: bool = False) -> str | None:
    if not 1 <= month <= 12 or (day is not None and not 1 <= day <= 31):
        return None
    month_name = _MONTHS[month - 1]
    parts: list[str] = []
    if day is not None:
        ordinal = _words(day, lang, "ordinal")
        if ordinal is None:
            return None
        parts.append(f"the {ordinal} of {month_name}" if day_first else f"{month_name} {ordinal}")
    else:
        parts.append(month_name)
    if year is not None:
        year_words = _year(year, lang)
        if year_words is None:
            return None
        parts.append(("," if day is not None and not day_first else "") + " " + year_words)
    return "".join(parts)


@functools.lru_cache(maxsize=16)
def _english_passes(lang: str, region: str) -> tuple[_Pass, ...]:
    day_first = region in {"GB", "AU", "NZ", "IE", "IN", "ZA"}
    passes: list[_Pass] = []

    def add(pattern: str, flags: int = 0, needs: tuple[str, ...] = (), digits: bool = True) -> Callable[[_R], _R]:
        def register(repl: _R) -> _R:
            passes.append(_Pass(re.compile(pattern, flags), repl, needs, digits))
            return repl

        return register

    def spell_parts(text: str, offset: int, seps: dict[str, str]) -> _Parts:
        """Words kept, separators named: `example.com/a-b` -> example dot com slash a dash b."""
        parts: _Parts = []
        for t in re.finditer(r"[^\W_]{1,64}|.", text):
            piece = t.group()
            a, b = offset + t.start(), offset + t.end()
            if piece in seps:
                parts.append((f" {seps[piece]} ", a, b))
            elif piece.isdigit() and len(piece) <= 4:
                parts.append((_digit_words(piece, lang) or piece, a, b))
            elif piece.isalnum():
                parts.append((piece, a, b))
        return parts

    url_seps = {".": "dot", "/": "slash", "-": "dash", "_": "underscore", "?": "question mark", "=": "equals",
                "&": "and", "#": "hash", ":": "colon", "%": "percent", "~": "tilde", "+": "plus",
                "@": "at"}  # fmt: skip

    @add(
        r"(?<![\w@/.])(?:(?:https?|ftp)://|www\.)[^\s<>\"'()\[\]{}]{1,2000}",
        re.IGNORECASE,
        needs=("://", "www", "WWW", "Www"),
        digits=False,
    )
    def url(m: re.Match[str]) -> _Parts | None:
        raw = m.group()
        body = re.sub(r"^(?:(?:https?|ftp)://)?(?:www\.)?", "", raw, flags=re.IGNORECASE)
        start = len(raw) - len(body)
        body = body.rstrip(".,;:!?/")
        parts = spell_parts(body, start, url_seps)
        end = start + len(body)
        return [*parts, *((c, i, i + 1) for i, c in enumerate(raw[end:], end) if c != "/")] if parts else None

    @add(r"(?<![\w@/.-])[A-Za-z0-9][A-Za-z0-9-]{0,62}(?:\.[A-Za-z0-9-]{1,63}){0,3}"
         r"\.(?:com|org|net|io|ai|dev|co|edu|gov|app)"
         r"(?:/[^\s<>\"'()\[\]{}]{0,500})?(?![\w@])", needs=(".",), digits=False)  # fmt: skip
    def domain(m: re.Match[str]) -> _Parts | None:
        return url(m)

    @add(
        r"(?<![\w.+-])[A-Za-z0-9][\w.+-]{0,63}@[A-Za-z0-9][A-Za-z0-9-]{0,62}(?:\.[A-Za-z0-9-]{1,63}){1,8}(?![\w-])",
        needs=("@",),
        digits=False,
    )
    def email(m: re.Match[str]) -> _Parts | None:
        return spell_parts(m.group(), 0, url_seps)

    @add(
        r"(?<![\w.])(Mrs|Mr|Ms|Prof|Jr|Sr|Mt|Capt|Gen|Lt|Col|Sgt|Rev|Gov|Sen|Rep|Dr|St)\.(?!\w)",
        needs=(".",),
        digits=False,
    )
    def title(m: re.Match[str]) -> str | None:
        key = m.group(1)
        before = m.string[max(0, m.start() - 24) : m.start()]
        after = m.string[m.end() : m.end() + 2]
        followed_by_name = len(after) == 2 and after[0] in " \t" and after[1].isupper()
        if key in ("St", "Dr"):
            numbered = re.search(r"\d(?:st|nd|rd|th)?\s{1,4}$", before) is not None
            named_before = re.search(r"[A-Z][a-z]{1,30}\s{1,4}$", before) is not None
            if key == "St" and (numbered or not followed_by_name):
                return "Street" + ("." if _ends_sentence(m) else "")
            if key == "Dr" and (numbered or (named_before and not followed_by_name)):
                return "Drive" + ("." if _ends_sentence(m) else "")
        word = _ABBREVIATIONS[key]
        return word + ("." if key in _SUFFIX_TITLES and _ends_sentence(m) else "")

    @add(
        r"(?<![\w.])(etc|e\.g|i\.e|vs|approx)\.(?!\w)|(?<![\w.])vs(?![\w.])",
        re.IGNORECASE,
        needs=(".", "vs", "VS", "Vs", "vS"),
        digits=False,
    )
    def latin(m: re.Match[str]) -> str:
        word = _LATIN[(m.group(1) or "vs").lower()]
        return word + ("." if _ends_sentence(m) and m.group(1) else "")

    @add(r"(?<![\w+])\+(\d{1,3})((?:[ .-]\(?\d{1,4}\)?){2,5})(?![\w])", needs=("+",))
    def phone_international(m: re.Match[str]) -> _Parts | None:
        if len(_digits_of(m.group())) < 7:
            return None
        return [("plus ", 0, 1), *phone_parts(m, 1)]

    @add(r"(?<![\w)])(?:\(\d{3}\)\s?|\d{3}[-.])\d{3}[-.]\d{4}(?![\w-])")
    def phone(m: re.Match[str]) -> _Parts:
        return phone_parts(m, 0)

    def phone_parts(m: re.Match[str], skip: int) -> _Parts:
        parts: _Parts = []
        for g in re.finditer(r"\d{1,8}", m.group()[skip:]):
            if parts:
                parts.append((", ", skip + g.start(), skip + g.start()))
            for i, d in enumerate(g.group()):
                at = skip + g.start() + i
                parts.append(((" " if i else "") + (_words(int(d), lang) or d), at, at + 1))
        return parts

    @add(r"#(?=\d)")
    def number_sign(m: re.Match[str]) -> str:
        return "number "

    @add(r"~(?=\d)")
    def about(m: re.Match[str]) -> str:
        return "about "

    @add(r"(?<![\w.-])(\d{4})-(\d{1,2})-(\d{1,2})(?![\w-])")
    def iso_date(m: re.Match[str]) -> str | None:
        return _date_words(int(m.group(1)), int(m.group(2)), int(m.group(3)), lang)

    @add(r"(?<![\w/.])(\d{1,2})([/.])(\d{1,2})\2(\d{4}|\d{2})(?![\w/]|\.\d)")
    def numeric_date(m: re.Match[str]) -> str | None:
        a, b = int(m.group(1)), int(m.group(3))
        dmy = day_first or m.group(2) == "." or a > 12
        day, month = (a, b) if dmy else (b, a)
        year = int(m.group(4))
        if len(m.group(4)) == 2:
            words = _date_words(None, month, day, lang, dmy)
            tail = _number(m.group(4), None, lang) if year else "oh oh"
            return f"{words} {tail}" if words and tail else None
        return _date_words(year, month, day, lang, dmy)

    @add(
        r"(?<![\w/.])(?:((?i:on|by|until|till|since|from|before|after|due|dated))\s{1,4})?(\d{1,2})/(\d{1,2})(?![\w/]|\.\d)"
    )
    def short_date(m: re.Match[str]) -> str | None:
        """12/05 (a month and day): a date after a word that dates, or written with a leading zero; a bare
        1/2 is left alone (a fraction, or a score)."""
        a, b = m.group(2), m.group(3)
        if not m.group(1) and not (a.startswith("0") or b.startswith("0")):
            return None
        day, month = (int(a), int(b)) if day_first or int(a) > 12 else (int(b), int(a))
        words = _date_words(None, month, day, lang, day_first or int(a) > 12)
        return None if words is None else f"{m.group(1)} {words}" if m.group(1) else words

    @add(
        rf"\b({_MONTH_RE})(?:\.|\b)\s{{1,4}}(\d{{1,2}})(?:st|nd|rd|th)?(?!\w|[:.,]\d)"
        rf"(?:,?\s{{1,4}}(\d{{4}})(?!\w|[:.,]\d))?"
    )
    def month_day(m: re.Match[str]) -> str | None:
        year = int(m.group(3)) if m.group(3) else None
        return _date_words(year, _MONTH_OF[m.group(1).lower()], int(m.group(2)), lang)

    @add(
        rf"(?<![\w.,])(\d{{1,2}})(?:st|nd|rd|th)?\s{{1,4}}(?:of\s{{1,4}})?({_MONTH_RE})\b"
        rf"(?:,?\s{{1,4}}(\d{{4}})(?!\w|[:.,]\d))?"
    )
    def day_month(m: re.Match[str]) -> str | None:
        year = int(m.group(3)) if m.group(3) else None
        return _date_words(year, _MONTH_OF[m.group(2).lower()], int(m.group(1)), lang, day_first=True)

    def clock(hour: int, minute: int, second: int | None, meridiem: str) -> str | None:
        if minute > 59 or (second is not None and second > 59) or hour > (12 if meridiem else 23):
            return None
        words = [_words(hour, lang) or ""]
        if minute or (not meridiem and second is None):
            if minute == 0:
                words.append("o'clock" if hour <= 12 else "hundred")
            elif minute < 10:
                words.append(f"oh {_words(minute, lang)}")
            else:
                words.append(_words(minute, lang) or "")
        if second:
            words.append(f"and {_words(second, lang)} {'second' if second == 1 else 'seconds'}")
        if meridiem:
            words.append("A M" if meridiem.lower() == "a" else "P M")
        return " ".join(words)

    @add(r"(?<![\w:.])(\d{1,2}):(\d{2})(?::(\d{2}))?(?:\s?([AaPp])\.?[Mm](\.?)(?!\w))?(?![\w:]|\.\d)")
    def time(m: re.Match[str]) -> str | None:
        second = int(m.group(3)) if m.group(3) else None
        words = clock(int(m.group(1)), int(m.group(2)), second, m.group(4) or "")
        return None if words is None else words + ("." if m.group(5) and _ends_sentence(m) else "")

    @add(r"(?<![\w:.])(\d{1,2})\s?([AaPp])\.?[Mm](\.?)(?!\w)")
    def hour(m: re.Match[str]) -> str | None:
        words = clock(int(m.group(1)), 0, None, m.group(2))
        return None if words is None else words + ("." if m.group(3) and _ends_sentence(m) else "")

    money_number = rf"(?P<int>{_INT_EN})(?:\.(?P<frac>\d{{1,15}}))?(?!\d)"
    money_scale = rf"(?:\s?(?P<scale>{_SCALE_RE})(?![^\W_]))?"

    def money(m: re.Match[str], currency: str) -> str | None:
        one, many, minor_one, minor_many = _CURRENCIES[currency]
        digits = m.group("int").replace(",", "")
        frac = m.group("frac")
        scale = m.group("scale")
        sign = "minus " if m.groupdict().get("sign") else ""
        if scale:
            words = _number(digits, frac, lang)
            return f"{sign}{words} {_SCALES[scale]} {many}" if words else None
        if frac and (len(frac) > 2 or minor_many is None):
            words = _number(digits, frac, lang)
            return f"{sign}{words} {many}" if words else None
        major = int(digits)
        minor = int(frac.ljust(2, "0")) if frac else 0
        said = []
        if major or not minor:
            said.append(f"{_words(major, lang)} {one if major == 1 else many}")
        if minor:
            said.append(f"{_words(minor, lang)} {minor_one if minor == 1 else minor_many}")
        return sign + " and ".join(said)

    @add(rf"(?P<sign>(?<![\w.,])[-−])?(?P<cur>[$€£¥₹])\s?{money_number}{money_scale}")
    def money_symbol(m: re.Match[str]) -> str | None:
        return money(m, m.group("cur"))

    @add(rf"(?<![^\W_])(?P<cur>{_CODES})\s?{money_number}{money_scale}")
    def money_code_before(m: re.Match[str]) -> str | None:
        return money(m, m.group("cur"))

    @add(rf"(?<![^\W_])(?<!\d\.){money_number}{money_scale}\s?(?P<cur>{_CODES})(?![^\W_])")
    def money_code_after(m: re.Match[str]) -> str | None:
        return money(m, m.group("cur"))

    @add(r"(?<![\w'’])['’]?(\d{2}|1\d{3}|20\d{2})s(?!\w)")
    def decade(m: re.Match[str]) -> str | None:
        value = int(m.group(1))
        if value % 10:
            return None
        words = _year(value, lang) if value >= 100 else _words(value, lang)
        return _plural(words) if words else None

    @add(rf"{_SIGN}{_NUM_EN}(?:(?P<dash>[-–])(?P<int2>{_INT_EN})(?:\.(?P<frac2>\d{{1,15}}))?)?(?P<sp>\s?)"
         rf"(?P<unit>{_UNIT_RE})(?![^\W_]|/\w|°)")  # fmt: skip
    def unit(m: re.Match[str]) -> str | None:
        name = m.group("unit")
        rest = m.string[m.end() : m.end() + 2]
        if name == "in" and re.match(r"\s?[^\W_]", rest):
            return None  # "5 in the morning"
        first = _number(m.group("int").replace(",", ""), m.group("frac"), lang, bool(m.group("sign")))
        if first is None:
            return None
        if m.group("int2"):
            second = _number(m.group("int2").replace(",", ""), m.group("frac2"), lang)
            if second is None:
                return None
            first, last_int, last_frac = f"{first} to {second}", m.group("int2"), m.group("frac2")
        else:
            last_int, last_frac = m.group("int"), m.group("frac")
        one, many = _UNITS[name]
        singular = last_int == "1" and not last_frac and not m.group("int2")
        return f"{first} {one if singular else many}"

    @add(rf"(?<![^\W_])(?P<int>{_INT_EN})(?P<suffix>st|nd|rd|th|ST|ND|RD|TH)(?![^\W_])")
    def ordinal(m: re.Match[str]) -> str | None:
        return _words(int(m.group("int").replace(",", "")), lang, "ordinal")

    @add(r"(?<![^\W_])(?<![\d.])(\d{1,9})(?:\.(\d{1,9})){2,4}(?![\w]|\.\d)")
    def dotted(m: re.Match[str]) -> str | None:
        words = [_number(g, None, lang) for g in m.group().split(".")]
        return None if None in words else " dot ".join(w for w in words if w)

    @add(rf"(?<![^\W_])(?<![-−.,])(?P<a>{_INT_EN})(?:\.(?P<fa>\d{{1,15}}))?(?:[-–]|\s–\s)"
         rf"(?P<b>{_INT_EN})(?:\.(?P<fb>\d{{1,15}}))?(?![\w]|[.,]\d|[-–]\d)")  # fmt: skip
    def number_range(m: re.Match[str]) -> str | None:
        a, b = m.group("a"), m.group("b")
        if (len(a) > 1 and a[0] == "0") or (len(b) > 1 and b[0] == "0"):
            return None
        years = re.fullmatch(r"1\d{3}|20\d{2}", a) and re.fullmatch(r"\d{4}", b) and int(b) > int(a)
        if years and not m.group("fa") and not m.group("fb"):
            first, second = _year(int(a), lang), _year(int(b), lang)
            return f"{first} to {second}" if first and second else None
        first = _number(a.replace(",", ""), m.group("fa"), lang)
        second = _number(b.replace(",", ""), m.group("fb"), lang)
        return f"{first} to {second}" if first and second else None

    @add(r"(?<![\w.])(?P<ctx>in|since|by|from|until|till|during|before|after|around|circa|year|of|early|late|mid)"
         r"(?P<sp>[\s-]{1,4})(?P<year>1\d{3}|20\d{2})(?!\w|[.,:]\d)", re.IGNORECASE)  # fmt: skip
    def year_in_context(m: re.Match[str]) -> _Parts | None:
        words = _year(int(m.group("year")), lang)
        if words is None:
            return None
        ys = m.start("year") - m.start()
        return [(m.group("ctx") + m.group("sp").replace("-", " "), 0, ys), (words, ys, len(m.group()))]

    @add(r"(?<![^\W_])(\d{1,4})\s?(BCE|BC|CE|AD)(?![^\W_])")
    def era(m: re.Match[str]) -> str | None:
        words = _year(int(m.group(1)), lang)
        return f"{words} {' '.join(m.group(2))}" if words else None

    @add(r"(?<![^\W_])\d{16,}")
    def long_digits(m: re.Match[str]) -> str | None:
        return _digit_words(m.group(), lang)

    @add(rf"{_SIGN}{_NUM_EN}")
    def number(m: re.Match[str]) -> str | None:
        words = _number(m.group("int").replace(",", ""), m.group("frac"), lang, bool(m.group("sign")))
        if words and m.end() < len(m.string) and m.string[m.end()].isalpha():
            words += " "
        return words

    symbols = {"&": " and ", "+": " plus ", "=": " equals ", "@": " at ", "°": " degrees ", "~": " about "}

    @add(r"(?<=\s)[@~](?=\s|$)|^[@~](?=\s|$)|[&+=°]", re.MULTILINE, ("&", "+", "=", "@", "°", "~"), digits=False)
    def symbol(m: re.Match[str]) -> str:
        return symbols[m.group()]

    return tuple(passes)


_COMMA_DECIMAL = frozenset(
    "de fr es it pt nl pl ru uk cs sk sl sv da no nb nn fi tr ro hu lt lv id vi be ca is sr az kz eo hr bg el".split()
)
_ORDINAL_MARKERS: dict[str, str] = {
    "fr": r"(?:er|re|ère|e|ème|eme)(?![^\W_])",
    "es": r"\.?[ºª]",
    "it": r"\.?[ºª]",
    "pt": r"\.?[ºª]",
    "ca": r"\.?[ºª]",
    "de": r"\.(?=\s{1,4}(?:Januar|Februar|März|April|Mai|Juni|Juli|August|September|Oktober|November|Dezember)\b)",
}


@functools.lru_cache(maxsize=64)
def _number_passes(lang: _Lang) -> tuple[_Pass, ...]:
    """Other languages: numbers only (cardinals, decimals, ordinals where marked), the rest untouched."""
    code = lang.n2w
    if code is None:
        return ()
    comma = lang.base in _COMMA_DECIMAL
    group = r"[.\u00a0\u202f]" if comma else ","
    integer = rf"\d{{1,3}}(?:{group}\d{{3}}){{1,5}}|\d{{1,15}}"
    decimal = "[,.]" if comma else r"\."
    passes: list[_Pass] = []

    def digits(text: str) -> str:
        return _digits_of(text)

    marker = _ORDINAL_MARKERS.get(lang.base)
    if marker:

        def ordinal(m: re.Match[str]) -> str | None:
            return _words(int(digits(m.group(1))), code, "ordinal")

        passes.append(_Pass(re.compile(rf"(?<![^\W_])(?<!\d[.,])({integer}){marker}"), ordinal))

    def long_digits(m: re.Match[str]) -> str | None:
        return _digit_words(m.group(), code)

    passes.append(_Pass(re.compile(r"(?<![^\W_])\d{16,}"), long_digits))

    def number(m: re.Match[str]) -> str | None:
        words = _number(digits(m.group("int")), m.group("frac"), code, bool(m.group("sign")))
        if words and m.end() < len(m.string) and m.string[m.end()].isalpha():
            words += " "
        return words

    pattern = rf"{_SIGN}(?<![^\W_])(?<!\d[.,])(?P<int>{integer})(?:{decimal}(?P<frac>\d{{1,15}}))?(?!\d|[.,]\d)"
    passes.append(_Pass(re.compile(pattern), number))
    return tuple(passes)


# ---------------------------------------------------------------------------------------------------------------------
# <say-as>


def _say_as(text: str, interpret: str, fmt: str, lang: _Lang) -> str | _Parts | None:
    code = lang.n2w
    if interpret in ("characters", "spell-out", "verbatim"):
        parts: _Parts = []
        for i, c in enumerate(text):
            if c.isspace():
                continue
            word = (_words(int(c), code) if code else None) if c.isdigit() else None
            parts.append(((" " if parts else "") + (word or c.upper()), i, i + 1))
        return parts
    if code is None:
        return None
    stripped = text.strip()
    if interpret == "digits":
        return _digit_words(stripped, code)
    if interpret in ("cardinal", "number"):
        m = re.fullmatch(r"([-−]?)(\d{1,3}(?:[,.\u00a0\u202f ]\d{3}){1,5}|\d{1,15})(?:[.,](\d{1,15}))?", stripped)
        if m is None:
            return None
        return _number(_digits_of(m.group(2)), m.group(3), code, bool(m.group(1)))
    if interpret == "ordinal":
        m = re.fullmatch(r"(\d{1,3}(?:[,.]\d{3}){1,5}|\d{1,15})\.?(?:st|nd|rd|th|º|ª|er|e)?", stripped)
        return _words(int(_digits_of(m.group(1))), code, "ordinal") if m else None
    if interpret == "telephone":
        groups = re.findall(r"\d{1,8}", stripped)
        said = [_digit_words(g, code) for g in groups]
        if not groups or None in said:
            return None
        return ("plus " if stripped.startswith("+") and lang.base == "en" else "") + ", ".join(s for s in said if s)
    if interpret == "date" and lang.base == "en":
        return _say_date(stripped, fmt or "mdy", code)
    return None  # time and anything else: read as text (normalization reads times)


def _say_date(text: str, fmt: str, lang: str) -> str | None:
    fields = re.findall(r"\d{1,4}|[A-Za-z]{3,9}", text)
    order = [c for c in fmt if c in "ymd"]
    if len(fields) != len(order) or not order:
        return None
    values: dict[str, int] = {}
    for key, field in zip(order, fields):
        if field.isdigit():
            values[key] = int(field)
        elif key == "m" and field.lower() in _MONTH_OF:
            values[key] = _MONTH_OF[field.lower()]
        else:
            return None
    if "m" not in values:
        return _year(values["y"], lang) if list(values) == ["y"] else None
    return _date_words(values.get("y"), values["m"], values.get("d"), lang, day_first=order[0] == "d")
