"""HL7 v2 tokenizer: bytes in, a lazily split message tree out.

The hot path splits a message into segments and fields only; repetitions,
components and sub-components are split, and escape sequences decoded, the
first time a field is read. That keeps parsing at hundreds of thousands of
segments per second on one core while the mapping engine reads only the fields
its rules name.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = [
    "Encoding",
    "HL7ParseError",
    "Message",
    "Segment",
    "decode",
    "escape",
    "parse",
    "serialize",
    "split_batch",
    "unescape",
]

# A field value as a tree: repetitions → components → sub-components.
FieldTree = list[list[list[str]]]

_BOM = b"\xef\xbb\xbf"
_FRAME_CHARS = "\x0b\x1c\x00"
_SEGMENT_NAME = re.compile(r"[A-Z][A-Z0-9]{2}\Z")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_BATCH_WRAPPERS = frozenset({"FHS", "BHS", "BTS", "FTS"})

# MSH-18 values (HL7 table 0211) → Python codecs.
_CHARSETS = {
    "ASCII": "ascii",
    "8859/1": "iso-8859-1",
    "8859/2": "iso-8859-2",
    "8859/3": "iso-8859-3",
    "8859/4": "iso-8859-4",
    "8859/5": "iso-8859-5",
    "8859/6": "iso-8859-6",
    "8859/7": "iso-8859-7",
    "8859/8": "iso-8859-8",
    "8859/9": "iso-8859-9",
    "8859/15": "iso-8859-15",
    "UNICODE": "utf-8",
    "UNICODE UTF-8": "utf-8",
    "UNICODE UTF-16": "utf-16",
    "UNICODE UTF-32": "utf-32",
    "ISO IR6": "ascii",
    "ISO IR100": "iso-8859-1",
    "ISO IR192": "utf-8",
    "ISO IR87": "iso2022_jp",
    "ISO IR159": "iso2022_jp_2",
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc_kr",
    "CNS 11643-1992": "big5",
    "BIG-5": "big5",
    "JAS2020": "shift_jis",
    "JIS X 0202": "iso2022_jp",
}


class HL7ParseError(ValueError):
    """A message that cannot be read, with where it went wrong and what to do."""

    def __init__(
        self,
        what: str,
        *,
        hint: str,
        control_id: str | None = None,
        segment: str | None = None,
        segment_index: int | None = None,
        field: str | None = None,
        offset: int | None = None,
        message_index: int | None = None,
    ) -> None:
        self.what = what
        self.hint = hint
        self.control_id = control_id
        self.segment = segment
        self.segment_index = segment_index
        self.field = field
        self.offset = offset
        self.message_index = message_index
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.field:
            where.append(self.field)
        if self.control_id:
            where.append(f"message {self.control_id}")
        if self.message_index is not None:
            where.append(f"message #{self.message_index + 1} of the batch")
        if self.segment_index is not None:
            where.append(f"segment {self.segment_index + 1} ({self.segment or '?'})")
        if self.offset is not None:
            where.append(f"byte {self.offset}")
        place = f" [{', '.join(where)}]" if where else ""
        return f"{self.what}{place}: {self.hint}"

    def to_dict(self) -> dict[str, object]:
        """The error as JSON-ready data (dead letters, ERR segments, reports)."""
        return {
            "error": self.what,
            "hint": self.hint,
            "control_id": self.control_id,
            "segment": self.segment,
            "segment_index": self.segment_index,
            "field": self.field,
            "byte_offset": self.offset,
            "message_index": self.message_index,
        }


@dataclass(frozen=True, slots=True)
class Encoding:
    """The delimiters a message declares in MSH-1 and MSH-2."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str = ""

    @property
    def msh2(self) -> str:
        return self.component + self.repetition + self.escape + self.subcomponent + self.truncation


DEFAULT_ENCODING = Encoding()


