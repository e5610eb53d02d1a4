"""Contract 1 (tag lines): property tests and one example per clause."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amygdala_dagster.graph.tags import is_tag_line, parse_score, parse_tags

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text built from pieces that look like tags, so the interesting paths are hit often.
_names = st.sampled_from(["joy", "Warmth", "self-doubt", "a_b", "été", "x1", "1x", "", "_x", "-y", "ÄRGER"])
_values = st.sampled_from(["0", "10", "9", "7.5", "11", "-2", "high", "", "5.", ".5", "10.0", "3:4"])
_token = st.one_of(
    st.builds(lambda n, v: f"{n}:{v}", _names, _values),
    st.sampled_from(["word", "http://x.y", "a:b:c", ":", "::", "note:"]),
    st.text(max_size=6),
)
_sep = st.sampled_from([" ", "  ", "\t", " \u00a0 "])
_line = st.builds(
    lambda toks, sep: sep.join(toks), st.lists(_token, min_size=0, max_size=5), _sep
)
_newline = st.sampled_from(["\n", "\r\n", "\r", "\n\n", "\u2028", "\x0b"])
_content = st.builds(
    lambda lines, nls: "".join(line + nls[i % len(nls)] for i, line in enumerate(lines)),
    st.lists(_line, max_size=8),
    st.lists(_newline, min_size=1, max_size=3),
) | st.text()


def _last_line(text: str) -> str | None:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None


@PROPS
@given(_content)
def test_never_raises_and_body_never_ends_in_a_tag_line(content: str) -> None:
    parsed = parse_tags(content)
    assert isinstance(parsed.body, str)
    last = _last_line(parsed.body)
    assert last is None or not is_tag_line(last)
    assert parsed.body == parsed.body.strip()
    assert all(0.0 <= s <= 10.0 for s in parsed.scores.values())
    assert all(name == name.lower() for name in parsed.scores)
    assert parsed.malformed >= 0


@PROPS
@given(_content)
def test_parsing_the_body_again_changes_nothing(content: str) -> None:
    body = parse_tags(content).body
    again = parse_tags(body)
    assert again.body == body
    assert again.scores == {}
    assert again.malformed == 0


@PROPS
@given(st.text(), st.dictionaries(st.sampled_from(["joy", "warmth", "self-doubt", "awe_x"]),
                                  st.integers(0, 10), min_size=1))
def test_tags_appended_to_prose_are_recovered(prose: str, tags: dict[str, int]) -> None:
    # A prose last line that is itself tag-shaped would join the block, so end prose with a word.
    prose = prose + "\nend."
    content = prose + "\n" + " ".join(f"{k}:{v}" for k, v in tags.items())
    parsed = parse_tags(content)
    assert parsed.scores == {k: float(v) for k, v in tags.items()}
    assert parsed.body == parse_tags(prose).body


def test_several_agents_lines_take_the_maximum() -> None:
    parsed = parse_tags("A quiet evening.\nwarmth:6 clarity:10\nwarmth:9 curiosity:7\nwarmth:4")
    assert parsed.body == "A quiet evening."
    assert parsed.scores == {"warmth": 9.0, "clarity": 10.0, "curiosity": 7.0}
    assert parsed.malformed == 0


def test_crlf_line_endings() -> None:
    parsed = parse_tags("Line one.\r\nLine two.\r\njoy:8 awe:3\r\n")
    assert parsed.body == "Line one.\nLine two."
    assert parsed.scores == {"joy": 8.0, "awe": 3.0}


def test_name_value_inside_prose_is_body_text() -> None:
    content = "I rated it joy:9 in my head.\nThen ratio 3:4 came up.\nwarmth:7"
    parsed = parse_tags(content)
    assert parsed.body == "I rated it joy:9 in my head.\nThen ratio 3:4 came up."
    assert parsed.scores == {"warmth": 7.0}
    # ...also on the last line, where a prose word ends the block.
    parsed = parse_tags("Text.\nfeeling joy:9 today")
    assert parsed.body == "Text.\nfeeling joy:9 today"
    assert parsed.scores == {}


def test_malformed_values_are_dropped_counted_and_stay_in_the_block() -> None:
    parsed = parse_tags("Body text.\njoy:high warmth:8 awe:11 calm:-2 :5\nhope:3 fear:")
    assert parsed.body == "Body text."
    assert parsed.scores == {"warmth": 8.0, "hope": 3.0}
    assert parsed.malformed == 5  # high, 11, -2, missing name, missing value


def test_a_line_of_only_malformed_tokens_is_still_a_tag_line() -> None:
    parsed = parse_tags("Body.\njoy:high\ncalm:4")
    assert parsed.body == "Body."
    assert parsed.scores == {"calm": 4.0}
    assert parsed.malformed == 1


def test_names_must_start_with_a_letter() -> None:
    parsed = parse_tags("Body.\n1joy:5 _x:5 -y:5 ok:5")
    assert parsed.scores == {"ok": 5.0}
    assert parsed.malformed == 3


def test_hyphenated_and_underscored_names() -> None:
    parsed = parse_tags("Body.\nself-doubt:8 quiet_pride:9 x-1_y:2")
    assert parsed.scores == {"self-doubt": 8.0, "quiet_pride": 9.0, "x-1_y": 2.0}


def test_upper_case_names_are_lower_cased_and_merged() -> None:
    parsed = parse_tags("Body.\nWarmth:9 JOY:2\nwarmth:3 joy:6")
    assert parsed.scores == {"warmth": 9.0, "joy": 6.0}


def test_non_ascii_names_and_bodies() -> None:
    parsed = parse_tags("Un été très calme — 静かな夜。\nÉmerveillement:9 ärger:2 静けさ:7")
    assert parsed.body == "Un été très calme — 静かな夜。"
    assert parsed.scores == {"émerveillement": 9.0, "ärger": 2.0, "静けさ": 7.0}


def test_decimal_scores_and_bounds() -> None:
    parsed = parse_tags("Body.\njoy:7.5 awe:0 calm:10 hope:10.0 fear:0.25 rage:10.5")
    assert parsed.scores == {"joy": 7.5, "awe": 0.0, "calm": 10.0, "hope": 10.0, "fear": 0.25}
    assert parsed.malformed == 1
    assert parse_score("10") == 10.0 and parse_score("10.01") is None and parse_score("1e1") is None


def test_content_made_only_of_tags() -> None:
    parsed = parse_tags("joy:9\nwarmth:8 awe:2\n")
    assert parsed.body == ""
    assert parsed.scores == {"joy": 9.0, "warmth": 8.0, "awe": 2.0}


def test_blank_lines_inside_the_trailing_run() -> None:
    parsed = parse_tags("Body text here.\n\njoy:9\n\n   \nwarmth:8\n\n")
    assert parsed.body == "Body text here."
    assert parsed.scores == {"joy": 9.0, "warmth": 8.0}


def test_a_line_with_a_non_tag_token_ends_the_block() -> None:
    parsed = parse_tags("First.\nearly:9\nwarmth:2 and more\njoy:8")
    assert parsed.body == "First.\nearly:9\nwarmth:2 and more"
    assert parsed.scores == {"joy": 8.0}


def test_tag_lines_in_the_middle_are_body_text() -> None:
    parsed = parse_tags("joy:9\nThe actual entry.")
    assert parsed.body == "joy:9\nThe actual entry."
    assert parsed.scores == {}


def test_surrounding_whitespace_is_trimmed_and_empty_content() -> None:
    assert parse_tags("  \n  Text.  \n\n").body == "Text."
    assert parse_tags("") == ("", {}, 0)
    assert parse_tags("\n\n") == ("", {}, 0)


def test_is_tag_line() -> None:
    assert is_tag_line("joy:9 warmth:3")
    assert is_tag_line("  joy:high  ")  # malformed, but of the form name:value
    assert not is_tag_line("")
    assert not is_tag_line("joy:9 and")
    assert not is_tag_line("see http://example.org")
    assert not is_tag_line("a:b:c")


# --- Contract 1: one name function (normalise with NFKC + casefold, then validate) ----------------

from amygdala_dagster.graph.tags import MAX_NAME_LENGTH, check_emotion_name, normalize_emotion_name  # noqa: E402


def test_dotted_capital_i_is_a_valid_name() -> None:
    """Issue 9 #2: 'İlham' was validated before lower-casing, whose combining dot a second check rejected."""
    parsed = parse_tags("Bir gün.\nİlham:9")
    assert parsed.malformed == 0
    assert parsed.scores == {"i\u0307lham": 9.0}
    assert check_emotion_name("İlham") == "i\u0307lham"
    # The normalised form is itself valid and a fixed point: it may be fed back anywhere.
    assert check_emotion_name("i\u0307lham") == "i\u0307lham"
    assert parse_tags("x\ni\u0307lham:3").scores == {"i\u0307lham": 3.0}


