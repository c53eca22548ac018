"""text_frontend: normalization, source maps, Turbo's tags, SSML, inline breaks, the lexicon, linear time."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from text_frontend import (
    PARALINGUISTIC_TAGS,
    Lexicon,
    Pause,
    Reading,
    Segment,
    Speech,
    TextError,
    read_text,
)

EN = Reading()


def checked(text: str, reading: Reading = EN, ssml: bool | None = None) -> list[Segment]:
    """read_text, with the invariants every Speech keeps checked."""
    segments = read_text(text, reading, ssml)
    for segment in segments:
        if isinstance(segment, Speech):
            assert len(segment.source) == len(segment.text) + 1, segment
            assert list(segment.source) == sorted(segment.source), segment
            assert segment.source[0] >= 0 and segment.source[-1] <= len(text), segment
            assert segment.text == segment.text.strip(), segment
            assert "  " not in segment.text and "\t" not in segment.text, segment
            for start, end, _ in segment.phonemes:
                assert 0 <= start < end <= len(segment.text), segment
        else:
            assert 0 <= segment.at <= len(text) and segment.seconds >= 0, segment
    return segments


def said(text: str, reading: Reading = EN, ssml: bool | None = None) -> str:
    """The Speech texts joined by " | " (a Pause is a "|" of its own)."""
    out = []
    for segment in checked(text, reading, ssml):
        out.append(segment.text if isinstance(segment, Speech) else f"<{segment.seconds:g}s>")
    return " | ".join(out)


def only_speech(text: str, reading: Reading = EN, ssml: bool | None = None) -> Speech:
    segments = checked(text, reading, ssml)
    assert len(segments) == 1 and isinstance(segments[0], Speech), segments
    return segments[0]


def origin(speech: Speech, text: str, word: str, nth: int = 0) -> tuple[int, int]:
    """The caller's span [first, last + 1) the nth occurrence of `word` in the Speech came from."""
    at = -1
    for _ in range(nth + 1):
        at = speech.text.index(word, at + 1)
    return speech.source[at], speech.source[at + len(word) - 1] + 1


# ---------------------------------------------------------------------------------------------------------------------
# 1. Normalization, English