class Segment:
    """One segment: raw (still escaped) fields, split further on first read.

    ``fields[0]`` is the segment name and ``fields[n]`` is field n, so for MSH
    ``fields[1]`` is the field separator and ``fields[2]`` the encoding
    characters, as the standard numbers them.
    """

    __slots__ = ("_cache", "charset", "encoding", "fields", "index", "name", "offset")

    def __init__(
        self,
        fields: list[str],
        index: int,
        offset: int,
        encoding: Encoding,
        charset: str = "utf-8",
    ) -> None:
        self.name = fields[0]
        self.fields = fields
        self.index = index
        self.offset = offset
        self.encoding = encoding
        self.charset = charset  # \Xhh\ escapes carry bytes in the message's character set
        self._cache: dict[int, FieldTree] = {}

    def __repr__(self) -> str:
        return f"Segment({self.encoding.field.join(self.fields)!r})"

    def raw(self, n: int) -> str:
        """Field n exactly as sent (escaped, unsplit); '' when absent."""
        fields = self.fields
        return fields[n] if n < len(fields) else ""

    def has(self, n: int) -> bool:
        """True when field n holds anything other than nothing or HL7's null ("")."""
        fields = self.fields
        if n >= len(fields):
            return False
        v = fields[n]
        return bool(v) and v != '""'

    def field(self, n: int) -> FieldTree:
        """Field n as repetitions → components → sub-components, unescaped."""
        tree = self._cache.get(n)
        if tree is None:
            fields = self.fields
            raw = fields[n] if n < len(fields) else ""
            if n <= 2 and self.name == "MSH":
                tree = [[[raw]]]
            else:
                tree = split_field(raw, self.encoding, self.charset)
            self._cache[n] = tree
        return tree

    def value(self, n: int, rep: int = 0, comp: int = 1, sub: int = 1) -> str:
        """One leaf (1-based component and sub-component, 0-based repetition); '' if absent."""
        fields = self.fields
        if n >= len(fields) or not fields[n]:
            return ""
        tree = self._cache.get(n)
        if tree is None:
            tree = self.field(n)
        try:
            return tree[rep][comp - 1][sub - 1]
        except IndexError:
            return ""

    def field_count(self) -> int:
        """Number of fields present (the last non-empty field's number)."""
        fields = self.fields
        n = len(fields) - 1
        while n > 0 and not fields[n]:
            n -= 1
        return n


@dataclass(slots=True)
class Message:
    """A parsed HL7 v2 message."""

    segments: list[Segment]
    encoding: Encoding
    charset: str
    text: str
    notes: list[str] = field(default_factory=list)
    bom: bool = False

    @property
    def msh(self) -> Segment:
        return self.segments[0]

    @property
    def control_id(self) -> str:
        return self.msh.value(10)

    @property
    def message_code(self) -> str:
        return self.msh.value(9, 0, 1)

    @property
    def trigger_event(self) -> str:
        return self.msh.value(9, 0, 2)

    @property
    def structure(self) -> str:
        return self.msh.value(9, 0, 3)

    @property
    def version(self) -> str:
        return self.msh.value(12, 0, 1)

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments)

    def segments_named(self, name: str) -> list[Segment]:
        return [s for s in self.segments if s.name == name]

    def tree(self) -> list[tuple[str, list[FieldTree]]]:
        """The whole message as plain data: (name, [field trees]) per segment."""
        out = []
        for seg in self.segments:
            start = 3 if seg.name == "MSH" else 1
            out.append((seg.name, [seg.field(i) for i in range(start, len(seg.fields))]))
        return out

    def byte_offset(self, char_offset: int) -> int:
        """Byte offset in the original input of a character offset in the decoded text."""
        prefix = self.text[:char_offset].encode(self.charset, errors="replace")
        return len(prefix) + (len(_BOM) if self.bom else 0)


def split_field(raw: str, enc: Encoding, charset: str = "utf-8") -> FieldTree:
    """Split one raw field into repetitions, components and sub-components, unescaped."""
    if not raw:
        return [[[""]]]
    rep_sep, comp_sep, sub_sep, esc = enc.repetition, enc.component, enc.subcomponent, enc.escape
    if esc not in raw:
        # The common case: plain splits, done by str.split in C.
        if sub_sep in raw:
            return [[c.split(sub_sep) for c in r.split(comp_sep)] for r in raw.split(rep_sep)]
        if rep_sep not in raw:
            if comp_sep not in raw:
                return [[[raw]]]
            return [[[c] for c in raw.split(comp_sep)]]
        return [[[c] for c in r.split(comp_sep)] for r in raw.split(rep_sep)]
    has_escape = True
    out: FieldTree = []
    for rep in raw.split(rep_sep) if rep_sep in raw else (raw,):
        comps = []
        for comp in rep.split(comp_sep) if comp_sep in rep else (rep,):
            subs = comp.split(sub_sep) if sub_sep in comp else [comp]
            if has_escape:
                subs = [unescape(s, enc, charset) if esc in s else s for s in subs]
            comps.append(subs)
        out.append(comps)
    return out


