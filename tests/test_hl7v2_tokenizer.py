"""Unit tests of the HL7 v2 tokenizer (fhirtwin/hl7v2.py), as an integration engineer checks one.

Each test states the wire bytes and the tree they must read as. The tests named after a bug
(hex escapes, charsets, offsets, framing, short MSH) pin fixes of bugs they found.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fhirtwin.hl7v2 import (
    Encoding,
    HL7ParseError,
    Message,
    escape,
    parse,
    serialize,
    split_batch,
    unescape,
)

FIXTURES = Path(__file__).parent / "fixtures" / "hl7v2" / "tokenizer"
SAMPLE = FIXTURES / "adt_a01.hl7"

MSH = b"MSH|^~\\&|APP|FAC|RECV|RFAC|20240315083000||ADT^A01^ADT_A01|CTRL1|P|2.5"
BOM = b"\xef\xbb\xbf"


def msh_with_charset(charset: bytes, head: bytes = MSH) -> bytes:
    """MSH with MSH-13..MSH-17 empty and MSH-18 = charset (head ends at MSH-12)."""
    return head + b"|" * 6 + charset


def leaf(msg: Message, seg: int, n: int) -> str:
    """The first leaf of field n of segment number seg (0 = MSH)."""
    return msg.segments[seg].value(n)


def error_of(data: bytes | str, **kwargs: object) -> dict[str, object]:
    """Parse data that must fail, and return the error's JSON form."""
    with pytest.raises(HL7ParseError) as info:
        parse(data, **kwargs)  # type: ignore[arg-type]
    err = info.value
    d = err.to_dict()
    # Every error says what went wrong and what to do about it.
    assert d["error"], d
    assert isinstance(d["hint"], str) and d["hint"].strip(), d
    assert d["hint"] in str(err)
    return d


# --------------------------------------------------------------------------- encoding characters


def test_default_encoding_characters_are_read_from_msh1_msh2() -> None:
    msg = parse(MSH + b"\rPID|1\r")
    assert msg.encoding == Encoding("|", "^", "~", "\\", "&", "")
    assert msg.msh.field(1) == [[["|"]]]  # MSH-1 is the field separator itself
    assert msg.msh.field(2) == [[["^~\\&"]]]  # MSH-2 is never split
    assert msg.msh.value(3) == "APP"
    assert msg.message_code == "ADT"
    assert msg.trigger_event == "A01"
    assert msg.structure == "ADT_A01"
    assert msg.control_id == "CTRL1"
    assert msg.version == "2.5"


def test_non_default_delimiters() -> None:
    # field '#', component '$', repetition '*', escape '@', sub-component '!'
    data = (
        b"MSH#$*@!#APP$X!Y#FAC###20240101##ADT$A01#C1#P#2.5\r"
        b"PID#1##id1$$$AUTH*id2$$$AUTH2##Doe$Jane!Q#note @F@ @S@ @R@ @T@ @E@ a|b^c~d\\e&f\r"
    )
    msg = parse(data)
    assert msg.encoding == Encoding("#", "$", "*", "@", "!", "")
    assert msg.msh.field(2) == [[["$*@!"]]]
    assert msg.msh.field(3) == [[["APP"], ["X", "Y"]]]
    assert msg.message_code == "ADT" and msg.trigger_event == "A01"
    pid = msg.segments[1]
    assert pid.field(3) == [[["id1"], [""], [""], ["AUTH"]], [["id2"], [""], [""], ["AUTH2"]]]
    assert pid.field(5) == [[["Doe"], ["Jane", "Q"]]]
    # The default delimiters are plain text here; the escapes name the declared ones.
    assert pid.field(6) == [[["note # $ * ! @ a|b^c~d\\e&f"]]]


def test_truncation_character_of_v27() -> None:
    msg = parse(b"MSH|^~\\&#|APP\rNTE|1||50\\P\\ cut\r")
    assert msg.encoding.truncation == "#"
    assert msg.encoding.msh2 == "^~\\&#"
    assert leaf(msg, 1, 3) == "50# cut"


def test_double_escaped_backslash_in_msh2_is_repaired_with_a_note() -> None:
    msg = parse(b"MSH|^~\\\\&|APP\rPID|1||a^b\r")
    assert msg.encoding == Encoding()
    assert msg.segments[1].field(3) == [[["a"], ["b"]]]
    assert any("MSH-2" in n for n in msg.notes)


def test_short_msh2_falls_back_to_default_characters() -> None:
    msg = parse(b"MSH|^~|APP\rPID|1||a^b~c&d\r")
    assert msg.encoding == Encoding()
    assert msg.segments[1].field(3) == [[["a"], ["b"]], [["c", "d"]]]


