"""Facts in free wording: needles and questions built from combinatorial templates, values of several kinds.

A fact is (subject, value), e.g. ("vault code", "4471-KESTREL"). Its needle sentence is an opener, a core template and
a closer; its question is one of the question templates of the same split. The `train` split is what training reads;
the `heldout` split holds whole paraphrase families (needle cores and questions) that training never sees, so an
evaluation on it measures whether the model finds a fact in a wording it was not taught. Subjects and value kinds
are shared: the held-out part is the wording. Every document holds one queried fact and 1-4 distractor facts about
other subjects, in prose or in the InfiniteBench noise. Scored like kv_retrieval: the value must appear as a whole
word of the answer after punctuation (but not dashes) is blanked.
"""

from __future__ import annotations

import itertools
import random
import re
import string
import uuid

from pdllm.prompt import QUESTION_TEMPLATE
from pdllm.tasks.haystack import fill, insert_needles, noise_sentences, prose_sentences
from pdllm.tasks.sample import Sample, TokenCounter, needle_depth

SUBJECTS = (
    "pass key", "vault code", "access code", "door code", "secret code", "ticket number", "order number",
    "locker combination", "serial number", "reference code", "account number", "room number", "flight code",
    "tracking number", "membership id", "voucher code", "badge number", "project code", "safe combination",
    "gate code", "parcel id", "booking reference", "licence key", "alarm code", "invoice number", "batch code",
    "wifi password", "server name", "meeting room", "code word", "station id", "cabinet key", "archive label",
    "shipment code", "control number", "recovery phrase", "unlock code", "file number", "desk number", "lab code",
)  # fmt: skip