_HIGHLIGHT = frozenset({"H", "N"})


def unescape(text: str, enc: Encoding = DEFAULT_ENCODING, charset: str = "utf-8") -> str:
    r"""Decode HL7 escape sequences (\F\ \S\ \T\ \R\ \E\ \Xhh\ \.br\ …).

    Highlighting (\H\, \N\), character-set switches (\Cxxyy\, \Mxxyyzz\) and
    formatting commands other than \.br\ carry no text and are dropped. An
    unknown or unterminated sequence is kept literally rather than lost.
    """
    esc = enc.escape
    if esc not in text:
        return text
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        j = text.find(esc, i)
        if j < 0:
            out.append(text[i:])
            break
        out.append(text[i:j])
        k = text.find(esc, j + 1)
        if k < 0:
            out.append(text[j:])
            break
        seq = text[j + 1 : k]
        if seq == "F":
            out.append(enc.field)
        elif seq == "S":
            out.append(enc.component)
        elif seq == "T":
            out.append(enc.subcomponent)
        elif seq == "R":
            out.append(enc.repetition)
        elif seq == "E":
            out.append(esc)
        elif seq == "P" and enc.truncation:
            out.append(enc.truncation)
        elif seq in _HIGHLIGHT or (seq[:1] in ("C", "M") and _is_hex(seq[1:])):
            pass
        elif seq[:1] == "X" and _is_hex(seq[1:]) and len(seq) % 2 == 1:
            out.append(bytes.fromhex(seq[1:]).decode(charset, errors="replace"))
        elif seq == ".br":
            out.append("\n")
        elif seq[:1] == "." and seq[1:3] in ("sp", "in", "ti", "sk", "ce", "fi", "nf"):
            if seq[1:3] == "sp":
                out.append("\n")
        elif seq == "":
            # "\\" is an empty sequence; keep both characters as sent.
            out.append(esc + esc)
        else:
            out.append(text[j : k + 1])
        i = k + 1
    return "".join(out)


_HEX = re.compile(r"[0-9A-Fa-f]+\Z")


def _is_hex(s: str) -> bool:
    return bool(_HEX.match(s))


def escape(text: str, enc: Encoding = DEFAULT_ENCODING) -> str:
    """Escape a leaf value so that it survives serialization unchanged."""
    esc = enc.escape
    out = text.replace(esc, f"{esc}E{esc}")
    for char, code in (
        (enc.field, "F"),
        (enc.component, "S"),
        (enc.subcomponent, "T"),
        (enc.repetition, "R"),
    ):
        out = out.replace(char, f"{esc}{code}{esc}")
    if enc.truncation:
        out = out.replace(enc.truncation, f"{esc}P{esc}")
    out = out.replace("\r", f"{esc}X0D{esc}").replace("\n", f"{esc}X0A{esc}")
    # MLLP framing bytes must never appear inside a message.
    for char in "\x0b\x1c\x00":
        if char in out:
            out = out.replace(char, f"{esc}X{ord(char):02X}{esc}")
    return out


def serialize(
    tree: list[tuple[str, list[FieldTree]]], enc: Encoding = DEFAULT_ENCODING, sep: str = "\r"
) -> str:
    """Write a message tree (as returned by ``Message.tree``) back to HL7 v2 text."""
    lines = []
    for name, fields in tree:
        parts = [name]
        if name == "MSH":
            parts = ["MSH", enc.msh2]
        for f in fields:
            parts.append(
                enc.repetition.join(
                    enc.component.join(
                        enc.subcomponent.join(escape(s, enc) for s in comp) for comp in rep
                    )
                    for rep in f
                )
            )
        lines.append(enc.field.join(parts))
    return sep.join(lines) + sep