# --------------------------------------------------------------------------- escape sequences


@pytest.mark.parametrize(
    ("escaped", "text"),
    [
        ("\\F\\", "|"),
        ("\\S\\", "^"),
        ("\\T\\", "&"),
        ("\\R\\", "~"),
        ("\\E\\", "\\"),
        ("\\X41\\", "A"),
        ("\\X414243\\", "ABC"),
        ("\\XC3A9\\", "é"),  # hex data is bytes in the message's character set (UTF-8 here)
        ("\\X0D0A\\", "\r\n"),
        ("line 1\\.br\\line 2", "line 1\nline 2"),
        ("\\H\\bold\\N\\ normal", "bold normal"),  # highlighting carries no text
        ("a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f", "a|b^c&d~e\\f"),
        ("\\Zcustom\\", "\\Zcustom\\"),  # unknown: kept literally, not lost
        ("50\\% off", "50\\% off"),  # unterminated: kept literally
        ("\\P\\", "\\P\\"),  # truncation escape without a truncation character
    ],
)
def test_escape_sequences_in_a_field(escaped: str, text: str) -> None:
    msg = parse(f"MSH|^~\\&|APP\rNTE|1||{escaped}\r".encode())
    assert msg.segments[1].field(3) == [[[text]]]
    assert msg.segments[1].raw(3) == escaped  # raw() keeps the wire form


def test_escaped_delimiters_do_not_split() -> None:
    msg = parse(b"MSH|^~\\&|APP\rPID|1||a\\S\\b\\R\\c\\T\\d^e\r")
    assert msg.segments[1].field(3) == [[["a^b~c&d"], ["e"]]]


def test_escape_and_unescape_are_inverse() -> None:
    enc = Encoding("#", "$", "*", "@", "!", "%")
    for text in ["plain", "#$*@!%", "a|b^c~d\\e&f", "two\r\nlines", "é ü 中文", "@E@", ""]:
        assert unescape(escape(text)) == text
        assert unescape(escape(text, enc), enc) == text
    assert escape("a|b^c&d~e\\f") == "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f"


@pytest.mark.parametrize("seq", ["\\X-A\\", "\\X0xAB\\", "\\X0_AB\\", "\\X A\\"])
def test_malformed_hex_escape_never_raises(seq: str) -> None:
    msg = parse(f"MSH|^~\\&|APP\rNTE|1||{seq}\r".encode())
    assert msg.segments[1].field(3) == [[[seq]]]  # kept literally, like any unknown sequence


# --------------------------------------------------------------------------- structure


def test_repetitions_components_subcomponents() -> None:
    msg = parse(b"MSH|^~\\&|APP\rPID|1||a^b&c&d^e~f^^g&~\r")
    pid = msg.segments[1]
    assert pid.field(3) == [
        [["a"], ["b", "c", "d"], ["e"]],
        [["f"], [""], ["g", ""]],
        [[""]],
    ]
    assert pid.value(3) == "a"
    assert pid.value(3, 0, 2, 3) == "d"
    assert pid.value(3, 1, 3, 1) == "g"
    assert pid.value(3, 5, 1, 1) == ""  # absent repetition
    assert pid.value(3, 0, 9, 9) == ""  # absent component
    assert pid.raw(3) == "a^b&c&d^e~f^^g&~"


@pytest.mark.parametrize("sep", [b"\r", b"\n", b"\r\n"], ids=["CR", "LF", "CRLF"])
def test_segment_separators_give_the_same_tree(sep: bytes) -> None:
    reference = parse(SAMPLE.read_bytes()).tree()
    lines = SAMPLE.read_bytes().split(b"\r")
    assert parse(sep.join(lines)).tree() == reference
    assert parse(sep.join(lines) + sep * 2).tree() == reference  # trailing blank lines


def test_mixed_separators_and_blank_lines() -> None:
    msg = parse(b"MSH|^~\\&|APP\r\nPID|1\n\nPV1|1|I\r\rOBX|1\r\n")
    assert [s.name for s in msg] == ["MSH", "PID", "PV1", "OBX"]
    assert msg.notes == []


def test_utf8_bom_and_mllp_framing_are_ignored() -> None:
    reference = parse(SAMPLE.read_bytes()).tree()
    msg = parse(BOM + SAMPLE.read_bytes())
    assert msg.bom is True
    assert msg.tree() == reference
    assert parse(b"\x0b" + SAMPLE.read_bytes() + b"\x1c\r").tree() == reference
    assert parse(BOM + b"\x0b" + SAMPLE.read_bytes() + b"\x1c\r").tree() == reference
    assert parse("\ufeff" + SAMPLE.read_text("utf-8")).tree() == reference


