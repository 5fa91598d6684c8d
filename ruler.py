"""RULER's synthetic tasks, generated offline in the model's own tokens, and RULER's scorer.

RULER (Hsieh et al., 2024) is the retrieval benchmark on which ShadowKV reports near-lossless accuracy
(PAPER.md "The problem"), and the one every neighbouring project reports. Its 13-task set is eight
needle-in-a-haystack variants (retrieval), variable tracking (multi-hop tracing), common-words and
frequent-words extraction (aggregation) and two QA tasks; the QA tasks need SQuAD and HotpotQA, which
cannot be fetched here, so this module builds the other eleven (PAPER.md "RULER"):

    samples = generate("niah_single_2", 2, 4096, tokenizer, seed=0, template_tokens=30)
    s = samples[0]   # problem (the user turn), answer_prefix, gold, values, needles, depths, ...
    score(prediction, s)                  # RULER's metric for the task (string_match_all), in [0, 1]
    ids, fields = fact_tokens(s, tokenizer)   # the gold values' tokens, for gold-forced decoding

Every task is built as RULER's generator builds it (the templates, answer prefixes, needle sentence,
haystacks, depths, key and value kinds and counts are RULER's), from our own code and our own seeded
word lists: RULER draws its words from the `wonderwords` package, which this project does not install.
The length is RULER's: the chat-formatted prompt, the answer prefix and the task's tokens to generate
together fit `target_tokens` of the evaluated model's tokens. The answer prefix ends the prompt (RULER
appends it after the chat template), so the model's first token is the answer's first.
"""

import random
import re
import string
import uuid
from pathlib import Path

from files import data_dir
from tasks import load_essays
from text2json import span_tokens

ESSAY_DIR = data_dir() / "needlebench"  # PaulGrahamEssays.jsonl: the essay haystack (a default only)

# ---------------------------------------------------------------------------------- RULER's facts
# The prompt templates, answer prefixes and tokens to generate of each kind of task, verbatim: they are
# what makes these prompts RULER's (PAPER.md "RULER"; RULER's scripts/data/synthetic/constants.py).
KINDS = {
    "niah": dict(
        template="Some special magic {type_needle_v} are hidden within the following text. Make sure to "
        "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the "
        "special magic {type_needle_v} for {query} mentioned in the provided text?",
        answer_prefix=" The special magic {type_needle_v} for {query} mentioned in the provided text are",
        tokens_to_generate=128,
    ),
    "vt": dict(
        template="Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.",
        answer_prefix=" Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
        "variables are assigned the value {query}, they are: ",
        tokens_to_generate=30,
    ),
    "cwe": dict(
        template="Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words "
        "in the above list?",
        answer_prefix=" Answer: The top 10 words that appear most often in the list are:",
        tokens_to_generate=120,
    ),
    "fwe": dict(
        template="Read the following coded text and track the frequency of each coded word. Find the three "
        "most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please "
        "ignore the dots '....'. What are the three most frequently appeared words in the above coded text?",
        answer_prefix=" Answer: According to the coded text above, the three most frequently appeared words "
        "are:",
        tokens_to_generate=50,
    ),
}
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."  # RULER's needle sentence
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


# RULER's 13-task set (its synthetic.yaml) less qa_1 and qa_2, in its order. NIAH: the haystack (noise:
# the NOISE line repeated; essay: Paul Graham essays; needle: other needles), the kinds of keys and
# values, and how many keys, values per key and queried keys.
def niah_spec(haystack, k, v, keys=1, values=1, queries=1):
    """A NIAH task's configuration (RULER's synthetic.yaml): haystack, key and value kinds, counts."""
    return dict(kind="niah", haystack=haystack, k=k, v=v, keys=keys, values=values, queries=queries)