OPENERS = ("", "Note: ", "Remember this: ", "For the record, ", "Important: ", "Keep in mind that ", "By the way, ")
TRAIN_CORES = (
    "the {s} is {v}.",
    "the {s} is {v}, not anything else.",
    "the {s} was set to {v}.",
    "the {s} has been changed to {v}.",
    "the current {s} reads {v}.",
    "we use {v} as the {s}.",
    "{v} is the {s}.",
    "the {s} you will need is {v}.",
    "the official {s} is {v}.",
    "the {s}, written on the label, is {v}.",
    "our {s} equals {v}.",
    "the new {s} is now {v}.",
)
TRAIN_COLON = ("The {s}: {v}.", "{S} = {v}.", "{S} - {v}.", "[{s}] {v}")  # list-like needles (no opener)
CLOSERS = ("", " Remember it.", " Do not forget it.", " Keep it safe.", " {v} is the {s}.", " Write it down.")
TRAIN_QUESTIONS = (
    "What is the {s}?",
    "What is the {s} mentioned in the text?",
    "Which {s} does the text give?",
    "Tell me the {s}.",
    "What was the {s}?",
    "What {s} was written in the document?",
    "Give the {s}.",
    "Find the {s} in the text. What is it?",
    "What is the value of the {s}?",
    "Recall the {s}.",
)
# Held-out paraphrase families: no sentence built from these is ever produced for the train split.
HELDOUT_CORES = (
    "whoever asks for the {s} should be told {v}.",
    "the {s} we agreed on yesterday was {v}.",
    "if anyone needs the {s}, it happens to be {v}.",
    "my notebook lists {v} under the {s}.",
    "they finally settled the {s} as {v}.",
)
HELDOUT_QUESTIONS = (
    "Could you look up the {s} for me?",
    "I forgot the {s}. Which one was it?",
    "According to the notes, the {s} is what?",
    "Which value was agreed on for the {s}?",
)
# The `varied` wording (training only): needles and questions built from a grammar of parts, so a row's wording is
# one of thousands and the model learns to bind a value to the subject named near it, in either order and across
# other words, rather than a dozen sentences. None of its parts is a held-out phrase (tests/test_facts.py checks the
# sentences it makes against the held-out families), and a share of its rows keep the `train` templates.
VARIED_RELATIONS = (
    "is", "was", "reads", "is listed as", "is recorded as", "comes out as", "is given as", "is marked as",
    "is stored as", "remains", "is currently", "was changed to", "is set to", "turned out to be", "became",
    "has the value", "is exactly", "was reset to", "is printed as", "is still",
)  # fmt: skip
VARIED_MODIFIERS = (
    "", " for the office", " for this week", " on the form", " in the system", " of the north wing", " for guests",
    " in use today", " on file", " for the trip", " that the team uses", " printed on the card",
)  # fmt: skip
VARIED_SOURCES = (
    "Maria wrote that", "the memo says", "the manager confirmed that", "the clerk noted that", "someone mentioned that",
    "the email states that", "Dr. Lee explained that", "the report shows that", "our admin said that",
    "the sign on the door says", "a colleague pointed out that", "the latest update says",
)  # fmt: skip
VARIED_VALUE_FIRST = (
    "{v} is what the {s} is", "{v} serves as the {s}", "{v} was picked as the {s}", "{v} has been assigned to the {s}",
    "{v} is the {s} to use", "{v} -- that is the {s}", "{v} works as the {s}", "{v} was chosen for the {s}",
)  # fmt: skip
VARIED_CLOSERS = ("", " Use it when asked.", " It was checked twice.", " Nothing else applies.", " Please note it.")
VARIED_QUESTIONS = (
    "What is the {s}?", "What's the {s}?", "Please tell me the {s}.", "Do you know the {s}?", "Name the {s}.",
    "What does the text say the {s} is?", "Can you find the {s}?", "The {s} is what value?", "Remind me of the {s}.",
    "What did they write for the {s}?", "Which value is the {s}?", "Report the {s}.", "Which {s} is given?",
    "What was recorded as the {s}?", "Look for the {s}: what is it?", "Say the {s}.",
)  # fmt: skip
VARIED_LEADS = ("", "Quick question: ", "Please help. ", "One more thing: ", "Based on the text, ", "Hi! ", "Now: ")
# The `broad` wording (training only): the varied grammar, plus the orders it lacks, each built from parts: the
# value inside the sentence with its subject after it (an agent, a verb, the value, a link to the subject), the
# subject held apart from its value by an aside, and questions asked as a request. Held-out wordings were misread
# most in the first of these orders; a 6-minute run on them did not read those better (benchmarks/NOTES.md, "Faster
# training steps, prefill by length, broader wordings"). None of these parts is a held-out phrase
# (tests/test_facts.py).
BROAD_AGENTS = (
    "the memo", "Sam", "I", "the printout", "our records", "the front desk", "the log", "the old card", "this page",
    "Priya", "the handbook", "the sticky note",
)  # fmt: skip
BROAD_VERBS = (
    "gives", "shows", "has", "records", "names", "keeps", "wrote down", "mentions", "puts", "noted", "prints",
    "spells out",
)  # fmt: skip
BROAD_LINKS = (
    "as the {s}", "for the {s}", "as the current {s}", "next to the {s}", "as the value of the {s}", "beside the {s}",
    "against the {s}", "as our {s}",
)  # fmt: skip
BROAD_ASIDES = (
    "as far as I know", "to be precise", "if memory serves", "for what it is worth", "since Monday", "in short",
    "at least for now", "once more",
)  # fmt: skip
BROAD_REQUESTS = (
    "Would you check the {s}", "Help me find the {s}", "Can you recall the {s}", "Please dig up the {s}",
    "Go back and get the {s}", "Tell me quickly the {s}", "Search the notes for the {s}", "Hunt down the {s}",
)  # fmt: skip
BROAD_REQUEST_ENDS = ("?", ".", " -- what is it?", ". What does it say?", ", please.", " again?")
# The `open` wording (training only): broad, with the value-before-subject order built from open sets of parts. The
# bundle read a value before its subject only when "is" or "as" joined them ("{v} is under the {s}" 12 of 12 at 2K,
# "... {v} for the {s}" 8, "... {v} beside the {s}" 6): it had learned a few links, not that a value binds to the
# subject its sentence names (benchmarks/NOTES.md, "Held-out wordings: the link, not the order"). Here any of dozens
# of links joins them, after an agent's verb, after a verb of state, or fronted before the subject. No part holds a
# word of a held-out family that the trained templates lack, nor a synonym of "under" (tests/test_facts.py), so the
# held-out families still measure wordings never seen.
OPEN_AGENTS = BROAD_AGENTS + (
    "the clerk", "the binder", "the whiteboard", "Alex", "the spreadsheet", "the form", "our wiki", "the receipt",
    "the ledger", "the diary", "Jordan", "the label", "the briefing", "the phone", "the welcome letter", "the memo pad",
)  # fmt: skip
OPEN_VERBS = BROAD_VERBS + (
    "files", "stores", "enters", "logs", "marks", "holds", "writes", "sets", "tags", "places", "carries",
    "jotted down", "typed", "saved", "scribbled", "posted", "pinned", "copied", "registered", "filled in", "left",
    "quotes", "displays", "reports",
)  # fmt: skip
OPEN_STATES = (
    "sits", "goes", "stays", "was put", "is kept", "was filed", "is written", "appears", "was entered", "stands",
    "was logged", "shows up", "belongs", "is noted", "was typed", "is pinned", "was saved", "is printed",
)  # fmt: skip
OPEN_LINKS = (
    "as", "for", "next to", "beside", "against", "with", "near", "by", "on", "in", "at", "alongside", "opposite",
    "after", "above", "over", "behind", "inside", "within", "to", "into", "across from", "in the box for",
    "in the slot for", "on the line for", "in the row for", "in the field for", "as the value of", "in front of",
    "close to", "right after", "tied to", "linked to", "paired with", "filed with", "marked for", "attached to",
)  # fmt: skip
VALUE_KINDS = ("digits", "word", "code", "uuid")
WORDS = (
    "amber", "basalt", "cobalt", "dune", "ember", "falcon", "glacier", "harbor", "indigo", "juniper", "kestrel",
    "lantern", "meadow", "nebula", "orchid", "pepper", "quartz", "raven", "saffron", "tundra", "umber", "velvet",
    "willow", "zephyr", "anvil", "beacon", "cedar", "delta", "falcon", "garnet", "hazel", "ivory", "jasper",
    "lotus", "marble", "nectar", "onyx", "pewter", "quill", "ripple", "sable", "thistle", "valley", "walnut",
)  # fmt: skip
FACT_PREFIX = "Some facts are hidden in the following text. Read it carefully; I will ask about one of them."