def test_str_bytes_bytearray_memoryview_agree() -> None:
    data = SAMPLE.read_bytes()
    reference = parse(data).tree()
    assert parse(data.decode("utf-8")).tree() == reference
    assert parse(bytearray(data)).tree() == reference
    assert parse(memoryview(data)).tree() == reference


def test_trailing_separators_and_empty_fields() -> None:
    msg = parse(b"MSH|^~\\&|APP\rPID|1||x||\r")
    pid = msg.segments[1]
    assert msg.tree()[1] == ("PID", [[[["1"]]], [[[""]]], [[["x"]]], [[[""]]], [[[""]]]])
    assert pid.field_count() == 3  # last non-empty field
    assert pid.field(2) == [[[""]]]
    assert pid.field(99) == [[[""]]]  # far beyond the segment: empty, not an error
    assert pid.raw(99) == "" and pid.value(99) == "" and not pid.has(99)
    assert not pid.has(2) and pid.has(3)


def test_hl7_null_is_kept_distinct_from_empty() -> None:
    msg = parse(b'MSH|^~\\&|APP\rPID|1||""|\r')
    pid = msg.segments[1]
    assert pid.field(3) == [[['""']]]  # the explicit null is visible to the mapping
    assert pid.value(3) == '""'
    assert not pid.has(3)  # ...but does not count as a value
    assert pid.field(4) == [[[""]]]


def test_segment_with_name_only() -> None:
    msg = parse(b"MSH|^~\\&|APP\rZZZ\rZZ1|\r")
    assert msg.tree()[1:] == [("ZZZ", []), ("ZZ1", [[[[""]]]])]


def test_z_segments_and_fields_beyond_the_standard_are_kept() -> None:
    pid40 = b"|" * 40 + b"beyond^the&standard"
    msg = parse(b"MSH|^~\\&|APP\rPID" + pid40 + b"\rZPI|1|custom^data~more|\rZ01|x\r")
    assert [s.name for s in msg] == ["MSH", "PID", "ZPI", "Z01"]
    pid = msg.segments_named("PID")[0]
    assert pid.field(40) == [[["beyond"], ["the", "standard"]]]
    assert pid.field_count() == 40
    zpi = msg.segments_named("ZPI")[0]
    assert zpi.field(2) == [[["custom"], ["data"]], [["more"]]]
    assert msg.tree()[2] == ("ZPI", [[[["1"]]], [[["custom"], ["data"]], [["more"]]], [[[""]]]])


def test_segment_index_and_offsets() -> None:
    msg = parse(b"MSH|^~\\&|APP\rPID|1\rPV1|1\r")
    assert [s.index for s in msg] == [0, 1, 2]
    assert [s.offset for s in msg] == [0, 13, 19]
    assert msg.byte_offset(19) == 19


def test_serialize_round_trips_the_sample() -> None:
    msg = parse(SAMPLE.read_bytes())
    assert parse(serialize(msg.tree(), msg.encoding)).tree() == msg.tree()
    assert (
        parse(serialize(msg.tree(), Encoding("#", "$", "*", "@", "!"), "\n")).tree() == msg.tree()
    )


# --------------------------------------------------------------------------- character sets


def test_msh18_8859_1_decodes_latin1_bytes() -> None:
    data = msh_with_charset(b"8859/1") + b"\rPID|1||||Dupr\xe9^Ren\xe9e\r"
    msg = parse(data)
    assert msg.charset == "iso-8859-1"
    assert msg.msh.value(18) == "8859/1"
    assert msg.segments[1].field(5) == [[["Dupré"], ["Renée"]]]
    assert msg.notes == []


def test_msh18_with_non_default_delimiters() -> None:
    head = b"MSH#$*@!#APP#FAC#R#RF#20240101##ADT$A01#C1#P#2.5"
    msg = parse(msh_with_charset(b"8859/1", head).replace(b"|", b"#") + b"\rPID#1####Dupr\xe9\r")
    assert msg.charset == "iso-8859-1"
    assert msg.segments[1].value(5) == "Dupré"


def test_msh18_unicode_utf8_decodes_utf8() -> None:
    msg = parse(msh_with_charset(b"UNICODE UTF-8") + "\rPID|1||||Dupré^Zoë\r".encode())
    assert msg.charset == "utf-8"
    assert msg.segments[1].field(5) == [[["Dupré"], ["Zoë"]]]


