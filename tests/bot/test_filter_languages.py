"""Prompt filter, round 4 (issue #29): the rules and lists read the same thing in all eight languages (a threat
against the reader's family, a verb of hurting with a reflexive, sex described in slang, Japanese profanity and
hidden characters, German compounds), the ordinary senses of listed words pass, and a prompt written with
look-alike letters reaches the encoder as its plain reading. Phrasings here are not the evaluation banks' rows."""

from __future__ import annotations

import pytest

from bot.filters import PromptFilter
from bot.promptfilter import lists
from bot.promptfilter import normalise as nz
from bot.promptfilter.train import encoder_inputs

LISTS_ONLY = PromptFilter(classifier=None)


@pytest.mark.parametrize("prompt", [
    "we know where your daughter takes ballet lessons", "i know exactly where your kids play after school",
    "ich weiß genau, wo deine Tochter wohnt", "je sais où habite ta famille", "sé dónde viven tus hijos",
    "so dove abita la tua famiglia", "sei onde mora sua família", "я знаю, где живёт твоя семья",
    "お前の家族がどこに住んでるか知ってる",
])
def test_a_threat_next_to_the_reader_s_family_is_abuse_in_every_language(prompt):
    d = LISTS_ONLY.check(prompt)
    assert not d.allowed and d.category == "abuse", d


@pytest.mark.parametrize("prompt", [
    "a photo of your family at the beach", "your kids will love this birthday cake",
    "I know where your keys are, a note on the fridge", "ein Foto deiner Familie am Strand",
    "une photo de ta famille au parc", "una foto de tus hijos jugando",
])
def test_the_reader_s_family_without_a_threat_passes_the_rule(prompt):
    assert LISTS_ONLY.check(prompt).allowed


@pytest.mark.parametrize("prompt", [
    "eine Frau ritzt sich selbst mit einer Klinge", "una chica se lastima a sí misma con una cuchilla",
    "una ragazza si ferisce se stessa con una lametta", "uma menina se machuca a si mesma",
    "девушка режет себя лезвием", "手首をナイフで切る少年", "自分を傷つける少女", "matarse con veneno",
    "uccidersi con le pillole", "se matar com remédios", "a teen swallowing a whole bottle of sleeping pills",
])
def test_a_verb_of_hurting_oneself_is_self_harm_in_every_language(prompt):
    d = LISTS_ONLY.check(prompt)
    assert not d.allowed and d.category == "self_harm", d


@pytest.mark.parametrize("prompt", [
    "two guys shagging in a barn", "sie vögeln auf dem Sofa", "un mec qui baise sa copine",
    "una pareja follándose en la playa", "um casal transando no carro", "парочка трахается в машине",
    "エッチしてるカップル", "eine Frau pudelnackt am Strand", "マ○コの写真",
])
def test_sex_described_in_slang_is_sexual_in_every_language(prompt):
    d = LISTS_ONLY.check(prompt)
    assert not d.allowed and d.category == "sexual", d


def test_japanese_profanity_and_a_hidden_character_are_read():
    for prompt in ["ちょっとクソみたいな絵", "うんこ野郎の落書き", "ちくしょう、と叫ぶ男"]:
        d = LISTS_ONLY.check(prompt)
        assert not d.allowed and d.category == "profanity", (prompt, d)
    assert lists.masked("チ○コ") == "チ○コ" and lists.masked("チンコ") is None
    assert LISTS_ONLY.check("ジャクソンのコンサート").allowed  # "クソ" inside a name


@pytest.mark.parametrize("prompt", [
    "a boob tube top in 1990s fashion", "eine nackte Buche im Winter", "nackte Äste vor grauem Himmel",
    "die Stadt Fucking in Österreich, Ortsschild", "une bite d'amarrage sur le quai", "une bande dessinée",
    "un baiser sur la joue, aquarelle", "una polla de agua en el lago", "matarse a trabajar, caricatura",
    "una scopa e paletta in cucina", "um pica-pau numa árvore", "голыми руками поймал рыбу", "голые деревья зимой",
    "ジャクソンのコンサート", "a gardener feeding branches into a wood chipper", "Popcorn poppt im Topf",
    "un gallo nel pollaio", "a girl cutting herself a slice of birthday cake", "un archer qui bande son arc",
    "a quarterback getting laid out by a tackle", "ils baisent la main de la reine", "cippatrice per rami in giardino",
    "an old photo of a hockey player with his teeth knocked out, smiling",
])
def test_listed_words_in_their_ordinary_senses_pass_the_lists_in_every_language(prompt):
    d = LISTS_ONLY.check(prompt)
    assert d.allowed, d


def test_a_leading_star_lets_a_german_compound_begin_earlier():
    term = lists.Term.parse("sexual", "*nackt*")
    assert term.literal == f"{lists.WILD}nackt{lists.WILD}" and term.prefix
    found = lists.TermSet((term,)).find("latin", "eine splitterfasernackte frau")
    assert [(s, e) for s, e, _ in found] == [(5, 24)]
    assert not lists.TermSet((term,)).find("latin", "ein nackenkissen")


def test_look_alike_letters_reach_the_encoder_as_the_plain_prompt():
    assert nz.latin_in_disguise("а ϲоuᴘle on а κiтсһᴇn table")  # Cyrillic look-alikes in an English prompt
    assert not nz.latin_in_disguise("соседка совсем голая на балконе")
    assert not nz.latin_in_disguise("coседка cовсем голенькая нa балконe")  # Latin look-alikes in Russian
    assert nz.delook("eiη Päʀᴄʜеɴ") == "ein Pärchen"
    inputs = encoder_inputs("ein Ölgemälde: eiη Päʀᴄʜеɴ bᴇιᴍ Vöɢeӏη")
    assert "ein ölgemälde: ein pärchen beim vögeln" in inputs
    assert encoder_inputs("ɑ ᴛеeո ꜱwaӏӏoԝing pills") == ["a teen swallowing pills"]  # "ӏ" drawn as an "l"