def make_value(rng: random.Random, kind: str) -> str:
    """One value of `kind`: digits (4-10 of them), a word, a code of letters, digits and dashes, or a UUID."""
    if kind == "digits":
        n = rng.randint(4, 10)
        return str(rng.randrange(10 ** (n - 1), 10**n))
    if kind == "word":
        return rng.choice(WORDS)
    if kind == "code":
        shape = rng.randrange(4)
        up = string.ascii_uppercase
        if shape == 0:  # 4471-KESTREL
            return f"{rng.randrange(1000, 10000)}-{rng.choice(WORDS).upper()}"
        if shape == 1:  # QX-7741-B
            return f"{''.join(rng.choices(up, k=2))}-{rng.randrange(1000, 10000)}-{rng.choice(up)}"
        if shape == 2:  # K9F2-22A7
            alnum = up + string.digits
            return f"{''.join(rng.choices(alnum, k=4))}-{''.join(rng.choices(alnum, k=4))}"
        return f"{rng.choice(WORDS)}-{rng.randrange(10, 100)}"  # walnut-42
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown value kind {kind!r}; choose from {', '.join(VALUE_KINDS)}")


def _fill(template: str, subject: str, value: str) -> str:
    """The sentence, capitalized unless it opens with the value (a value is copied byte for byte: 'amber' must not
    become 'Amber', nor a UUID's first letter change)."""
    text = template.format(s=subject, S=subject[0].upper() + subject[1:], v=value)
    return text if template.startswith("{v}") else text[0].upper() + text[1:]


def varied_core(rng: random.Random) -> str:
    """One needle template of the `varied` grammar: subject first (with a modifier, maybe inside a source's clause) or
    value first."""
    if rng.random() < 0.25:
        return rng.choice(VARIED_VALUE_FIRST) + "." + rng.choice(VARIED_CLOSERS)
    core = "the {s}" + rng.choice(VARIED_MODIFIERS) + " " + rng.choice(VARIED_RELATIONS) + " {v}."
    if rng.random() < 0.4:
        core = rng.choice(VARIED_SOURCES) + " " + core
    return core + rng.choice(VARIED_CLOSERS)