@pytest.mark.parametrize("bom", [b"", BOM], ids=["plain", "bom"])
def test_msh18_utf8_with_invalid_bytes_names_msh18_and_the_byte(bom: bytes) -> None:
    data = bom + msh_with_charset(b"UNICODE UTF-8") + b"\rPID|1||||Dupr\xe9\r"
    d = error_of(data)
    assert d["field"] == "MSH-18"
    assert d["byte_offset"] == data.index(b"\xe9")
    assert "utf-8" in str(d["error"]).lower()


def test_no_msh18_and_invalid_utf8_falls_back_to_cp1252_with_a_note() -> None:
    msg = parse(MSH + b"\rPID|1||||Dupr\xe9\r")
    assert msg.charset == "cp1252"
    assert msg.segments[1].value(5) == "Dupré"
    assert any("windows-1252" in n for n in msg.notes)


def test_unknown_msh18_is_read_as_utf8_with_a_note() -> None:
    msg = parse(msh_with_charset(b"KLINGON") + "\rPID|1||||Dupré\r".encode())
    assert msg.charset == "utf-8"
    assert msg.segments[1].value(5) == "Dupré"
    assert any("MSH-18" in n for n in msg.notes)


def test_charset_argument_overrides_msh18() -> None:
    data = msh_with_charset(b"UNICODE UTF-8") + b"\rPID|1||||Dupr\xe9\r"
    assert parse(data, charset="8859/1").segments[1].value(5) == "Dupré"
    assert parse(data, charset="iso-8859-1").segments[1].value(5) == "Dupré"


def test_unknown_charset_argument_is_a_parse_error() -> None:
    d = error_of(MSH + b"\r", charset="klingon")
    assert d["field"] == "MSH-18"


@pytest.mark.parametrize("charset", ["rot13", "base64"])
def test_non_text_codec_as_charset_is_a_parse_error(charset: str) -> None:
    d = error_of(MSH + b"\r", charset=charset)
    assert d["field"] == "MSH-18"


def test_hex_escape_uses_the_message_charset() -> None:
    msg = parse(msh_with_charset(b"8859/1") + b"\rPID|1||||Dupr\\XE9\\\r")
    assert msg.segments[1].value(5) == "Dupré"


# --------------------------------------------------------------------------- continuation lines


def test_line_without_segment_name_is_joined_as_continuation() -> None:
    data = b"MSH|^~\\&|APP\rOBX|1|TX|||line one\rline two\rline | three\rNTE|1|after\r"
    msg = parse(data)
    assert [s.name for s in msg] == ["MSH", "OBX", "NTE"]
    obx = msg.segments[1]
    assert obx.value(5) == "line one\nline two\nline | three"
    assert msg.segments[2].value(2) == "after"
    assert len(msg.notes) == 2
    assert all("does not start with a segment name" in n for n in msg.notes)
    # ASCII only: the note's byte number is where the line starts in the input.
    assert f"byte {data.index(b'line two')}" in msg.notes[0]


def test_continuation_note_gives_the_true_byte_offset() -> None:
    data = BOM + "MSH|^~\\&|APP\rOBX|1|TX|||Renée\rline two\r".encode()
    msg = parse(data)
    assert f"byte {data.index(b'line two')}" in msg.notes[0]


# --------------------------------------------------------------------------- batches


def test_batch_file_is_split_into_messages() -> None:
    data = (
        b"FHS|^~\\&|APP|FAC|||20240101\r"
        b"BHS|^~\\&|APP|FAC|||20240101\r"
        b"MSH|^~\\&|APP|FAC|||20240101||ADT^A01|M1|P|2.5\rPID|1||A\r"
        b"MSH|^~\\&|APP|FAC|||20240101||ADT^A08|M2|P|2.5\rPID|1||B\rPV1|1|I\r"
        b"BTS|2\r"
        b"FTS|1\r"
    )
    parts = split_batch(data)
    assert len(parts) == 2
    msgs = [parse(p) for p in parts]
    assert [m.control_id for m in msgs] == ["M1", "M2"]
    assert [[s.name for s in m] for m in msgs] == [["MSH", "PID"], ["MSH", "PID", "PV1"]]
    for part in parts:
        assert not re.search(rb"(^|[\r\n])(FHS|BHS|BTS|FTS)", part)