ENGLISH = [
    ("I have 42 apples.", "I have forty two apples."),
    ("1st, 22nd and 103rd", "first, twenty second and one hundred third"),
    ("pi is 3.14", "pi is three point one four"),
    ("It was -5 today", "It was minus five today"),
    ("10-20 people", "ten to twenty people"),
    ("from 1990-1995", "from nineteen ninety to nineteen ninety five"),
    ("1,234,567 stars", "one million two hundred thirty four thousand five hundred sixty seven stars"),
    ("007", "zero zero seven"),
    ("$1,234.50", "one thousand two hundred thirty four dollars and fifty cents"),
    ("$5.20", "five dollars and twenty cents"),
    ("$1", "one dollar"),
    ("$0.50", "fifty cents"),
    ("$1M", "one million dollars"),
    ("$2.5 billion", "two point five billion dollars"),
    ("€3", "three euros"),
    ("£1.01", "one pound and one penny"),
    ("¥500", "five hundred yen"),
    ("₹20", "twenty rupees"),
    ("50 USD", "fifty dollars"),
    ("EUR 12.50", "twelve euros and fifty cents"),
    ("50%", "fifty percent"),
    ("12/05/2026", "December fifth, twenty twenty six"),
    ("25/12/2026", "the twenty fifth of December twenty twenty six"),
    ("2026-12-05", "December fifth, twenty twenty six"),
    ("Dec 5, 2026", "December fifth, twenty twenty six"),
    ("on 5 December", "on the fifth of December"),
    ("in 1999", "in nineteen ninety nine"),
    ("since 2005 we", "since two thousand five we"),
    ("the 1990s", "the nineteen nineties"),
    ("a 2005 laptop costs 1500", "a two thousand five laptop costs one thousand five hundred"),
    ("at 3:45pm", "at three forty five P M"),
    ("3:45 PM", "three forty five P M"),
    ("15:30", "fifteen thirty"),
    ("9am", "nine A M"),
    ("12:00", "twelve o'clock"),
    ("7:05", "seven oh five"),
    ("5 km", "five kilometers"),
    ("1 m", "one meter"),
    ("30 cm and 4 mm", "thirty centimeters and four millimeters"),
    ("2 kg, 1 g, 5 mg", "two kilograms, one gram, five milligrams"),
    ("3 lb 2 oz", "three pounds two ounces"),
    ("60 mph or 100 km/h", "sixty miles per hour or one hundred kilometers per hour"),
    ("20°C and 70 °F", "twenty degrees Celsius and seventy degrees Fahrenheit"),
    ("2 GB, 5 MB, 1 KB, 4 TB", "two gigabytes, five megabytes, one kilobyte, four terabytes"),
    ("100 ms, 3 s, 5 min, 2 h", "one hundred milliseconds, three seconds, five minutes, two hours"),
    ("1 L and 250 ml", "one liter and two hundred fifty milliliters"),
    ("6 ft 2 in", "six feet two inches"),
    ("at 5 in the morning", "at five in the morning"),
    ("10-20 km", "ten to twenty kilometers"),
    ("+1 415 555 0100", "plus one, four one five, five five five, zero one zero zero"),
    ("(415) 555-0100", "four one five, five five five, zero one zero zero"),
    ("415-555-0100", "four one five, five five five, zero one zero zero"),
    ("support@example.com", "support at example dot com"),
    ("mail first.last@mail.example.org", "mail first dot last at mail dot example dot org"),
    ("see https://www.example.com/path.", "see example dot com slash path."),
    ("at www.example.com", "at example dot com"),
    ("Dr. Smith", "Doctor Smith"),
    ("Mr. and Mrs. Jones met Ms. Lee", "Mister and Missus Jones met Miz Lee"),
    ("St. Louis", "Saint Louis"),
    ("on Baker St. today", "on Baker Street today"),
    ("John Smith Jr. went", "John Smith Junior went"),
    ("Prof. Xavier", "Professor Xavier"),
    ("cats vs. dogs", "cats versus dogs"),
    ("apples, pears, etc. and more", "apples, pears, et cetera and more"),
    ("fruit, e.g., apples", "fruit, for example, apples"),
    ("one, i.e. this", "one, that is this"),
    ("A & B", "A and B"),
    ("1+1=2", "one plus one equals two"),
    ("me @ home", "me at home"),
    ("#5", "number five"),
    ("~5 km", "about five kilometers"),
    ("30°", "thirty degrees"),
]


@pytest.mark.parametrize(("text", "expected"), ENGLISH)
def test_english_normalization_reads_each_class_as_words(text: str, expected: str) -> None:
    assert said(text) == expected


def test_a_sentence_ending_abbreviation_keeps_its_period_for_the_sentence_splitter() -> None:
    assert said("We met Bob Smith Jr. He smiled.") == "We met Bob Smith Junior. He smiled."
    assert said("apples, pears, etc.") == "apples, pears, et cetera."
    assert said("at 3:45 p.m. Then we left") == "at three forty five P M. Then we left"


def test_words_and_bracketed_text_that_are_not_numbers_stay() -> None:
    assert said("mp3 and A4 stay") == "mp3 and A4 stay"
    assert said("[citation needed]") == "[citation needed]"
    assert said("[1]") == "[one]"
    assert said("no numbers here") == "no numbers here"


def test_normalize_false_leaves_numbers() -> None:
    assert said("I have 42 apples", Reading(normalize=False)) == "I have 42 apples"


def test_very_long_digit_runs_are_read_digit_by_digit() -> None:
    assert said("1" * 20) == " ".join(["one"] * 20)


# ---------------------------------------------------------------------------------------------------------------------
# 1b. Other languages: numbers where num2words has them, the rest untouched


def test_german_numbers() -> None:
    de = Reading(language="de")
    assert said("Ich habe 42 Äpfel und 3,14 kg", de) == "Ich habe zweiundvierzig Äpfel und drei Komma eins vier kg"
    assert said("1.234.567 Sterne", de) == (
        "eine Million zweihundertvierunddreißigtausendfünfhundertsiebenundsechzig Sterne"
    )
    assert said("am 5. Mai, -3 Grad", de) == "am fünfte Mai, minus drei Grad"