TASKS = {
    "niah_single_1": niah_spec("noise", "words", "numbers"),
    "niah_single_2": niah_spec("essay", "words", "numbers"),
    "niah_single_3": niah_spec("essay", "words", "uuids"),
    "niah_multikey_1": niah_spec("essay", "words", "numbers", keys=4),
    "niah_multikey_2": niah_spec("needle", "words", "numbers"),
    "niah_multikey_3": niah_spec("needle", "uuids", "uuids"),
    "niah_multivalue": niah_spec("essay", "words", "numbers", values=4),
    "niah_multiquery": niah_spec("essay", "words", "numbers", keys=4, queries=4),
    "vt": dict(kind="vt", chains=1, hops=4),
    "cwe": dict(kind="cwe", freq_cw=30, freq_ucw=3, num_cw=10),
    "fwe": dict(kind="fwe", alpha=2.0),
}
# RULER's task categories (its paper): the aggregation tasks are the context-intensive end of RULER
GROUPS = {
    "retrieval": tuple(t for t in TASKS if t.startswith("niah")),
    "multi-hop tracing": ("vt",),
    "aggregation": ("cwe", "fwe"),
}
SINGLE_NEEDLE = ("niah_single_1", "niah_single_2", "niah_single_3")  # the retrieval claim's tasks
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER's needle depths: 40 points from 0 to 100%
CWE_SHORT = 4096  # below this length RULER's common-words task uses a shorter example and fewer repeats
VT_EXAMPLE_TOKENS = 500  # RULER's variable-tracking example is built to fit 500 tokens
FWE_WORD_LENGTH = 6  # letters of a coded word
ZETA_2 = 3.141592653589793**2 / 6  # zeta(2): the normaliser of RULER's Zipf counts (alpha 2.0)