def _msh18(data: bytes) -> str:
    """Read MSH-18 from raw bytes (before decoding: it says how to decode)."""
    start = data.find(b"MSH")
    if start < 0 or len(data) < start + 4:
        return ""
    sep = data[start + 3 : start + 4]
    end = len(data)
    for brk in (b"\r", b"\n"):
        k = data.find(brk, start)
        if 0 <= k < end:
            end = k
    fields = data[start:end].split(sep)
    # fields[0] is "MSH", fields[1] is MSH-2: MSH-n is fields[n-1].
    if len(fields) < 18:
        return ""
    value = fields[17].split(b"~")[0]
    comp = data[start + 4 : start + 5] or b"^"
    return value.split(comp)[0].decode("ascii", errors="replace").strip()


def decode(data: bytes, charset: str | None = None) -> tuple[str, str, list[str], bool]:
    """Decode raw message bytes: BOM, then MSH-18, then UTF-8, else cp1252 with a note.

    ``charset`` (from a sender profile) overrides MSH-18. Returns
    (text, codec, notes, had_bom).
    """
    notes: list[str] = []
    bom = data.startswith(_BOM)
    if bom:
        data = data[len(_BOM) :]
    codec = None
    if charset:
        codec = _CHARSETS.get(charset.upper(), charset)
    else:
        declared = _msh18(data)
        if declared:
            codec = _CHARSETS.get(declared.upper())
            if codec is None:
                notes.append(
                    f"MSH-18 character set {declared!r} is not known; read as UTF-8 "
                    "(set `charset` in the sender profile to force one)"
                )
    if codec:
        try:
            codecs.lookup(codec)
        except LookupError:
            raise HL7ParseError(
                f"character set {codec!r} is not known to this system",
                hint="set `charset` in the sender profile to one of the HL7 table 0211 values",
                field="MSH-18",
            ) from None
        try:
            return data.decode(codec), codec, notes, bom
        except (LookupError, TypeError):
            raise HL7ParseError(
                f"{codec!r} is not a text character set",
                hint="set `charset` in the sender profile to one of the HL7 table 0211 values",
                field="MSH-18",
            ) from None
        except UnicodeDecodeError as exc:
            raise HL7ParseError(
                f"bytes {data[exc.start : exc.end]!r} are not valid {codec}",
                hint="the message does not match the character set it declares in MSH-18 "
                "(or the sender profile's `charset`); fix the sender or force the right one "
                "in its profile",
                offset=exc.start + (3 if bom else 0),
                field="MSH-18",
            ) from None
    try:
        return data.decode("utf-8"), "utf-8", notes, bom
    except UnicodeDecodeError as exc:
        notes.append(
            f"not valid UTF-8 at byte {exc.start} and no MSH-18 character set: read as "
            "windows-1252 (set `charset` in the sender profile to make this explicit)"
        )
        return data.decode("cp1252", errors="replace"), "cp1252", notes, bom


def _encoding_from(msh: str, notes: list[str], base: int = 0) -> Encoding:
    """Delimiters from the MSH line (``base``: its byte offset, for errors)."""
    if len(msh) < 4 or not msh.startswith("MSH"):
        raise HL7ParseError(
            "the message does not start with an MSH segment and its encoding characters",
            hint="each message must begin with 'MSH|^~\\&|'; check that the sender does not "
            "prepend anything and that batch files are split on MSH",
            segment="MSH",
            segment_index=0,
            field="MSH-1",
            offset=base,
        )
    fs = msh[3]
    end = msh.find(fs, 4)
    enc_chars = msh[4:end] if end >= 0 else msh[4:]
    if fs.isalnum() or fs.isspace():
        raise HL7ParseError(
            f"MSH-1 field separator {fs!r} is a letter, digit or space",
            hint="the character right after 'MSH' must be the field separator, usually '|'",
            segment="MSH",
            segment_index=0,
            field="MSH-1",
            offset=base + 3,
        )
    if len(enc_chars) < 1:
        raise HL7ParseError(
            "MSH-2 encoding characters are missing",
            hint="MSH-2 must hold the component, repetition, escape and sub-component "
            "characters, usually '^~\\&'",
            segment="MSH",
            segment_index=0,
            field="MSH-2",
            offset=base + 4,
        )
    unique = "".join(dict.fromkeys(enc_chars))
    if unique != enc_chars or fs in enc_chars:
        notes.append(
            f"MSH-2 {enc_chars!r} repeats a delimiter; read as {unique.replace(fs, '')!r} "
            "(the sender probably double-escaped the backslash)"
        )
        enc_chars = unique.replace(fs, "")
    chars = list(enc_chars) + [""] * (5 - len(enc_chars))
    return Encoding(
        fs, chars[0] or "^", chars[1] or "~", chars[2] or "\\", chars[3] or "&", chars[4]
    )