def test_french_numbers_and_ordinals() -> None:
    fr = Reading(language="fr-FR")
    expected = "J'ai quarante-deux ans, le premier mai, trois virgule cinq kg"
    assert said("J'ai 42 ans, le 1er mai, 3,5 kg", fr) == expected


def test_spanish_numbers_and_ordinals() -> None:
    es = Reading(language="es")
    expected = "Tengo cuarenta y dos años, el segundo piso, Dr. Pérez"
    assert said("Tengo 42 años, el 2º piso, Dr. Pérez", es) == expected


def test_non_english_leaves_everything_but_numbers_untouched() -> None:
    assert said("Kosten: $5 & mehr, info@example.com", Reading(language="de")) == (
        "Kosten: $fünf & mehr, info@example.com"
    )


@pytest.mark.parametrize("language", ["xx", "zh", "", "not a language!", "en-ZZ-extra"])
def test_unknown_or_unsupported_languages_do_not_raise(language: str) -> None:
    out = said("Hi 42, Dr. Smith", Reading(language=language))
    assert out in ("Hi 42, Dr. Smith", "Hi forty two, Doctor Smith")


def test_a_month_and_day_alone_is_a_date_only_where_it_reads_as_one() -> None:
    assert said("Due on 12/05 at noon.") == "Due on December fifth at noon."
    assert said("It was 03/07.") == "It was March seventh."
    assert said("On 25/12 we eat.") == "On the twenty fifth of December we eat."
    assert "December" not in said("Mix 1/2 cup.")  # a fraction stays a fraction


def test_english_regions_read_day_first_dates() -> None:
    assert said("05/12/2026", Reading(language="en-GB")) == "the fifth of December twenty twenty six"
    assert said("05/12/2026", Reading(language="en-US")) == "May twelfth, twenty twenty six"


# ---------------------------------------------------------------------------------------------------------------------
# Source maps


def test_each_number_word_maps_into_the_digits_it_came_from() -> None:
    text = "I bought 42 eggs"
    speech = only_speech(text)
    assert speech.text == "I bought forty two eggs"
    span = (text.index("42"), text.index("42") + 2)
    for i in range(speech.text.index("forty"), speech.text.index(" eggs")):
        if speech.text[i] != " ":
            assert span[0] <= speech.source[i] < span[1], (i, speech.text[i])
    assert origin(speech, text, "forty")[0] == span[0]
    # Untouched words map 1:1.
    for word in ("I", "bought", "eggs"):
        first, end = origin(speech, text, word)
        assert text[first:end] == word
    assert speech.source[-1] == len(text)


def test_money_date_and_phone_words_map_into_their_spans() -> None:
    text = "Pay $5.20 on 2026-12-05 or call 415-555-0100 today"
    speech = only_speech(text)
    money = (text.index("$"), text.index(" on"))
    date = (text.index("2026"), text.index(" or"))
    phone = (text.index("415"), text.index(" today"))
    for word, span in (("dollars", money), ("cents", money), ("December", date), ("six", date), ("zero", phone)):
        first, end = origin(speech, text, word)
        assert span[0] <= first and end <= span[1], word
    # Phone digits map to their own digit.
    first, _ = origin(speech, text, "zero")
    assert text[first] == "0"
    assert text[slice(*origin(speech, text, "today"))] == "today"


def test_whitespace_collapses_but_newlines_stay_and_sources_stay_exact() -> None:
    text = "Hello   world\t\tagain\n\n  Next  para\n- item"
    speech = only_speech(text)
    assert speech.text == "Hello world again\n\nNext para\n- item"
    for word in ("Hello", "world", "again", "Next", "para", "item"):
        first, end = origin(speech, text, word)
        assert text[first:end] == word


def test_source_maps_point_past_removed_markup() -> None:
    text = "<speak>Hi <emphasis>there</emphasis> &amp; bye</speak>"
    speech = only_speech(text)
    assert speech.text == "Hi there and bye"
    assert text[slice(*origin(speech, text, "there"))] == "there"
    assert text[slice(*origin(speech, text, "bye"))] == "bye"
    first, end = origin(speech, text, "and")
    assert text[first:end] == "&amp;"[: end - first] and text[first] == "&"


