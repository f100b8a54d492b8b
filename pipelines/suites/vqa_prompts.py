"""Answer prompts for VQA questions: each candidate answer inside a declarative form of its question.

The paper embeds "What color is the bus?" + "red" as "the bus is red". These rules cover the common
VQA v2 question forms (see docs/metavqa.md); a user's JSON map question -> template overrides them.
"""
from __future__ import annotations

import json
import re

from .base import SuiteError

FALLBACK_TEMPLATE = "the answer is {}"

# The paper embeds each candidate answer inside a declarative form of its question:
# "What color is the bus?" -> "the bus is {}". These rules cover the common VQA v2 forms; see docs/metavqa.md.
BE = {"is", "are", "was", "were"}
PREPS = {"on", "in", "at", "with", "for", "of", "from", "under", "behind", "near", "to", "by", "into", "onto",
         "inside", "over", "above", "below", "beside", "through", "across", "around", "about", "against",
         "between", "like", "off", "out", "next", "atop", "underneath", "during"}
DETS = {"the", "a", "an", "this", "that", "these", "those", "his", "her", "their", "its", "my", "your", "our"}
POINTERS = {"this", "that", "it", "these", "those", "shown", "pictured", "here", "this one", "that one"}
NOT_ING = {"thing", "things", "something", "anything", "nothing", "everything", "building", "buildings",
           "ceiling", "clothing", "painting", "paintings", "morning", "evening", "icing", "awning", "bedding",
           "frosting", "topping", "toppings", "lighting", "railing", "stuffing", "pudding", "swing", "spring",
           "sibling", "wedding", "during", "being", "string", "wings", "sling", "bring", "ping", "king", "ring"}
PARTICIPLES = {"made", "built", "written", "worn", "drawn", "seen", "taken", "shown", "held", "kept", "hung",
               "shaped", "located", "parked", "covered", "filled", "painted", "used", "sold"}
DOES_VERBS = {"say", "have", "read", "spell", "mean", "represent", "eat", "hold", "wear", "like", "show", "look",
              "want", "use", "sell", "need", "play", "make", "do", "contain", "advertise", "indicate", "cost", "see"}
KIND_WORDS = r"kind|kinds|type|types|sort|breed|brand|make|style|flavor|flavour|model"


def _third_person(verb: str) -> str:
    if verb in ("have", "do", "go"):
        return {"have": "has", "do": "does", "go": "goes"}[verb]
    if verb.endswith(("s", "sh", "ch", "x", "z")):
        return verb + "es"
    if verb.endswith("y") and verb[-2:-1] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _has_noun(tokens: list[str]) -> bool:
    return any(t.lower() not in DETS for t in tokens)


def _ing_split(tokens: list[str]):
    """(subject, verb-ing, rest) for "the man holding in his hand"-like phrases, or None."""
    for i in range(1, len(tokens)):
        w = tokens[i].lower()
        if w.endswith("ing") and len(w) > 4 and w not in NOT_ING and _has_noun(tokens[:i]):
            return tokens[:i], tokens[i], tokens[i + 1:]
    return None


def _verb_phrase(subj: list[str], be: str, verb: str, rest: list[str], obj: list[str] = ()) -> str:
    """"<subj> <be> <verb> {} <rest>", or with a trailing preposition "<subj> <be> <verb> <rest> {}"."""
    slot = ["{}", *obj]
    if verb.lower() == "doing":  # "what is the man doing?" -> "the man is {}"
        parts = [*subj, be, *slot, *rest]
    elif rest and rest[-1].lower() in PREPS:
        parts = [*subj, be, verb, *rest, *slot]
    else:
        parts = [*subj, be, verb, *slot, *rest]
    return " ".join(p for p in parts if p)


def _participle_split(tokens: list[str]):
    """(subject, rest) where rest starts at a participle or preposition: "the table made of" -> (the table, made of)."""
    for i in range(1, len(tokens)):
        w = tokens[i].lower()
        if (w in PARTICIPLES or w in PREPS or (w.endswith("ed") and len(w) > 4)) and _has_noun(tokens[:i]):
            return tokens[:i], tokens[i:]
    return None


def _what_be(x: list[str], be: str) -> str:
    """"what is X?" -> a sentence about X with the answer slot."""
    ing = _ing_split(x)
    if ing:
        return _verb_phrase(ing[0], be, ing[1], ing[2])
    if x[0].lower() in PREPS or x[0].lower() == "being":  # "what is on the plate?" -> "{} is on the plate"
        return " ".join(["{}", be, *x])
    if x[-1].lower() in PREPS:  # "what is the table made of?" -> "the table is made of {}"
        part = _participle_split(x)
        if part:
            return " ".join([*part[0], be, *part[1], "{}"])
    return " ".join([*x, be, "{}"])


def _what_noun_be(noun: list[str], be: str, x: list[str]) -> str:
    """"what <noun> is X?" (what sport / room / animal / kind of dog ...) -> a sentence with the slot."""
    phrase = " ".join(x).lower()
    if phrase in POINTERS or phrase.startswith(("in the picture", "in the image", "in the photo")):
        return " ".join(["the", *noun, be, "{}"])  # "what room is this?" -> "the room is {}"
    ing = _ing_split(x)
    if ing:  # "what sport is the man playing?" -> "the man is playing {}"
        return _verb_phrase(ing[0], be, ing[1], ing[2])
    if x[0].lower() in DETS:  # "what number is the bus?" -> "the number of the bus is {}"
        return " ".join(["the", *noun, "of", *x, be, "{}"])
    return " ".join(["the", *noun, *x, be, "{}"])  # "what animal is on the bed?" -> "the animal on the bed is {}"