def parse(data: bytes | str, *, charset: str | None = None) -> Message:
    """Parse one HL7 v2 message.

    Accepts CR, LF or CRLF between segments, a UTF-8 BOM, MLLP framing
    characters around the message, and lines that continue a multi-line value
    (a line that does not start with a segment name is joined to the segment
    before it, with a note). Raises ``HL7ParseError`` and nothing else.
    """
    notes: list[str] = []
    bom = False
    if isinstance(data, bytes | bytearray | memoryview):
        text, codec, notes, bom = decode(bytes(data), charset)
    elif isinstance(data, str):
        text, codec = data.lstrip("\ufeff"), "utf-8"
    else:
        raise HL7ParseError(
            f"cannot read a {type(data).__name__} as an HL7 v2 message",
            hint="pass the message as bytes (preferred) or str",
        )
    # Framing and blank lines around the message are not part of it; white space at
    # the end of the last field is (so only line breaks and framing go at the end).
    body_start = len(text) - len(text.lstrip(_FRAME_CHARS + " \t\r\n"))
    body_end = len(text.rstrip(_FRAME_CHARS + "\r\n"))
    stripped = text[body_start:body_end]
    lead = body_start
    if not stripped.strip():
        raise HL7ParseError(
            "the message is empty",
            hint="nothing but white space or MLLP framing was received; check the sender",
            offset=0,
        )

    def at_byte(char_offset: int) -> int:
        prefix = text[:char_offset].encode(codec, errors="replace")
        return len(prefix) + (len(_BOM) if bom else 0)

    first_line = _LINE_BREAK.split(stripped, maxsplit=1)[0]
    enc = _encoding_from(first_line, notes, at_byte(lead))
    fs = enc.field
    segments: list[Segment] = []
    for line, start in _lines(stripped):
        offset = lead + start
        if not line:
            continue
        name = line[:3]
        if (len(line) == 3 or line[3:4] == fs) and _SEGMENT_NAME.match(name):
            parts = line.split(fs)
            if name == "MSH":
                parts = ["MSH", fs, *parts[1:]]
            segments.append(Segment(parts, len(segments), offset, enc, codec))
        elif segments:
            # A multi-line value (e.g. an OBX TX report pasted with line breaks).
            prev = segments[-1]
            prev.fields[-1] = prev.fields[-1] + "\n" + line
            prev._cache.clear()
            notes.append(
                f"line at byte {at_byte(offset)} does not start with a segment name; joined "
                f"to the {prev.name} segment above it as a line break in its last field"
            )
        else:
            raise HL7ParseError(
                f"line {line[:20]!r} does not start with a segment name",
                hint="every line must start with a three-character segment name followed by "
                "the field separator",
                segment_index=0,
                offset=at_byte(offset),
            )
    msg = Message(segments, enc, codec, text, notes, bom)
    return msg


def _lines(text: str) -> Iterator[tuple[str, int]]:
    start = 0
    for m in _LINE_BREAK.finditer(text):
        yield text[start : m.start()], start
        start = m.end()
    if start < len(text):
        yield text[start:], start


def split_batch(data: bytes) -> list[bytes]:
    """Split a file into messages: FHS/BHS/BTS/FTS batches and plain concatenations.

    Batch header and trailer segments are dropped; every MSH starts a new
    message. A file holding one message comes back as a list of one.
    """
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    messages: list[bytes] = []
    current: list[bytes] = []
    for line in re.split(rb"(?<=\r\n)|(?<=\n)|(?<=\r)(?!\n)", data):
        name = line.lstrip(b"\x0b\x1c\x00 \t")[:3]
        if name == b"MSH":
            if current and any(x.strip(b"\r\n\x0b\x1c\x00 \t") for x in current):
                messages.append(b"".join(current))
            current = [line]
        elif name.decode("ascii", errors="replace") in _BATCH_WRAPPERS:
            continue
        else:
            current.append(line)
    if current and any(x.strip(b"\r\n\x0b\x1c\x00 \t") for x in current):
        messages.append(b"".join(current))
    return messages