# ---------------------------------------------------------------------------------- our word lists
# RULER takes words from the `wonderwords` package (keys: "adjective-noun"; common words: nouns,
# adjectives and verbs). These are our own lists of common English words, in place of its lists.
ADJECTIVES = """able absent active actual afraid agile alert alive amber ample ancient angry annual anxious
apparent arctic ashamed awake aware awful basic bitter blank bland blind blond bold bored brave brief
bright brisk broad broken brown busy calm candid careful casual cheap cheerful chief chilly civil clean
clear clever close cloudy clumsy coastal cold common complex concrete cool correct costly cozy crisp
crucial cruel curious curly cute damp daring dark dear decent deep dense direct dirty distant divine
dizzy dry dull dusty eager early earnest easy elastic elder electric elegant empty endless equal exact
exotic faint fair faithful false famous fancy fast fatal fierce final fine firm flat fluffy fond foreign
formal fragile frank free fresh friendly frosty funny fuzzy gentle genuine giant glad global gloomy
golden good graceful grand grateful greasy great green grim gross gusty handy happy hard harsh hasty
healthy heavy helpful hidden high hollow honest hot huge humble hungry icy idle immense innocent intense
ironic itchy jolly juicy keen kind large late lazy lean legal level light limp little lively local
lonely long loose loud lovely loyal lucky lunar major marine mature meager mellow merry mighty mild minor
misty modern modest moist moral muddy narrow nasty native neat nervous new nimble noble noisy normal nosy
numb obvious odd old orange ordinary pale patient peaceful perfect plain pleasant plump polite poor
precise pretty primary private proud pure purple quick quiet rapid rare raw ready real regular rich
rigid ripe rough round royal rude rural rusty sacred sad safe salty sandy scarce secret secure serene
sharp shiny short shy silent silky silly simple sincere slim slow small smart smooth snowy soft solar
solid sour spare spicy spotless square stable stale steady steep sticky stiff strange strict strong
sturdy subtle sudden sunny super sweet swift tall tame tart tender tense thick thin tidy tight tiny tough
tranquil tropical true twin ugly unique upset urban useful vacant vague valid vast vivid vocal warm weak
weary wet white wicked wide wild windy wise witty wooden young zealous""".split()
NOUNS = """acorn actor airport album anchor angle ankle apple apron arch arrow artist atlas attic autumn
avenue badge bakery ball balloon banana band banner barn basket beach beacon bean bear beard bell belt
bench berry bicycle bird blanket blossom boat bone book boot bottle boulder bowl branch bread breeze brick
bridge brook broom brush bucket bulb bundle butter button cabin cable cake camel camera candle canoe
canyon captain carpet carrot castle cat cave cedar cellar chair chalk cheese cherry chess chimney circle
city cliff clock cloud coast coat coffee coin comet compass cookie copper coral cotton cousin crab crane
crater crayon creek cricket crown crystal cup curtain cushion daisy dancer desert desk diamond dinner
doctor dolphin donkey door dragon drawer dream drum duck eagle earth echo engine envelope eraser falcon
farm feather fence fern ferry field finger flag flame flute forest fork fountain fox frog garden garlic
gate gem ghost giraffe glacier glass glove goat goose grape grass guitar hammer harbor harp hat hawk
helmet hill honey horse hotel house island ivory jacket jar jelly jewel jungle kettle key kitten kite
ladder lake lamp lantern lemon letter library lion lizard lobster locket lotus magnet mango maple marble
market meadow melon mirror monkey moon moose mountain mouse museum needle nest night notebook oak ocean
olive onion orchard otter owl oyster paddle palace panda paper parrot peach pearl pebble pencil pepper
piano pigeon pillow pilot pine planet plum pocket pond poppy potato puppy puzzle quilt rabbit radio
rainbow raven ribbon river robin rocket rose saddle sailor salmon sand scarf school shadow shark shell
ship shoe shovel silver singer skate sky sled snail snake sparrow spider spoon squirrel statue stone
storm stove stream street sugar summit sunset swan sword table teacher temple tent thunder tiger toast
tomato tower tractor trail train tree trumpet tulip tunnel turtle umbrella valley vase violin wagon
walnut whale wheel whistle willow window winter wizard wolf yacht zebra""".split()
VERBS = """accept admire advise agree allow answer appear arrange arrive ask attach attend bake bathe beg
behave belong blink boil borrow bounce breathe build bury calculate carry catch celebrate change chase
cheer chew clap climb collect comb compare complain count cover crawl cross dance decide deliver depend
describe destroy dig discover divide drag draw dress drift drink drive drop earn enjoy enter escape
explain explore fasten fetch fill find fix float flow fold follow forgive gather glow grab greet grow
guard guess guide hang happen help hike hop hug hunt hurry imagine improve invent invite join juggle jump
kick kneel knit knock laugh learn lift listen live look march marry measure melt mend mix move nod notice
obey offer open order paint pause pedal pick plant play polish pour practice pray preach prepare press
print promise protect pull pump punch push question race rain reach read relax remember repair repeat
reply rescue rest return ride ring rinse roll rub run rush sail scatter scream search settle shake share
shine shiver shout sing sink sip skip sleep slide smile sneeze snore sort spell spill splash spray
squeeze stamp stare start stay steer step stir stitch stretch study swim swing talk taste teach tease
thank throw tickle touch trace travel trot trust try tug turn twist type vanish visit wait walk wander
want warn wash watch wave weave whisper wink wish wobble wonder work worry wrap write yawn yell""".split()
COMMON_WORDS = sorted(set(NOUNS + ADJECTIVES + VERBS))  # common-words extraction draws from these


# ---------------------------------------------------------------------------------- task names
def task_names(spec):
    """The RULER tasks of a --task value: "ruler" (all eleven, in RULER's order) or "ruler:NAME[,NAME...]";
    an unknown name is a one-line ValueError that lists the names."""
    if spec == "ruler":
        return list(TASKS)
    if not spec.startswith("ruler:") or not spec[6:]:
        raise ValueError(f"bad task {spec!r}: write ruler, or ruler:NAME[,NAME...]")
    names = [n.strip() for n in spec[6:].split(",")]
    for n in names:
        if n not in TASKS:
            raise ValueError(f"unknown RULER task {n!r}: choose from {', '.join(TASKS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{spec!r} names a RULER task twice")
    return names