# ---------------------------------------------------------------------------------------------------------------------
# 2. Turbo's paralinguistic tags


def test_known_tags_are_kept_byte_for_byte_for_an_engine_that_has_them() -> None:
    turbo = Reading(keep_tags=PARALINGUISTIC_TAGS)
    text = "Oh 5 [laugh] that [clear throat] was [sigh] fun"
    speech = only_speech(text, turbo)
    assert speech.text == "Oh five [laugh] that [clear throat] was [sigh] fun"
    for tag in ("[laugh]", "[clear throat]", "[sigh]"):
        first, end = origin(speech, text, tag)
        assert text[first:end] == tag
        at = speech.text.index(tag)
        assert list(speech.source[at : at + len(tag)]) == list(range(first, end))


def test_known_tags_the_engine_lacks_are_dropped_never_spoken() -> None:
    assert said("Hi [laugh] there [cough][gasp] you") == "Hi there you"
    only_laugh = Reading(keep_tags=frozenset({"[laugh]"}))
    assert said("Hi [laugh] there [chuckle] you", only_laugh) == "Hi [laugh] there you"


def test_other_bracketed_text_is_ordinary_text() -> None:
    turbo = Reading(keep_tags=PARALINGUISTIC_TAGS)
    assert said("See [citation needed] and [1]", turbo) == "See [citation needed] and [one]"


def test_a_tag_the_engine_has_beyond_the_known_set_passes_through() -> None:
    assert said("Hmm [whistle] ok", Reading(keep_tags=frozenset({"[whistle]"}))) == "Hmm [whistle] ok"


# ---------------------------------------------------------------------------------------------------------------------
# Inline breaks in plain text


def test_plain_text_inline_breaks_become_pauses() -> None:
    text = 'Wait <break time="700ms"/> now <break time="1.5s" /> and <break strength="strong"/>go'
    segments = checked(text)
    assert [type(s) for s in segments] == [Speech, Pause, Speech, Pause, Speech, Pause, Speech]
    pauses = [s for s in segments if isinstance(s, Pause)]
    assert [p.seconds for p in pauses] == [0.7, 1.5, 0.75]
    assert [p.at for p in pauses] == [i for i in range(len(text)) if text.startswith("<break", i)]


def test_plain_text_keeps_other_angle_brackets_and_caps_breaks() -> None:
    assert said("a <b>bold</b> move <break time='30s'/> x") == "a <b>bold</b> move | <10s> | x"
    with pytest.raises(TextError) as caught:
        read_text('Wait <break time="abc"/> now', EN)
    assert caught.value.position == 'Wait <break time="'.index('"') + 1


# ---------------------------------------------------------------------------------------------------------------------
# 3. SSML


def test_ssml_is_detected_by_its_speak_root() -> None:
    assert said('  <speak>Hi <break time="1s"/> 5</speak>') == "Hi | <1s> | five"
    assert said("<speak>Hi</speak>", ssml=False) == "<speak>Hi</speak>"
    with pytest.raises(TextError):
        read_text("Hi", EN, ssml=True)


@pytest.mark.parametrize(
    ("strength", "seconds"),
    [("none", 0.0), ("x-weak", 0.1), ("weak", 0.25), ("medium", 0.4), ("strong", 0.75), ("x-strong", 1.2)],
)
def test_break_strengths(strength: str, seconds: float) -> None:
    (pause,) = [s for s in checked(f'<speak>a <break strength="{strength}"/> b</speak>') if isinstance(s, Pause)]
    assert pause.seconds == seconds and pause.at == 9


def test_break_times_and_cap() -> None:
    assert said('<speak>a<break time="700ms"/>b<break time="1.5s"></break>c<break time="99s"/>d</speak>') == (
        "a | <0.7s> | b | <1.5s> | c | <10s> | d"
    )


def test_entities_are_decoded() -> None:
    assert said("<speak>caf&#233; &lt;tag&gt; &quot;q&quot; &apos;a&apos; &#x41;</speak>") == ("café <tag> \"q\" 'a' A")


