"""Prompt filter: normalisation defeats bypass tricks, ordinary prompts pass, the classifier is real."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.filters import (
    AbuseClassifier,
    GuildPolicy,
    PromptFilter,
    default_blocklist,
    load_blocklist,
    normalise,
    read_labelled,
)

FILTER = PromptFilter()

ORDINARY = [
    "a red circle on a blue background",
    "a cat wearing a hat",
    "an astronaut riding a horse, digital art",
    "a classic cocktail on a bar",
    "an assistant helping a class of students",
    "a scunthorpe town sign",
    "a knight fighting a dragon",
    "a watercolour of a shell on the beach",
    "Ein Hund im Schnee",
    "the number 42 painted on a door",
    "a spaceship with 3 engines",
    "grandma baking cookies in the kitchen",
    "a glass of water on a wooden table",
    "a cute puppy playing in the grass",
]

# Plain blocked words (single words, no wildcard needed) to mutate.
TARGETS = ["fuck", "naked", "porn", "hentai", "nazi", "gore", "shit", "nude"]

ZW = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad"]
HOMO = {"a": "аα", "e": "е", "o": "оο", "p": "рρ", "c": "с", "x": "х", "i": "іι", "k": "κк", "u": "υ",
        "n": "η", "h": "һ"}
LEET = {"a": "4@", "e": "3", "i": "1!", "o": "0", "s": "5$", "t": "7", "g": "9",
        "b": "8"}
FULLWIDTH = {c: chr(ord(c) - ord("a") + 0xFF41) for c in "abcdefghijklmnopqrstuvwxyz"}


@st.composite
def disguised(draw, word: str) -> str:
    out = []
    for ch in word:
        choice = draw(st.sampled_from(["plain", "upper", "homo", "leet", "full", "repeat"]))
        if choice == "upper":
            ch = ch.upper()
        elif choice == "homo" and ch in HOMO:
            ch = draw(st.sampled_from(list(HOMO[ch])))
        elif choice == "leet" and ch in LEET:
            ch = draw(st.sampled_from(list(LEET[ch])))
        elif choice == "full":
            ch = FULLWIDTH[ch]
        elif choice == "repeat":
            ch = ch * draw(st.integers(2, 4))
        out.append(ch)
    sep = draw(st.sampled_from(["", "zw", ".", "-", " ", "_", "*", "mixed"]))
    pieces = [out[0]]
    for ch in out[1:]:
        if sep == "zw":
            pieces.append(draw(st.sampled_from(ZW)))
        elif sep == "mixed":
            pieces.append(draw(st.sampled_from(["", ".", " ", "\u200b"])))
        else:
            pieces.append(sep)
        pieces.append(ch)
    return "".join(pieces)


@given(data=st.data(), target=st.sampled_from(TARGETS), before=st.sampled_from(["", "a ", "photo of a "]),
       after=st.sampled_from(["", " cat", " in the park"]))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_bypass_variants_of_blocked_words_are_caught(data, target, before, after):
    word = data.draw(disguised(target))
    decision = FILTER.check(f"{before}{word}{after}")
    assert not decision.allowed, (word, decision)
    assert decision.category not in (None, "abuse")


@pytest.mark.parametrize("prompt", ORDINARY)
def test_ordinary_prompts_pass(prompt):
    decision = FILTER.check(prompt)
    assert decision.allowed, decision
    assert decision.category is None


BENIGN_WORDS = ["red", "blue", "green", "circle", "square", "cat", "dog", "hat", "tree", "house", "a", "on", "with",
                "large", "small", "painting", "photo", "of", "the", "background", "triangle", "bird", "boat", "sky"]


@given(st.lists(st.sampled_from(BENIGN_WORDS), min_size=1, max_size=12))
@settings(max_examples=200, deadline=None)
def test_random_benign_sentences_pass(words):
    decision = FILTER.check(" ".join(words))
    assert decision.allowed, decision


def test_normalise_examples():
    assert normalise("ＨＥＬＬＯ   Wörld!") == "hello world"
    assert normalise("h3ll0 w0rld") == "hello world"
    assert normalise("b.a.d\u200bword") == "badword"
    assert normalise("саt") == "cat"  # Cyrillic с and а
    assert normalise("painted 4 times") == "painted 4 times"  # a lone digit among words is not leetspeak
    assert normalise("g o r 3") == "g o r e"  # ...but inside a spaced-out run it is


def test_spaced_letters_and_multiword_terms():
    assert not FILTER.check("s e x").allowed
    assert FILTER.check("s e x").category == "sexual"
    assert not FILTER.check("school   shooting").allowed
    assert not FILTER.check("childporn").allowed
    assert FILTER.check("a school bus").allowed
    # Repeat collapsing must not make "xxx" match "sex" or vice versa.
    assert FILTER.check("a fox box").allowed
    assert FILTER.check("f u c k").category == "profanity"  # not "kkk" collapsed to "k"
    assert FILTER.check("x marks the spot on a k").allowed
    assert not FILTER.check("XXX poster").allowed


def test_guild_block_and_allow_lists():
    assert not FILTER.check("a poster of moby dick").allowed
    assert FILTER.check("a poster of moby dick", GuildPolicy(allow=["moby dick"])).allowed
    # allow-listing a phrase does not allow the word elsewhere
    assert not FILTER.check("moby dick and a dick", GuildPolicy(allow=["moby dick"])).allowed
    d = FILTER.check("a picture of a clown", GuildPolicy(block=["clown*"]))
    assert not d.allowed and d.category == "guild" and d.matched == "clown*"
    assert not FILTER.check("many c.l.o.w.n.s", GuildPolicy(block=["clown*"])).allowed


def test_invalid_prompts():
    assert FILTER.check("   ").category == "invalid"
    assert FILTER.check("x" * 1001).category == "invalid"
    assert FILTER.check("!!! ???").category == "invalid"


def test_blocklist_parse_errors():
    with pytest.raises(ValueError, match="line 1"):
        load_blocklist(["no tab here"])
    assert len(default_blocklist()) > 40


def test_classifier_catches_abuse_without_listed_words():
    for text in ["you are a worthless pathetic idiot", "i will hurt you and your family",
                 "those people are vermin and deserve to die"]:
        d = FILTER.check(text)
        assert not d.allowed and d.category == "abuse", (text, d)
        assert d.score >= FILTER.threshold


def test_classifier_generalises_to_held_out_examples():
    # None of these lines is in bot/assets/abuse_train.tsv.
    held_out = [
        (1, "you filthy worthless scum i hope you suffer"),
        (1, "i am going to hurt your whole family"),
        (1, "nobody loves you, pathetic ugly loser"),
        (1, "they are vermin, wipe them out"),
        (0, "a yellow duck floating in a bathtub"),
        (0, "a castle on a hill under a full moon"),
        (0, "a painting of a family of ducks"),
        (0, "a blue whale jumping out of the ocean"),
    ]
    clf = FILTER.classifier
    scores = [(label, clf.score(text)) for label, text in held_out]
    pos = [s for lab, s in scores if lab == 1]
    neg = [s for lab, s in scores if lab == 0]
    assert min(pos) > max(neg), scores
    assert sum(s >= 0.5 for s in pos) >= 3 and all(s < 0.5 for s in neg), scores


def test_classifier_training_is_deterministic_and_learns():
    texts, labels = read_labelled(["1\tyou idiot", "1\tstupid idiot", "0\ta red ball", "0\ta blue ball"])
    a = AbuseClassifier.train(texts, labels, dim=256, epochs=200)
    b = AbuseClassifier.train(texts, labels, dim=256, epochs=200)
    assert (a.weights == b.weights).all()
    assert a.score("idiot") > 0.5 > a.score("a green ball")
    with pytest.raises(ValueError):
        read_labelled(["2\tbad label"])