def is_spec(task):
    """Whether a --task value names RULER tasks (the names themselves are checked by task_names)."""
    return isinstance(task, str) and (task == "ruler" or task.startswith("ruler:"))


def sample_id(task, i):
    """A generated sample's id: its task and its index, `niah_single_2/0`."""
    return f"{task}/{i}"


def subtask(sample):
    """The RULER task of a sample id (`sample_id`): the part before its last '/'."""
    return sample.rpartition("/")[0]


def is_sample_id(sample, spec):
    """Whether `sample` is the id of a generated sample of the RULER tasks `spec` (any index)."""
    task, _, index = sample.rpartition("/")
    return task in task_names(spec) and re.fullmatch(r"0|[1-9][0-9]*", index) is not None


def needs_essays(spec):
    """Whether any task of `spec` has the essay haystack (then the essays must be at hand)."""
    return any(TASKS[t].get("haystack") == "essay" for t in task_names(spec))


# ---------------------------------------------------------------------------------- random draws
def _number(rng):
    return str(rng.randint(10**6, 10**7 - 1))  # RULER's values: 7-digit numbers


def _uuid(rng):
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _key_word(rng):
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"  # RULER's keys: adjective-noun


DRAW = {"numbers": _number, "uuids": _uuid, "words": _key_word}


def _distinct(draw, rng, used, n):
    """n new draws, none in `used` (which gets them): keys and values never repeat within a sample."""
    out = []
    while len(out) < n:
        x = draw(rng)
        if x not in used:
            used.add(x)
            out.append(x)
    return out


def _answer(values, layout):
    """(the gold answer text after the answer prefix, the (start, end) characters of each value).
    layout "list": " v1, v2." (NIAH, frequent words); "numbered": " 1. w1 2. w2" (common words, as
    RULER's example answers it); "spaced": " V1 V2" (variable tracking, as its example answers it)."""
    text, spans = "", []
    for j, v in enumerate(values):
        text += {"list": ", " if j else " ", "numbered": f" {j + 1}. ", "spaced": " "}[layout]
        spans.append((len(text), len(text) + len(v)))
        text += v
    return text + ("." if layout == "list" else ""), spans