def test_say_as() -> None:
    ssml = (
        '<speak><say-as interpret-as="characters">ABC</say-as>, <say-as interpret-as="spell-out">hi</say-as>, '
        '<say-as interpret-as="cardinal">1234</say-as>, <say-as interpret-as="ordinal">3</say-as>, '
        '<say-as interpret-as="digits">2026</say-as>, <say-as interpret-as="date" format="dmy">05/12/2026</say-as>, '
        '<say-as interpret-as="date" format="mdy">12/05/2026</say-as>, <say-as interpret-as="time">3:45pm</say-as>, '
        '<say-as interpret-as="telephone">415 555 0100</say-as></speak>'
    )
    assert said(ssml) == (
        "A B C, H I, one thousand two hundred thirty four, third, two zero two six, "
        "the fifth of December twenty twenty six, December fifth, twenty twenty six, three forty five P M, "
        "four one five, five five five, zero one zero zero"
    )


def test_say_as_characters_map_letter_by_letter() -> None:
    text = '<speak><say-as interpret-as="characters">AB</say-as></speak>'
    speech = only_speech(text)
    assert speech.text == "A B"
    assert text[speech.source[0]] == "A" and text[speech.source[2]] == "B"


def test_sub_reads_the_alias_mapped_over_the_elements_text() -> None:
    text = '<speak>Use <sub alias="structured query language">SQL</sub> now</speak>'
    speech = only_speech(text)
    assert speech.text == "Use structured query language now"
    sql = text.index(">SQL") + 1
    for word in ("structured", "query", "language"):
        first, end = origin(speech, text, word)
        assert sql <= first and end <= sql + 3


def test_prosody_rates_nest_multiply_and_clamp() -> None:
    segments = checked(
        '<speak>A <prosody rate="slow">slow <prosody rate="200%">quick</prosody></prosody> '
        '<prosody rate="x-fast"><prosody rate="x-fast"><prosody rate="4">max</prosody></prosody></prosody> '
        '<prosody rate="0.5">half</prosody> <prosody rate="+20%">plus</prosody> end</speak>'
    )
    speeches = [s for s in segments if isinstance(s, Speech)]
    assert [(s.text, s.rate) for s in speeches] == [
        ("A", 1.0),
        ("slow", 0.75),
        ("quick", 1.5),
        ("max", 4.0),
        ("half", 0.5),
        ("plus", 1.2),
        ("end", 1.0),
    ]


def test_paragraphs_and_sentences_end_and_separate() -> None:
    assert said("<speak><p><s>One</s><s>Two!</s></p><p>Three 3</p>Four</speak>") == "One. Two!\nThree three.\nFour"


def test_phoneme_marks_a_span_for_an_engine_with_phonemes_and_reads_the_text_otherwise() -> None:
    text = '<speak>Say <phoneme alphabet="ipa" ph="wɪn">Nguyen</phoneme> 2 times</speak>'
    speech = only_speech(text, Reading(phonemes=True))
    assert speech.text == "Say Nguyen two times"
    ((start, end, ipa),) = speech.phonemes
    assert speech.text[start:end] == "Nguyen" and ipa == "wɪn"
    assert text[slice(*origin(speech, text, "Nguyen"))] == "Nguyen"
    plain = only_speech(text)
    assert plain.text == "Say Nguyen two times" and plain.phonemes == ()


def test_other_elements_keep_their_text_and_drop_their_markup() -> None:
    ssml = (
        '<speak><emphasis level="strong">Big</emphasis> <voice name="x">v</voice> <lang xml:lang="fr">oui</lang>'
        ' <mark name="m"/><audio src="a.wav">fallback</audio> <foo bar="1">unknown</foo><!-- note --></speak>'
    )
    assert said(ssml) == "Big v oui fallback unknown"


