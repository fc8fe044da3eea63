"""RULER-style needle-in-a-haystack (niah_single and niah_multikey), in RULER's prompt and needle wording.

The haystack is prose from the corpus (RULER uses essays); keys are adjective-noun words, values 7-digit numbers,
as in RULER's `niah` config with `type_needle_k: words, type_needle_v: numbers`. Scored by string_match_all.
"""

from __future__ import annotations

import random
import re

from pdllm.prompt import QUESTION_TEMPLATE
from pdllm.tasks.haystack import fill, insert_needles, prose_sentences
from pdllm.tasks.sample import Sample, TokenCounter, needle_depth

PREFIX = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards."
)
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = "What are all the special magic numbers for {key} mentioned in the provided text?"
ADJECTIVES = (
    "abundant adorable agreeable alive ancient angry bashful beautiful bewildered black bloody blue blushing bored "
    "brave breezy bright broad bumpy calm careful chilly chubby clean clever cloudy clumsy colossal cool crooked "
    "cuddly curly damaged damp dazzling delightful dirty drab dusty eager early elegant embarrassed empty faint "
    "faithful famous fancy fierce filthy flaky fluffy freezing fresh gentle gifted gigantic glamorous gleaming "
    "glorious graceful greasy grumpy handsome happy harsh healthy helpful hollow huge hungry icy immense itchy "
    "jealous jolly juicy kind large lazy little lively loud lucky magnificent melodic messy mighty miniature modern "
    "muddy mysterious narrow nervous nutty obedient odd old orange panicky petite plain polite powerful prickly "
    "proud puny purple quaint quick quiet rainy rapid red relieved rich round rough salty scary scrawny shallow "
    "shiny short silly skinny sleepy slimy slow small smooth soft sparkling spicy square steep sticky stormy "
    "straight strong sweet swift tall tame tangy tender thankful thirsty tiny tricky ugly uneven upset vast "
    "victorious warm weak wet whispering wide witty wooden worried yellow young zany zealous"
).split()
NOUNS = (
    "aardvark alligator alpaca anchor apple apricot armadillo badger bagel balloon banjo barometer beaver bicycle "
    "bison blanket blender bobcat buffalo butterfly cabbage cactus camel candle canoe caribou carrot castle catfish "
    "cheetah chestnut chimney cobra coconut comet compass cookie coyote crayon cricket crocodile cucumber dagger "
    "dolphin donkey dragon eagle eggplant elephant falcon ferret fiddle flamingo fountain gazelle gecko giraffe "
    "goblet gopher gorilla guitar hammer hamster harbor harp hedgehog heron hippo hornet iguana jackal jaguar "
    "kangaroo kettle kiwi koala ladder lantern lemur leopard lizard llama lobster magnet mango marmot meadow "
    "meerkat mongoose moose mosquito narwhal nectarine octopus opossum orchid ostrich otter owl panther parrot "
    "peacock pelican penguin pepper pigeon piano pumpkin python quail rabbit raccoon radish raven rhino saddle "
    "salmon scorpion seal shovel skunk sloth snail sparrow spider squirrel stallion starfish stork swan teapot "
    "termite tiger toucan trombone trumpet tulip turkey turnip turtle umbrella vulture wallaby walrus weasel "
    "whale wombat yak zebra"
).split()


def _key(rng: random.Random, taken: set[str]) -> str:
    while True:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if key not in taken:
            taken.add(key)
            return key


def niah(
    length: int,
    seed: int,
    count: TokenCounter,
    depth: float | None = None,
    num_keys: int = 1,
    split: str = "heldout",
    task: str = "niah_single",
) -> Sample:
    """`num_keys` needles with distinct keys at random depths; the queried one sits at `depth`."""
    rng = random.Random(f"{task}:{length}:{seed}")
    taken: set[str] = set()
    keys = [_key(rng, taken) for _ in range(num_keys)]
    values = [str(rng.randrange(1_000_000, 10_000_000)) for _ in keys]
    depth = needle_depth(rng, depth)
    depths = [depth] + [rng.random() for _ in keys[1:]]
    needles = [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values, strict=True)]
    question = QUESTION.format(key=keys[0])
    fixed = (
        1
        + count(QUESTION_TEMPLATE.format(question=question))
        + count(PREFIX + "\n")
        + sum(count(n + " ") for n in needles)
    )
    units = fill(prose_sentences(rng, split), length - fixed, count)
    context = " ".join(insert_needles(units, list(zip(depths, needles, strict=True))))
    meta = {"keys": num_keys}
    return Sample(task, context, question, (values[0],), " " + values[0], depth, length, meta, PREFIX + "\n")


def niah_single(length: int, seed: int, count: TokenCounter, depth: float | None = None, split: str = "heldout"):
    return niah(length, seed, count, depth, 1, split, "niah_single")


def niah_multikey(
    length: int, seed: int, count: TokenCounter, depth: float | None = None, split: str = "heldout", keys: int = 4
):
    """RULER's 4 keys; training may ask for fewer (a lookup among 2-3 needles on the way to 4)."""
    return niah(length, seed, count, depth, keys, split, "niah_multikey")


NEEDLE_PATTERN = re.compile(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d+)\.")


def niah_other_questions(sample: Sample) -> list[tuple[str, str]]:
    """(question, value) for every needle of a niah sample other than the one it asks about (see
    infinitebench.kv_other_questions)."""
    found = NEEDLE_PATTERN.findall(sample.context)
    return [(QUESTION.format(key=k), v) for k, v in found if v != sample.answers[0]]


NEEDLE_BYTES = re.compile(rb"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d+)\.")


def niah_key_spans(sample: Sample) -> list[tuple[int, int, int, int]]:
    """(key start, key end, value start, value end) byte offsets of every needle in a niah prompt."""
    return [(*m.span(1), *m.span(2)) for m in NEEDLE_BYTES.finditer(sample.prompt_text.encode())]