def _sentences(text):
    """Sentences of a text, split after . ! or ? and whitespace (RULER uses nltk's sent_tokenize,
    which this project does not install)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def _essay_words(essays):
    """The essays as one list of words (RULER's essay haystack: all whitespace made single spaces)."""
    return " ".join(essays).split()


# ---------------------------------------------------------------------------------- the builders
# Each builder makes one sample's text at a haystack `size` from a fresh generator seeded by the sample,
# so every size draws the same keys and values: the length search below changes only the haystack.


def _niah(spec, size, rng, essay):
    draw_k, draw_v = DRAW[spec["k"]], DRAW[spec["v"]]
    used = set()
    n_keys = max(spec["keys"], spec["queries"])  # RULER: at least as many keys as queries
    keys = _distinct(draw_k, rng, used, n_keys)
    values = [_distinct(draw_v, rng, used, spec["values"]) for _ in keys]
    needles = [
        (NEEDLE.format(type_needle_v=spec["v"], key=k, value=v), k, v)
        for k, vs in zip(keys, values)
        for v in vs
    ]
    rng.shuffle(needles)
    queried = rng.sample(range(n_keys), spec["queries"])
    if spec["haystack"] == "essay":
        context, placed, n_units = _place_in_essay(essay, size, [n[0] for n in needles], rng)
    else:
        if spec["haystack"] == "noise":
            lines = [NOISE] * size
        else:  # the haystack is other needles, with keys and values of the same kinds, all new
            ks, vs = _distinct(draw_k, rng, used, size), _distinct(draw_v, rng, used, size)
            lines = [NEEDLE.format(type_needle_v=spec["v"], key=k, value=v) for k, v in zip(ks, vs)]
        context, placed = _place_in_lines(lines, [n[0] for n in needles], rng)
        n_units = size
    template, prefix, kind = KINDS["niah"]["template"], KINDS["niah"]["answer_prefix"], spec["v"]
    if spec["queries"] * spec["values"] == 1:  # RULER's singular wording for a single answer
        template, prefix, kind = _singular(template), _singular(prefix), kind[:-1]
    keys_asked = [keys[i] for i in queried]
    query = keys_asked[0] if len(keys_asked) == 1 else ", ".join(keys_asked[:-1]) + ", and " + keys_asked[-1]
    problem = template.format(type_needle_v=kind, context=context, query=query)
    # the gold: each asked key's values in the order the text gives them (the needles are shuffled)
    where = {v: (at, j) for j, ((_, _, v), (_, at)) in enumerate(zip(needles, placed))}
    gold_values = [v for i in queried for v in sorted(values[i], key=where.get)]
    depth_of = {v: d for (_, _, v), (d, _) in zip(needles, placed)}
    return dict(
        problem=problem,
        answer_prefix=prefix.format(type_needle_v=kind, query=query),
        values=gold_values,
        layout="list",
        depths=[depth_of[v] for v in gold_values],
        needles=[
            dict(text=n[0], key=n[1], value=n[2], depth=d, at=at) for n, (d, at) in zip(needles, placed)
        ],
        haystack_units=size,
        n_units=n_units,
    )


def _singular(text):
    """RULER's template for a single answer: 'Some ... are' becomes 'A ... is' (its own replacements)."""
    return (
        text.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")
    )


def _place_in_essay(words, size, needles, rng):
    """RULER's essay haystack: the first `size` words of the essays (repeated if needed), cut into
    sentences; needle i goes before sentence int(n_sentences * depth_i / 100), the depths drawn without
    repetition from DEPTHS and sorted. Returns (context, [(depth, sentence index)], number of sentences)."""
    text = " ".join((words * (size // len(words) + 1))[:size])
    sents = _sentences(text)
    depths = sorted(rng.sample(DEPTHS, len(needles)))
    points = [int(len(sents) * d / 100) for d in depths]
    parts, last = [], 0
    for p, needle in zip(points, needles):
        parts += [" ".join(sents[last:p]), needle]
        last = p
    parts.append(" ".join(sents[last:]))
    context = " ".join(p for p in parts if p)
    return context, list(zip(depths, points)), len(sents)


def _place_in_lines(lines, needles, rng):
    """RULER's line haystacks (noise, needles): needle i is inserted before line index_i of the haystack,
    the indices drawn without repetition. Returns the lines joined by newlines and [(depth, line index)],
    depth = 100 * index / lines in percent."""
    n = len(lines)
    indices = rng.sample(range(n), len(needles))
    out = list(lines)
    for index, needle in sorted(zip(indices, needles), reverse=True):  # from the end: indices stay valid
        out.insert(index, needle)
    return "\n".join(out), [(100 * i / n, i) for i in indices]


def _vt_chain(rng, n_letters, hops, used):
    """One chain of RULER's variable tracking: n_letters-letter upper-case names, a 5-digit value, the
    lines 'VAR A = 12345', 'VAR B = VAR A ', ... (RULER's hop lines end with a space)."""
    names = _distinct(lambda r: "".join(r.choices(string.ascii_uppercase, k=n_letters)), rng, used, hops + 1)
    value = _distinct(lambda r: str(r.randint(10000, 99998)), rng, used, 1)[0]
    lines = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
    return names, value, lines


def _vt_text(lines, chain, rng):
    """The noise haystack with a chain's lines inserted in order at drawn lines. (context, [(depth, at)])."""
    n = len(lines)
    points = sorted(rng.sample(range(n), len(chain)))
    out = list(lines)
    for j, (p, line) in enumerate(zip(points, chain)):
        out.insert(p + j, line)
    return "\n".join(out), [(100 * p / n, p) for p in points]


def _vt(spec, size, rng, tokenizer):
    used = set()
    hops = spec["hops"]
    kind = KINDS["vt"]
    # the example RULER puts before the question: 3-letter names, its own value, noise fitting 500 tokens
    ex_names, ex_value, ex_chain = _vt_chain(rng, 3, hops, used)
    ex_seed = rng.getrandbits(64)

    def example(n_noise):
        context, _ = _vt_text([NOISE] * n_noise, ex_chain, random.Random(ex_seed))
        question = kind["template"].format(context=context, query=ex_value)
        prefix = kind["answer_prefix"].format(num_v=hops + 1, query=ex_value)
        return question + prefix + " " + " ".join(ex_names) + "\n"

    fits = _largest_fitting(example, lambda t: len(tokenizer.encode(t)), VT_EXAMPLE_TOKENS, hops + 1, True)
    shot = fits[1]
    names, value, chain = _vt_chain(rng, 5, hops, used)
    context, placed = _vt_text([NOISE] * size, chain, rng)
    return dict(
        problem=shot + "\n" + kind["template"].format(context=context, query=value),
        answer_prefix=kind["answer_prefix"].format(num_v=hops + 1, query=value),
        values=names,
        layout="spaced",
        depths=[d for d, _ in placed],
        needles=[
            dict(text=line, key=n, value=value, depth=d, at=at)
            for line, n, (d, at) in zip(chain, names, placed)
        ],
        haystack_units=size,
        n_units=size,
    )


def _cwe_words(n, rng):
    """n distinct words: our common words, shuffled, then adjective-noun pairs when more are needed
    (RULER falls back to a larger word list there)."""
    words = list(COMMON_WORDS)
    rng.shuffle(words)
    if n > len(words):
        more = [f"{a}-{b}" for a in ADJECTIVES for b in NOUNS]
        rng.shuffle(more)
        words += more
    if n > len(words):
        raise ValueError(
            f"common-words extraction needs {n} distinct words; the word lists hold {len(words)}"
        )
    return rng.sample(words, n)


def _cwe_list(n_words, cw_repeats, ucw_repeats, num_cw, rng):
    """RULER's numbered word list: the first num_cw words cw_repeats times each, the others ucw_repeats
    times, shuffled. Returns ('1. w 2. w ...', the common words)."""
    words = _cwe_words(n_words, rng)
    common, uncommon = words[:num_cw], words[num_cw:]
    listed = common * cw_repeats + uncommon * ucw_repeats
    rng.shuffle(listed)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), common


def _cwe(spec, size, rng, target_tokens):
    kind, num_cw = KINDS["cwe"], spec["num_cw"]
    short = target_tokens < CWE_SHORT  # RULER's settings below 4096 tokens
    shot_context, shot_answer = (
        _cwe_list(20, 3, 1, num_cw, rng) if short else _cwe_list(40, 10, 3, num_cw, rng)
    )
    repeats = (6, 1) if short else (spec["freq_cw"], spec["freq_ucw"])
    context, common = _cwe_list(size, *repeats, num_cw, rng)
    shot = (
        kind["template"].format(context=shot_context)
        + kind["answer_prefix"]
        + _answer(shot_answer, "numbered")[0]
    )
    return dict(
        problem=shot + "\n" + kind["template"].format(context=context),
        answer_prefix=kind["answer_prefix"],
        values=common,
        layout="numbered",
        depths=[None] * num_cw,
        needles=[],
        haystack_units=size,
        n_units=size,
    )


def _fwe(spec, size, rng, target_tokens):
    """RULER's frequent words: a vocabulary of (target - tokens to generate) // 50 random 6-letter words,
    the first made '...' (noise), word k repeated int(size * k^-alpha / zeta(alpha)) times, shuffled; the
    answer is words 2, 3 and 4 (the most frequent after the dots)."""
    if spec["alpha"] != 2.0:
        raise ValueError("frequent-words extraction is built with RULER's alpha 2.0 only")
    kind = KINDS["fwe"]
    n_vocab = max(4, (target_tokens - kind["tokens_to_generate"]) // 50)
    coded = lambda r: "".join(r.choices(string.ascii_lowercase, k=FWE_WORD_LENGTH))
    vocab = sorted(_distinct(coded, rng, set(), n_vocab))
    rng.shuffle(vocab)
    vocab[0] = "..."
    words = [w for k, w in enumerate(vocab, 1) for _ in range(int(size * k**-2.0 / ZETA_2))]
    rng.shuffle(words)
    return dict(
        problem=kind["template"].format(context=" ".join(words)),
        answer_prefix=kind["answer_prefix"],
        values=vocab[1:4],
        layout="list",
        depths=[None] * 3,
        needles=[],
        haystack_units=size,
        n_units=size,
    )


SMALLEST = {"niah": 4, "vt": 5, "cwe": 20, "fwe": 64}  # the smallest haystack size a builder takes


def _largest_fitting(build, count, budget, smallest, or_smallest=False):
    """(size, build(size)) for the largest haystack size whose count is within budget (a search that
    assumes the count grows with the size, as RULER's does). None fitting is a ValueError, or with
    or_smallest the smallest size (RULER's variable-tracking example then takes its smallest haystack)."""
    first = build(smallest)
    c0 = count(first)
    if c0 > budget and or_smallest:
        return smallest, first
    if c0 > budget:
        raise ValueError(f"{c0} tokens with the smallest haystack, {budget} allowed")
    probe = 2 * smallest + 8
    per = max((count(build(probe)) - c0) / (probe - smallest), 1e-3)  # tokens per haystack unit
    lo, hi = smallest, max(probe, smallest + int((budget - c0) / per * 1.2) + 1)
    while count(build(hi)) <= budget:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(build(mid)) <= budget else (lo, mid)
    return lo, build(lo)


def generate(task, n, target_tokens, tokenizer, seed=0, template_tokens=0, essay_dir=None):
    """`n` samples of the RULER task `task` (a name of TASKS), each as long as RULER makes it: its
    chat-formatted prompt (`template_tokens`: the tokens the chat format adds around the user turn),
    the answer prefix and the task's tokens to generate together take at most `target_tokens` of
    `tokenizer` (anything with encode(text) -> ids), with the largest haystack that fits.

    Sample i draws everything from random.Random(f"ruler/{task}/{seed}/{i}"): the same seed gives the
    same samples, and each sample's keys and values do not depend on its length. The essay haystack
    reads PaulGrahamEssays.jsonl from `essay_dir` (default: files.data_dir()/needlebench).

    Each sample: `id` (`sample_id`), `task`, `problem` (the user turn), `answer_prefix` (the start of
    the assistant's turn, part of the prompt), `gold` (the answer after the prefix, `_answer`), `values`
    (what RULER scores: the gold values, in the gold's order), `spans` (each value's characters in
    `gold`), `depths` (each value's depth in the haystack in percent, None for the word-counting tasks),
    `needles` (every inserted line: `text`, `key`, `value`, `depth`, `at` = the haystack sentence or
    line it precedes, `position` = its characters' start in `problem`), `haystack_units` (words of
    essay, lines, or distinct words of the list), `n_units` (the sentences or lines `at` counts),
    `n_tokens` (the counted length), `new_cap` (tokens to generate)."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}: choose from {', '.join(TASKS)}")
    spec = TASKS[task]
    kind = KINDS[spec["kind"]]
    essay = None
    if spec.get("haystack") == "essay":
        essay = _essay_words(load_essays(Path(essay_dir or ESSAY_DIR)))
    count = lambda s: (
        template_tokens
        + len(tokenizer.encode(s["problem"]))
        + len(tokenizer.encode(s["answer_prefix"]))
        + kind["tokens_to_generate"]
    )
    samples = []
    for i in range(n):
        state = random.Random(f"ruler/{task}/{seed}/{i}").getstate()

        def build(size):
            rng = random.Random()
            rng.setstate(state)
            if spec["kind"] == "niah":
                return _niah(spec, size, rng, essay)
            if spec["kind"] == "vt":
                return _vt(spec, size, rng, tokenizer)
            return (_cwe if spec["kind"] == "cwe" else _fwe)(spec, size, rng, target_tokens)

        try:
            _, s = _largest_fitting(build, count, target_tokens, SMALLEST[spec["kind"]])
        except ValueError as err:
            raise ValueError(
                f"--tokens {target_tokens} is too short for RULER's {task}: {err} (the chat format, "
                f"the answer prefix and {kind['tokens_to_generate']} tokens to generate included)"
            ) from None
        samples.append(_finish(task, i, s, count(s), kind["tokens_to_generate"]))
    return samples


def _finish(task, i, s, n_tokens, new_cap):
    """A built sample with its gold answer, value spans and needle positions (see `generate`)."""
    gold, spans = _answer(s["values"], s.pop("layout"))
    at = 0
    for nd in s["needles"]:  # in text order: each line is found after the one before
        at = s["problem"].find(nd["text"], at)
        nd["position"] = at
        at += 1
    return dict(
        id=sample_id(task, i), task=task, **s, gold=gold, spans=spans, n_tokens=n_tokens, new_cap=new_cap
    )


def generate_all(spec, n, target_tokens, tokenizer, seed=0, template_tokens=0, essay_dir=None):
    """`n` samples of every task of a --task value (`task_names`), task after task."""
    return [
        s
        for task in task_names(spec)
        for s in generate(task, n, target_tokens, tokenizer, seed, template_tokens, essay_dir)
    ]


# ---------------------------------------------------------------------------------- facts and scores
def fact_tokens(sample, tokenizer):
    """(ids of the gold answer, fields): per gold value, its characters in `gold` and the tokens that
    carry them (the tokenizer's offsets, as Text2JSON's fact tokens: text2json.span_tokens). Fields:
    `record` (the value's index), `key` (its task), `value`, `span`, `tokens`."""
    fields = [
        dict(record=j, key=sample["task"], value=v, span=tuple(span))
        for j, (v, span) in enumerate(zip(sample["values"], sample["spans"]))
    ]
    return span_tokens(tokenizer, sample["gold"], fields)


def postprocess(prediction):
    """A prediction as RULER's evaluator reads it: stripped, every control character (code below 32)
    made a newline, stripped again."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction, refs):
    """RULER's string_match_all for one sample: the share of the references found in the prediction,
    case-insensitive substrings (every gold value counts)."""
    pred = prediction.lower()
    return sum(r.lower() in pred for r in refs) / len(refs)


def string_match_part(prediction, refs):
    """RULER's string_match_part for one sample (its QA metric): 1 if any reference is in the prediction."""
    pred = prediction.lower()
    return float(any(r.lower() in pred for r in refs))


METRIC = {"niah": string_match_all, "vt": string_match_all, "cwe": string_match_all, "fwe": string_match_all}


def score(prediction, sample):
    """RULER's score of one answer (the text after the answer prefix) with its task's metric, in [0, 1];
    a None prediction (no answer) scores 0."""
    if prediction is not None and not isinstance(prediction, str):
        raise ValueError(f"a prediction must be a string (or None), not a {type(prediction).__name__}")
    if prediction is None:
        return 0.0
    return METRIC[TASKS[sample["task"]]["kind"]](postprocess(prediction), sample["values"])