MALFORMED = [
    ('<speak>Hello <prosody rate="slow">there', 13, "<prosody> opened at character 13 is never closed"),
    ("<speak>Hi", 0, "never closed"),
    ('<speak><prosody rate="slow">x</speak>', 29, "does not close <prosody>"),
    ("<speak></p></speak>", 7, "</p>"),
    ("<speak a=b>x</speak>", 6, "bad attribute syntax"),
    ('<speak><s a="1" a="2">x</s></speak>', 16, "repeated"),
    ("<speak>&nbsp;</speak>", 7, "entity"),
    ("<speak>AT&T</speak>", 9, "entity"),
    ('<speak><break time="abc"/></speak>', 20, "break time"),
    ('<speak><break time="-1s"/></speak>', 20, "break time"),
    ('<speak><break strength="loud"/></speak>', 24, "break strength"),
    ('<speak><prosody rate="fastest">x</prosody></speak>', 22, "prosody rate"),
    ('<!DOCTYPE speak [<!ENTITY a "b">]><speak>&a;</speak>', 0, "not allowed"),
    ('<speak><!ENTITY a "b"></speak>', 7, "not allowed"),
    ("<speak>x</speak>y", 16, "outside"),
    ("<speak>a < b</speak>", 9, "does not start a tag"),
    ("<speak><sub>x</sub></speak>", 7, "alias"),
    ("<speak><phoneme>x</phoneme></speak>", 7, "ph"),
    ("<p>x</p>", 0, "root"),
    ("<speak><!-- never closed</speak>", 7, "comment"),
    ("<speak>" + "<s>" * 70 + "</speak>", 7 + 3 * 63, "deeper than 64"),
]


@pytest.mark.parametrize(("text", "position", "words"), MALFORMED)
def test_malformed_ssml_names_the_position(text: str, position: int, words: str) -> None:
    with pytest.raises(TextError) as caught:
        read_text(text, EN, ssml=True)
    assert caught.value.position == position, caught.value.message
    assert words in caught.value.message
    assert caught.value.message.startswith("SSML:")


# ---------------------------------------------------------------------------------------------------------------------
# 4. Lexicon


def lexicon(rules: list[dict[str, Any]], trusted: bool = False) -> Lexicon:
    return Lexicon.parse(rules, trusted)


def test_lexicon_matches_whole_words_case_insensitively_by_default() -> None:
    lex = lexicon([{"match": "SQL", "alias": "sequel"}, {"match": "New York", "alias": "the big apple"}])
    reading = Reading(lexicon=lex)
    assert said("SQL, sql and mysql; new  york in New York 2", reading) == (
        "sequel, sequel and mysql; the big apple in the big apple two"
    )


def test_lexicon_case_sensitive_rules_and_longest_match() -> None:
    lex = lexicon(
        [
            {"match": "US", "alias": "United States", "case_sensitive": True},
            {"match": "US Army", "alias": "the army"},
        ]
    )
    assert said("us and US and the US Army", Reading(lexicon=lex)) == "us and United States and the the army"


def test_lexicon_replacements_are_not_normalized_but_other_numbers_are() -> None:
    lex = lexicon([{"match": "R2D2", "alias": "R 2 D 2"}, {"match": "k9", "alias": "canine 9"}])
    assert said("R2D2 and k9 have 3", Reading(lexicon=lex)) == "R 2 D 2 and canine 9 have three"


def test_lexicon_ipa_for_phoneme_engines_alias_for_others() -> None:
    lex = lexicon([{"match": "Nguyen", "ipa": "wɪn", "alias": "win"}, {"match": "Siobhan", "ipa": "ʃɪˈvɔːn"}])
    text = "Nguyen met Siobhan"
    assert said(text, Reading(lexicon=lex)) == "win met Siobhan"
    speech = only_speech(text, Reading(lexicon=lex, phonemes=True))
    assert speech.text == text
    spans = [(speech.text[a:b], ipa) for a, b, ipa in speech.phonemes]
    assert spans == [("Nguyen", "wɪn"), ("Siobhan", "ʃɪˈvɔːn")]
    first, end = origin(only_speech(text, Reading(lexicon=lex)), text, "win")
    assert text[first:end] == "Nguyen"[: end - first] and first == 0