@pytest.mark.parametrize("sep", [b"\r", b"\n", b"\r\n"], ids=["CR", "LF", "CRLF"])
def test_concatenated_messages_are_split(sep: bytes) -> None:
    one = SAMPLE.read_bytes().replace(b"\r", sep)
    data = (
        BOM
        + one
        + sep
        + one.replace(b"TOK00001", b"TOK00002")
        + one.replace(b"TOK00001", b"TOK00003")
    )
    parts = split_batch(data)
    assert [parse(p).control_id for p in parts] == ["TOK00001", "TOK00002", "TOK00003"]
    assert all(parse(p).tree()[1:] == parse(one).tree()[1:] for p in parts)


def test_mllp_framed_messages_are_split() -> None:
    data = b"\x0bMSH|^~\\&|A\rPID|1\r\x1c\r\x0bMSH|^~\\&|B\rPID|2\r\x1c\r"
    parts = split_batch(data)
    assert [parse(p).msh.value(3) for p in parts] == ["A", "B"]


def test_split_batch_of_one_and_of_nothing() -> None:
    assert split_batch(SAMPLE.read_bytes()) == [SAMPLE.read_bytes()]
    assert split_batch(b"") == []
    assert split_batch(b"\r\n\r\n") == []
    assert split_batch(b"FHS|^~\\&\rFTS|0\r") == []


@pytest.mark.parametrize("lead", [b"\x0b\x1c\r", b"\x1c\r", b"\x00\x00\r"], ids=repr)
def test_framing_before_the_first_message_is_not_a_message(lead: bytes) -> None:
    parts = split_batch(lead + b"\x0bMSH|^~\\&|A\rPID|1\r\x1c\r")
    assert len(parts) == 1
    assert parse(parts[0]).msh.value(3) == "A"


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("data", [b"", b"   \r\n", b"\x0b\x1c\r", BOM, ""], ids=repr)
def test_empty_input(data: bytes | str) -> None:
    d = error_of(data)
    assert "empty" in str(d["error"])
    assert d["byte_offset"] == 0


@pytest.mark.parametrize(
    ("data", "offset"),
    [
        (b"PID|1||123\r", 0),
        (b"EVN|A01\rMSH|^~\\&|APP\r", 0),
        (b"hello world\r", 0),
        (b"MS", 0),
        (b"\x00\x01\x02garbage", 1),  # the NUL is framing: the message starts at byte 1
    ],
    ids=repr,
)
def test_missing_msh(data: bytes, offset: int) -> None:
    d = error_of(data)
    assert d["field"] == "MSH-1"
    assert d["segment"] == "MSH"
    assert d["byte_offset"] == offset
    assert "MSH" in str(d["hint"])


@pytest.mark.parametrize("sep", [b"A", b"1", b" ", b"\t"], ids=repr)
def test_bad_msh1(sep: bytes) -> None:
    d = error_of(b"MSH" + sep + b"^~\\&" + sep + b"APP\rPID|1\r")
    assert d["field"] == "MSH-1"
    assert d["byte_offset"] == 3
    assert "field separator" in str(d["error"])


def test_missing_msh2() -> None:
    d = error_of(b"MSH||APP|FAC\r")
    assert d["field"] == "MSH-2"
    assert d["byte_offset"] == 4


def test_bad_msh1_offset_counts_bom_and_framing() -> None:
    data = BOM + b"\x0b\r\nMSHA^~\\&A\r"
    d = error_of(data)
    assert d["byte_offset"] == data.index(b"MSHA") + 3


@pytest.mark.parametrize(
    "data", [b"MSH|^~\\&\rPID|1|PAP\r", b"MSH|^~\rPID|1|PAP\r"], ids=["full-msh2", "short-msh2"]
)
def test_msh_without_fields_after_msh2(data: bytes) -> None:
    msg = parse(data)
    assert msg.encoding == Encoding()
    assert msg.tree() == [("MSH", []), ("PID", [[[["1"]]], [[["PAP"]]]])]


def test_trailing_space_of_last_field_is_kept() -> None:
    data = b"MSH|^~\\&|APP\rNTE|1||keep  \rNTE|2||keep  \r"
    msg = parse(data)
    assert [s.value(3) for s in msg.segments[1:]] == ["keep  ", "keep  "]


def test_non_text_input_is_a_parse_error() -> None:
    with pytest.raises(HL7ParseError) as info:
        parse(12345)  # type: ignore[arg-type]
    assert info.value.to_dict()["hint"]


def test_error_message_says_what_where_and_what_to_do() -> None:
    with pytest.raises(HL7ParseError) as info:
        parse(b"MSHA^~\\&A\r")
    text = str(info.value)
    assert "MSH-1" in text and "byte 3" in text and "'|'" in text
    d = info.value.to_dict()
    assert set(d) >= {"error", "hint", "field", "byte_offset", "segment", "segment_index"}