def test_names_are_nfkc_then_case_folded() -> None:
    parsed = parse_tags("Body.\nSTRASSE:2 Straße:7 ﬁne:3 Ｊｏｙ:4 joy:1")
    assert parsed.scores == {"strasse": 7.0, "fine": 3.0, "joy": 4.0}
    assert normalize_emotion_name("Ǆ") == "dž"
    assert normalize_emotion_name("e\u0301t\u00e9") == normalize_emotion_name("ÉTÉ") == "\u00e9t\u00e9"


def test_combining_marks_inside_names_are_letters_of_their_script() -> None:
    # Devanagari and Thai words need combining vowel signs; a name may not start with one.
    assert check_emotion_name("ख़ुशी") == normalize_emotion_name("ख़ुशी")
    assert check_emotion_name("ความสุข") == "ความสุข"
    assert normalize_emotion_name("\u0301joy") is None
    assert normalize_emotion_name("joy!") is None and normalize_emotion_name("a.b") is None
    assert normalize_emotion_name("") is None and normalize_emotion_name("a b") is None
    assert normalize_emotion_name("²x") is None  # NFKC makes it '2x': a digit first


def test_name_length_is_capped_at_64_after_normalisation() -> None:
    """Issue 9 #3: a 300-character name crashed the writes (File name too long)."""
    assert MAX_NAME_LENGTH == 64
    assert normalize_emotion_name("a" * 64) == "a" * 64
    assert normalize_emotion_name("a" * 65) is None
    parsed = parse_tags("Body.\n" + "x" * 300 + ":9 joy:8")
    assert parsed.scores == {"joy": 8.0} and parsed.malformed == 1
    # 'ß' case-folds to 'ss': 40 of them are 80 characters once normalised.
    assert normalize_emotion_name("ß" * 40) is None
    # At most 192 UTF-8 bytes, so <name> plus a suffix fits a 255-byte file name.
    assert normalize_emotion_name("\U00010330" * 48) == "\U00010330" * 48
    assert normalize_emotion_name("\U00010330" * 49) is None


def test_check_emotion_name_error_names_the_name_and_the_rule() -> None:
    import pytest

    for bad in ("1joy", "x" * 300, "joy!", "", "_a"):
        with pytest.raises(ValueError) as err:
            check_emotion_name(bad)
        msg = str(err.value)
        assert repr(bad[:80]) in msg or repr(bad) in msg
        assert "letter" in msg and "64" in msg
    with pytest.raises(ValueError, match="must be a string"):
        check_emotion_name(5)  # type: ignore[arg-type]
    assert check_emotion_name("  Joy ") == "joy"



@PROPS
@given(st.text(max_size=12))
def test_normalisation_is_idempotent_and_valid_names_stay_valid(raw: str) -> None:
    name = normalize_emotion_name(raw)
    if name is not None:
        assert normalize_emotion_name(name) == name
        assert parse_tags(f"b\n{raw}:5").scores == {name: 5.0}
    else:
        assert parse_tags(f"b\n{raw}:5").scores == {} or ":" in raw or any(c.isspace() for c in raw)