def broad_core(rng: random.Random) -> str:
    """One needle template of the `broad` orders: the value inside the sentence before its subject, or the subject
    and its value apart, an aside between them."""
    if rng.random() < 0.7:
        agent, verb, link = rng.choice(BROAD_AGENTS), rng.choice(BROAD_VERBS), rng.choice(BROAD_LINKS)
        return f"{agent} {verb} {{v}} {link}{rng.choice(VARIED_MODIFIERS)}.{rng.choice(VARIED_CLOSERS)}"
    return f"the {{s}}, {rng.choice(BROAD_ASIDES)}, {rng.choice(VARIED_RELATIONS)} {{v}}.{rng.choice(VARIED_CLOSERS)}"


def open_core(rng: random.Random) -> str:
    """One needle template of the `open` order: the value before its subject, joined by any of OPEN_LINKS, after an
    agent's verb or a verb of state, or the link and subject fronted before the agent and the value."""
    link = f"{rng.choice(OPEN_LINKS)} the {{s}}{rng.choice(VARIED_MODIFIERS)}"
    closer, r = rng.choice(VARIED_CLOSERS), rng.random()
    if r < 0.5:
        return f"{rng.choice(OPEN_AGENTS)} {rng.choice(OPEN_VERBS)} {{v}} {link}.{closer}"
    if r < 0.75:
        return f"{{v}} {rng.choice(OPEN_STATES)} {link}.{closer}"
    return f"{link}, {rng.choice(OPEN_AGENTS)} {rng.choice(OPEN_VERBS)} {{v}}.{closer}"


def needle_text(rng: random.Random, subject: str, value: str, split: str) -> str:
    """A needle sentence for (subject, value) in the wording of `split`: `train` (the eval's trained templates),
    `varied` (training: the grammar above, or the train templates for a third of needles), `broad` (training: the
    broad orders for 40% of needles, else as varied), `open` (training: the open order for 40% of needles, else as
    broad) or `heldout`."""
    if split == "open" and rng.random() < 0.4:
        return _fill(rng.choice(OPENERS) + open_core(rng), subject, value)
    if split in ("broad", "open") and rng.random() < 0.4:
        return _fill(rng.choice(OPENERS) + broad_core(rng), subject, value)
    if split == "heldout":
        return _fill(rng.choice(OPENERS) + rng.choice(HELDOUT_CORES), subject, value)
    if split in ("varied", "broad", "open") and rng.random() < 2 / 3:
        return _fill(rng.choice(OPENERS) + varied_core(rng), subject, value)
    if rng.random() < 0.2:
        return _fill(rng.choice(TRAIN_COLON), subject, value)
    return _fill(rng.choice(OPENERS) + rng.choice(TRAIN_CORES) + rng.choice(CLOSERS), subject, value)


def question_text(rng: random.Random, subject: str, split: str) -> str:
    if split in ("broad", "open") and rng.random() < 0.3:
        return _fill(rng.choice(BROAD_REQUESTS) + rng.choice(BROAD_REQUEST_ENDS), subject, "")
    if split in ("varied", "broad", "open") and rng.random() < 2 / 3:
        return _fill(rng.choice(VARIED_LEADS) + rng.choice(VARIED_QUESTIONS), subject, "")
    return _fill(rng.choice(HELDOUT_QUESTIONS if split == "heldout" else TRAIN_QUESTIONS), subject, "")