def _noun_answer(noun: list[str], be: str, x: list[str]) -> str:
    """The answer qualifies `noun`: in the verb phrase when x is an -ing clause, else "x be {} noun"."""
    ing = _ing_split(x)
    if ing:
        return _verb_phrase(ing[0], be, ing[1], ing[2], obj=noun)
    return _what_noun_be(noun, be, x)


def template_rule(question: str) -> tuple[str, str]:
    """(template, rule name) for a question; see answer_template."""
    q = " ".join(re.sub(r"[\s?]+$", "", question.strip()).split())
    low = q.lower()
    if len(low) != len(q):  # a few Unicode letters change length when lowercased; keep offsets aligned
        q = low

    def words(i: int) -> list[str]:  # the question's tokens from character offset i, original case
        return q[i:].split()

    m = re.fullmatch(r"what colou?rs? (is|are|was|were) (.+)", low)
    if m:
        x, be = words(m.start(2)), m.group(1)
        ing = _ing_split(x)
        return (_verb_phrase(ing[0], be, ing[1], ing[2]) if ing else " ".join([*x, be, "{}"])), "colour"
    m = re.fullmatch(r"what colou?r (\S+) (is|are|was|were) (.+)", low)
    if m and m.group(1) not in BE:
        # "what color shirt is the man wearing?" -> "the man is wearing {} shirt"
        return _noun_answer(words(m.start(1))[:1], m.group(2), words(m.start(3))), "colour"
    m = re.fullmatch(r"how many (.+?) (are|is|were|was) there(.*)", low)
    if m:
        x = words(m.start(1))[:len(m.group(1).split())]
        return " ".join(["there", m.group(2), "{}", *x, *words(m.start(3))]), "how_many"
    m = re.fullmatch(r"how many (.+?) (are|is|were|was|can|could|have|has|appear|seem)\b (.+)", low)
    if m:
        return " ".join(["{}", q[m.start(1):m.end(1)], q[m.start(2):]]), "how_many"
    m = re.fullmatch(r"how many (.+?) (do|does|did) (.+)", low)
    if m:
        rest = words(m.start(3))
        if m.group(2) == "does" and rest[-1].lower() == "have":
            rest[-1] = "has"
        return " ".join([*rest, "{}", q[m.start(1):m.end(1)]]), "how_many"
    m = re.fullmatch(r"how many (.+)", low)
    if m:
        return " ".join(["{}", *words(m.start(1))]), "how_many"
    m = re.fullmatch(rf"what (?:{KIND_WORDS}) of (.+?) (is|are|was|were) (.+)", low)
    if m:
        # "what kind of hat is the man wearing?" -> "the man is wearing {} hat"
        noun = words(m.start(1))[:len(m.group(1).split())]
        return _noun_answer(noun, m.group(2), words(m.start(3))), "kind_of"
    m = re.fullmatch(rf"what (?:{KIND_WORDS}) of (.+)", low)
    if m:
        return " ".join(["the", *words(m.start(1)), "is", "{}"]), "kind_of"
    m = re.fullmatch(r"where (is|are|was|were) (.+)", low)
    if m:
        x, be = words(m.start(2)), m.group(1)
        ing = _ing_split(x)
        if ing:  # "where is the man sitting?" -> "the man is sitting {}"
            return " ".join([*ing[0], be, ing[1], *ing[2], "{}"]), "where"
        part = _participle_split(x)
        if part and x[-1].lower() in PARTICIPLES | {"taken"}:  # "where was this picture taken?"
            return " ".join([*part[0], be, *part[1], "{}"]), "where"
        return " ".join([*x, be, "{}"]), "where"
    m = re.fullmatch(r"who (is|are|was|were) (.+)", low)
    if m:
        return " ".join(["{}", m.group(1), *words(m.start(2))]), "who"
    m = re.fullmatch(r"what (does|do) (.+)", low)
    if m:
        x = words(m.start(2))
        for i in range(1, len(x)):
            if x[i].lower() in DOES_VERBS and _has_noun(x[:i]):
                verb = _third_person(x[i].lower()) if m.group(1) == "does" else x[i]
                return _verb_phrase(x[:i], "", verb, x[i + 1:]), "what_does"
    m = re.fullmatch(r"what (is|are|was|were) (.+)", low)
    if m:
        return _what_be(words(m.start(2)), m.group(1)), "what_is"
    m = re.fullmatch(r"what (\S+) (is|are|was|were) (.+)", low)
    if m and m.group(1) not in BE:
        return _what_noun_be(words(m.start(1))[:1], m.group(2), words(m.start(3))), "what_noun"
    return FALLBACK_TEMPLATE, "fallback"


def answer_template(question: str) -> str:
    """A declarative template with one "{}" for the answer: "What color is the bus?" -> "the bus is {}"."""
    template, _ = template_rule(question)
    # A question that itself contains braces could yield a template with more than one slot.
    return template if template.count("{}") == 1 and template.strip() != "{}" else FALLBACK_TEMPLATE


def check_template(question: str, template) -> str:
    """Validate a prompt override: a string with exactly one "{}"."""
    if not isinstance(template, str) or template.count("{}") != 1:
        raise SuiteError(f"prompt template for question {question!r} must be a string with exactly one \"{{}}\" "
                         f"(where the answer goes), got {template!r}")
    return template


def load_prompt_overrides(path: str) -> dict[str, str]:
    """A JSON object question -> template (one "{}" each) that replaces the rule-based templates."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except OSError as e:
        raise SuiteError(f"prompts file {path}: cannot be read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SuiteError(f"prompts file {path}: invalid JSON ({e}); write a JSON object question -> template") from None
    if not isinstance(obj, dict):
        raise SuiteError(f"prompts file {path}: expected a JSON object question -> template, got {type(obj).__name__}")
    return {q: check_template(q, t) for q, t in obj.items()}