def test_trusted_patterns_and_a_request_over_the_server() -> None:
    server = lexicon([{"pattern": r"\bk8s\b", "alias": "kubernetes"}, {"match": "SQL", "alias": "S Q L"}], True)
    request = lexicon([{"match": "sql", "alias": "sequel"}])
    assert said("k8s and SQL", Reading(lexicon=server)) == "kubernetes and S Q L"
    assert said("k8s and SQL", Reading(lexicon=server.merged(request))) == "kubernetes and sequel"
    assert server.merged(None) is server and len(server.merged(request)) == 3


@pytest.mark.parametrize(
    ("rules", "index", "words"),
    [
        ([{"pattern": "x", "alias": "y"}], 0, "only in the server"),
        ([{"match": "a", "alias": "b"}, {"match": "x"}], 1, "alias"),
        ([{"match": "  ", "alias": "y"}], 0, "empty"),
        ([{"match": "x", "alias": "y", "extra": 1}], 0, "unknown field"),
        (["x"], 0, "object"),
        ([{"match": "x", "alias": 3}], 0, "string"),
        ([{"match": "x", "alias": "y", "case_sensitive": "yes"}], 0, "true or false"),
        ([{"match": "x" * 101, "alias": "y"}], 0, "longer"),
        ([{"alias": "z"}], 0, "exactly one"),
    ],
)
def test_bad_lexicons_name_the_rule(rules: list[Any], index: int, words: str) -> None:
    with pytest.raises(TextError) as caught:
        Lexicon.parse(rules, trusted=False)
    assert caught.value.rule == index and f"rule {index}" in caught.value.message and words in caught.value.message


def test_lexicon_rule_counts_are_capped_and_bad_patterns_refused() -> None:
    with pytest.raises(TextError, match="at most 100"):
        Lexicon.parse([{"match": f"w{i}", "alias": "x"} for i in range(101)], trusted=False)
    with pytest.raises(TextError, match="at most 1000"):
        Lexicon.parse([{"match": f"w{i}", "alias": "x"} for i in range(1001)], trusted=True)
    with pytest.raises(TextError, match="bad 'pattern'"):
        Lexicon.parse([{"pattern": "(", "alias": "x"}], trusted=True)


# ---------------------------------------------------------------------------------------------------------------------
# Linear time on hostile input: 100 KB of each, bounded by the test's timeout (no timed assertions: a
# quadratic or exponential blow-up at this size takes minutes, linear work takes about a second)

HOSTILE: list[tuple[str, Any, bool | None]] = [
    ("digits", lambda n: "1" * n, None),
    ("grouped", lambda n: "1," * (n // 2), None),
    ("dotted", lambda n: "1." * (n // 2), None),
    ("dashes", lambda n: "1-" * (n // 2), None),
    ("colons", lambda n: "1:" * (n // 2), None),
    ("angles", lambda n: "<" * n, None),
    ("at", lambda n: "a@" * (n // 2), None),
    ("dollars", lambda n: "$" * n, None),
    ("money", lambda n: "$1 " * (n // 3), None),
    ("emails", lambda n: "a.b@c.d " * (n // 8), None),
    ("breaks", lambda n: '<break time="1s"' * (n // 16), None),
    ("brackets", lambda n: "[laugh" * (n // 6), None),
    ("titles", lambda n: "Dr. St. " * (n // 8), None),
    ("words", lambda n: "hello world 42 " * (n // 15), None),
    ("ssml-tags", lambda n: "<speak>" + "<emphasis>x</emphasis>" * (n // 22) + "</speak>", True),
    ("ssml-nested", lambda n: "<speak>" + ("<p><s>a</s></p>" * (n // 15)) + "</speak>", True),
    ("ssml-entities", lambda n: "<speak>" + "&amp;" * (n // 5) + "</speak>", True),
    ("ssml-open", lambda n: "<speak>" + "<a " * (n // 3), True),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("name", "make", "ssml"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_stays_linear(name: str, make: Any, ssml: bool | None) -> None:
    lex = Lexicon.parse([{"match": f"word{i}", "alias": "x"} for i in range(100)], trusted=False)
    reading = Reading(keep_tags=PARALINGUISTIC_TAGS, lexicon=lex)
    with contextlib.suppress(TextError):
        segments = read_text(make(100_000), reading, ssml)
        assert all(len(s.source) == len(s.text) + 1 for s in segments if isinstance(s, Speech))