def facts(
    length: int,
    seed: int,
    count: TokenCounter,
    depth: float | None = None,
    split: str = "heldout",
    wording: str = "train",
    kinds: tuple[str, ...] = VALUE_KINDS,
    task: str = "facts",
    haystack: str | None = None,
    note: bool = False,
) -> Sample:
    """One queried fact at `depth` plus 1-4 distractor facts, all worded from `wording`'s templates; `split` picks
    the prose. The value kind cycles through `kinds` with the seed, so n consecutive seeds cover every kind.
    `note` (training): a user's short note instead of a document, the needles alone in any order with up to two
    prose sentences, no preface, whatever `length` asks (a model that only ever read documents of hundreds of
    tokens misread "The vault code is 4471-KESTREL." asked alone)."""
    rng = random.Random(f"{task}:{length}:{seed}")
    kind = kinds[seed % len(kinds)]
    subjects = rng.sample(SUBJECTS, rng.randint(2, 5))
    values = [make_value(rng, kind)] + [make_value(rng, rng.choice(VALUE_KINDS)) for _ in subjects[1:]]
    while values[0] in values[1:]:
        values[0] = make_value(rng, kind)
    depth = needle_depth(rng, depth)
    depths = [depth] + [rng.random() for _ in subjects[1:]]
    needles = [needle_text(rng, s, v, wording) for s, v in zip(subjects, values, strict=True)]
    question = question_text(rng, subjects[0], wording)
    haystack = haystack or ("noise" if rng.random() < 0.2 else "prose")
    if note:  # 1-5 facts: a note may hold just the one asked about
        keep = rng.randint(1, len(subjects))
        subjects, values, depths, needles = subjects[:keep], values[:keep], depths[:keep], needles[:keep]
        units = list(itertools.islice(prose_sentences(rng, split), rng.randint(0, 2)))
        context = " ".join(insert_needles(units, list(zip(depths, needles, strict=True))))
    else:
        fixed = 1 + count(QUESTION_TEMPLATE.format(question=question)) + count(FACT_PREFIX + "\n\n")
        fixed += sum(count(n + " ") for n in needles)
        units = fill(noise_sentences() if haystack == "noise" else prose_sentences(rng, split), length - fixed, count)
        context = FACT_PREFIX + "\n\n" + " ".join(insert_needles(units, list(zip(depths, needles, strict=True))))
    meta = {
        "kind": kind,
        "subject": subjects[0],
        "needles": needles,
        "haystack": haystack,
        "facts": [[s, v] for s, v in zip(subjects, values, strict=True)],
        "wording": wording,
    }
    return Sample(task, context, question, (values[0],), " " + values[0], depth, length, meta)


def facts_other_questions(sample: Sample) -> list[tuple[str, str]]:
    """(question, value) for every distractor fact of a facts sample, asked in the sample's wording (see
    infinitebench.kv_other_questions): answers that differ only by the subject asked about."""
    rng = random.Random(sample.context)
    wording = sample.meta["wording"]
    return [(question_text(rng, s, wording), v) for s, v in sample.meta["facts"][1:]]


def facts_key_spans(sample: Sample) -> list[tuple[int, int, int, int]]:
    """(subject start, subject end, value start, value end) byte offsets in the prompt of every fact: the first
    mention of each in its needle (a closer may repeat both)."""
    text = sample.prompt_text.encode()
    spans = []
    for needle, (subject, value) in zip(sample.meta["needles"], sample.meta["facts"], strict=True):
        raw = needle.encode()
        at, s, v = text.find(raw), raw.lower().find(subject.encode()), raw.find(value.encode())
        if at >= 0 and s >= 0 and v >= 0:
            spans.append((at + s, at + s + len(subject), at + v, at + v + len(value.encode())))
    return spans


def heldout_wording(length: int, seed: int, count: TokenCounter, depth: float | None = None, split: str = "heldout"):
    """Evaluation: facts worded only with the held-out paraphrase families, values of every kind."""
    return facts(length, seed, count, depth, split, "heldout", VALUE_KINDS, "heldout_wording")


def value_kinds(length: int, seed: int, count: TokenCounter, depth: float | None = None, split: str = "heldout"):
    """Evaluation: facts in trained wordings whose values are words, codes and UUIDs (not digits)."""
    return facts(length, seed, count, depth, split, "train", ("word", "code", "uuid"), "value_kinds")


def template_pattern(template: str) -> re.Pattern:
    """A regex matching any sentence built from `template` (any subject, any value without spaces)."""
    subj = "|".join(re.escape(s) for s in SUBJECTS)
    parts = re.split(r"(\{s\}|\{S\}|\{v\})", template)
    out = []
    for p in parts:
        if p in ("{s}", "{S}"):
            out.append(f"(?:{subj})")
        elif p == "{v}":
            out.append(r"\S+?")
        else:
            out.append(re.escape(p))
    return re.compile("".join(out), re.IGNORECASE)
