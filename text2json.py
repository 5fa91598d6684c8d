"""Text2JSON: the paper's context-intensive benchmark (loader, exact scorer, offline generator).

The task (paper, "Benchmarks"): the prompt is a long text in which records are stated in
prose; the model must write them all out as a JSON list of objects with exactly three
string keys, one of them `name`. Unlike needle retrieval, the answer needs *many* facts
from all over the prompt, which is exactly where sparse KV selection breaks down.

    samples = load("text2json.jsonl")            # released set: {"problem", "answer", ...}
    s = score(prediction, sample["answer"])      # the paper's per-sample rule, in [0, 1]
    agg = aggregate(predictions, answers)        # {"score": 100 x mean, "n", "excluded", ...}
    r = field_recall(prediction, sample["answer"])   # lenient: share of gold triples written
    samples = generate(4, 2048, tokenizer, seed=0)   # offline stand-in for the released set

The released set (500 samples, 10K-63.5K tokens) is not shipped here; `generate` writes
samples in the same format, at any length, from four domains, so the phenomenon can be
shown with a tiny model and short prompts.
"""

import json
import os
import random

from files import read_jsonl

APOSTROPHE = "\u2019"  # the typographic apostrophe, normalised to ' before scoring


# ----------------------------------------------------------------------------- loading


def sample_id(row, index):
    """A sample's id, as a string: its `id` field, else its position in the file (0, 1, ...)."""
    return str(row.get("id", index))


def load(path):
    """Read the released JSONL: one JSON object per line with `problem` and `answer`.

    Other fields are kept. Every row is checked here, so a bad file fails before any model is
    loaded, with a one-line ValueError naming the file, the line and the sample id: a line that is
    not JSON, a `problem` that is not a non-empty string, an `answer` that is not a JSON string (the
    released format; a list written inline is refused) or that does not hold a valid gold list (see
    `gold_records`), two rows with the same id (`sample_id`), and a file with no rows at all.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Text2JSON file not found: {path} (pass the path to the released JSONL)")
    seen = {}

    def check(obj):
        index = len(seen)
        if not isinstance(obj, dict) or not {"problem", "answer"} <= obj.keys():
            return "expected an object with 'problem' and 'answer' fields"
        sid = sample_id(obj, index)
        if sid in seen:
            return f"duplicate sample id {sid!r} (also sample {seen[sid]}): give every row its own 'id'"
        seen[sid] = index
        if not isinstance(obj["problem"], str) or not obj["problem"].strip():
            return f"sample {sid!r}: 'problem' must be a non-empty string, not {obj['problem']!r:.40}"
        if not isinstance(obj["answer"], str):
            return (
                f"sample {sid!r}: 'answer' must be a JSON string holding the gold list (the released "
                f"format), not a {type(obj['answer']).__name__}"
            )
        try:
            gold_records(obj["answer"])
        except ValueError as e:
            return f"sample {sid!r}: {e}"
        return None

    rows = read_jsonl(path, check)
    if not rows:
        raise ValueError(f"{path} holds no samples (an empty Text2JSON file)")
    return rows


# ----------------------------------------------------------------------------- scoring


def _text(value):
    """A value as the string it is compared as: a string itself, anything else (number, boolean,
    null, list, object) its compact JSON text (1999 -> "1999", 1.5 -> "1.5", true -> "true"), with the
    typographic apostrophe made plain. Applied to *parsed* values, so an answer that writes the
    apostrophe as the JSON escape \\u2019 compares like one that writes the character."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text.replace(APOSTROPHE, "'")


def gold_records(gold):
    """The gold answer as a list of dicts, from the JSON string or the list itself; every record has a
    string `name` (typographic apostrophe made plain), the other values are kept as parsed.
    A gold that is not a list of such objects is a ValueError (None included)."""
    if gold is None:
        raise ValueError("gold answer is None: give the sample's JSON answer")
    if isinstance(gold, str):
        try:
            gold = json.loads(gold)
        except json.JSONDecodeError as e:
            raise ValueError(f"gold answer is not valid JSON ({e.msg})") from None
    if not isinstance(gold, list) or not all(
        isinstance(r, dict) and isinstance(r.get("name"), str) for r in gold
    ):
        raise ValueError("gold answer must be a JSON list of objects, each with a string 'name'")
    return [dict(r, name=_text(r["name"])) for r in gold]


def has_duplicate_names(gold):
    """True when two gold records share a name: such a sample cannot be keyed by name and
    is left out of the mean (paper's rule 1)."""
    names = [r["name"] for r in gold_records(gold)]
    return len(set(names)) != len(names)


def _check_prediction(prediction):
    if prediction is not None and not isinstance(prediction, str):
        raise ValueError(f"a prediction must be a string (or None), not a {type(prediction).__name__}")


def _parse_prediction(prediction):
    """The predicted list, or None when the paper's format rule fails (rule 2): exactly one
    `[` and one `]` in the raw text, `[` first, and the text between them (inclusive) parses as JSON."""
    if prediction is None or prediction.count("[") != 1 or prediction.count("]") != 1:
        return None
    start, end = prediction.index("["), prediction.index("]")
    if end < start:
        return None
    try:
        return json.loads(prediction[start : end + 1])
    except json.JSONDecodeError:
        return None


def score(prediction, gold):
    """The paper's per-sample Text2JSON score, in [0, 1] (PAPER.md, "Benchmarks", rules 1-5).

    Gold records are keyed by name. The prediction must hold exactly one `[`...`]` (found in the raw
    text) that parses as a JSON list, else 0. Each predicted item that is not an object, or whose
    `name` is missing, not a string or not among the gold names still unmatched, is an "extra": it
    adds 1 to the denominator and nothing to the sum. A matched object starts at 1, loses 0.5 per
    gold key that is missing or null and 0.25 per value whose text differs from the gold's; its gold
    record is then used up, so a repeated name is an extra. Score = sum / (gold records + extras).
    Keys the gold does not have are ignored.

    Compared texts (`_text`): the typographic apostrophe is made plain on the *parsed* name and
    values (PAPER.md, "Confirmed against the authors' code"), so `\\u2019` escapes score like the
    character; values that are not strings compare as their JSON text, so 1999 matches "1999", 1.5
    matches "1.5" (2.0 is "2.0", not "2"), true matches "true" (not "True"), an object compares as its
    JSON text (json.dumps: `{"k": 1}`), and a predicted list value puts a second `[` in the answer, so
    the format rule gives the whole answer 0. Items of the list that are not objects are extras.
    The paper's code crashes on such values; ours gives these defined results.
    Edge cases: an empty gold scores 1.0 for an empty list and 0 for any other answer (every object
    is an extra); a gold with duplicate names is scored with its first record per name (`aggregate`
    leaves such samples out, as the paper does); a None prediction (no answer) scores 0; a None or
    malformed gold is a ValueError.
    """
    _check_prediction(prediction)
    remaining = {}
    for r in gold_records(gold):
        remaining.setdefault(r["name"], r)
    n_gold = len(remaining)
    pred = _parse_prediction(prediction)
    if pred is None or not isinstance(pred, list):
        return 0.0
    total, extras = 0.0, 0
    for obj in pred:
        name = obj.get("name") if isinstance(obj, dict) else None
        name = _text(name) if isinstance(name, str) else None
        if name is None or name not in remaining:
            extras += 1
            continue
        record = remaining.pop(name)
        s = 1.0
        for key, gold_value in record.items():
            value = obj.get(key)
            if value is None:
                s -= 0.5
            elif key != "name" and _text(value) != _text(gold_value):
                s -= 0.25
        total += max(s, 0.0)  # never negative for 3-key records; guards odd gold files
    denom = n_gold + extras
    return total / denom if denom else 1.0  # empty gold and empty list: nothing to miss


def _objects(text):
    """Every complete JSON object in `text`, wherever it is: a list the model never closed,
    or objects scattered in prose, still yield the ones written in full."""
    decoder, out, i = json.JSONDecoder(), [], text.find("{")
    while i != -1:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
            continue
        if isinstance(obj, dict):
            out.append(obj)
        i = text.find("{", end)
    return out


def field_recall(prediction, gold):
    """Lenient companion to `score`: the share of gold (name, key, value) triples, `name`
    itself included, that some predicted object reproduces (same name, same value text, compared
    as in `score`). Tolerates a truncated or badly bracketed list, so a small model that runs out
    of tokens still gets credit for the records it wrote; never penalises extras. An empty gold
    gives 1.0 (nothing to miss); a None prediction 0."""
    _check_prediction(prediction)
    triples = {(r["name"], k, _text(v)) for r in gold_records(gold) for k, v in r.items()}
    if prediction is None:
        return 0.0
    if not triples:
        return 1.0
    written = set()
    for obj in _objects(prediction):
        name = obj.get("name")
        if isinstance(name, str):
            written.update((_text(name), k, _text(v)) for k, v in obj.items() if v is not None)
    return len(triples & written) / len(triples)


def aggregate(predictions, golds):
    """Benchmark numbers over a set of samples: `score` = 100 x mean per-sample score over
    the counted samples (golds with a duplicate name are excluded, paper's rule 1),
    `field_recall` = 100 x mean field recall over the same samples, `n` counted,
    `excluded` left out, `per_sample` the scores (None for excluded samples)."""
    if len(predictions) != len(golds):
        raise ValueError(f"got {len(predictions)} predictions for {len(golds)} gold answers")
    per_sample, scores, recalls = [], [], []
    for pred, gold in zip(predictions, golds):
        if has_duplicate_names(gold):
            per_sample.append(None)
            continue
        s = score(pred, gold)
        per_sample.append(s)
        scores.append(s)
        recalls.append(field_recall(pred, gold))
    n = len(scores)
    return {
        "score": 100.0 * sum(scores) / n if n else float("nan"),
        "field_recall": 100.0 * sum(recalls) / n if n else float("nan"),
        "n": n,
        "excluded": len(golds) - n,
        "per_sample": per_sample,
    }


# ---- fact tokens: which tokens of the gold answer carry a fact (evaluate.py's gold-forced decoding)


def answer_text(gold):
    """The gold answer as the model is asked to write it: the released format, one JSON list with one
    object per record, on one line, with json.dumps' default separators (", " and ": ", the spacing of
    the prompt's own example) and ensure_ascii=False (a model writes "é", not "\\u00e9"). A released
    answer string is re-serialised this way, so every sample's answer has the same layout."""
    return json.dumps(gold if isinstance(gold, list) else json.loads(gold), ensure_ascii=False)


def value_spans(gold):
    """(answer_text(gold), fields): fields is one dict per gold (record, key) with `record` (its index),
    `key`, `value` and `span` = the (start, end) characters of the value in the text: inside the quotes
    of a string value (the quotes, keys, commas and braces are not facts), the whole literal otherwise.

    The text is built piece by piece exactly as json.dumps writes it, so the spans need no search."""
    records = gold if isinstance(gold, list) else json.loads(gold)
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError("gold answer must be a JSON list of objects")
    text, fields = "[", []
    for n, record in enumerate(records):
        text += ", " * (n > 0) + "{"
        for j, (key, value) in enumerate(record.items()):
            text += ", " * (j > 0) + json.dumps(key, ensure_ascii=False) + ": "
            literal = json.dumps(value, ensure_ascii=False)
            quoted = isinstance(value, str)
            fields.append(
                dict(
                    record=n,
                    key=key,
                    value=value,
                    span=(len(text) + quoted, len(text) + len(literal) - quoted),
                )
            )
            text += literal
        text += "}"
    text += "]"
    assert text == answer_text(records)
    return text, fields


def fact_tokens(gold, tokenizer):
    """Token ids of answer_text(gold) and, per gold field, the indices of the tokens that carry it.

    A token carries a field when its character span (the tokenizer's offsets,
    `tokenizer.encode_offsets`) overlaps the field's value span; a token that also holds the opening
    quote still counts. Returns (ids, fields): fields as `value_spans`, plus `tokens` (a list of token
    indices, empty for an empty value)."""
    return span_tokens(tokenizer, *value_spans(gold))


def span_tokens(tokenizer, text, fields):
    """(ids of text, fields with `tokens`): each field's `span` (start, end characters) mapped to the
    indices of the tokens whose character spans (the tokenizer's offsets) overlap it. Every task's
    fact tokens go through here (Text2JSON, NeedleBench keywords, LongProc cells: tasks.py)."""
    ids, offsets = tokenizer.encode_offsets(text)
    for f in fields:
        start, end = f["span"]
        f["tokens"] = [t for t, (a, b) in enumerate(offsets) if a < end and b > start]
    return ids, fields


def record_depths(problem, gold):
    """Where each gold record sits in the prompt, in percent (0 = the start of the text, 100 = its
    end): the first mention of the record's name in `problem`, which in a generated sample is the
    record's own sentence (names are unique and none is part of another). None for a name that is
    not written in the prompt as it is in the answer."""
    records = gold if isinstance(gold, list) else json.loads(gold)
    depths = []
    for r in records:
        i = problem.find(str(r.get("name"))) if problem else -1
        depths.append(None if i < 0 else 100 * i / len(problem))
    return depths


# ----------------------------------------------------------------------------- generator
# Four domains like the released set's (product specs, professionals, organisations,
# movie metadata). Each record has three short string fields, `name` first. A record is
# stated in one sentence of prose; "mentions" name an entity of the same kind without its
# two fields, so they are *not* records and must not be extracted.

_FIRST = (
    "Anna Mark Lena Omar Priya Tomas Grace Victor Hana Diego Clara Felix Maya Ivan Nora "
    "Pablo Sofia Lucas Amara Jonas Elena Kofi Ingrid Rafael Yuki Marta Samuel Leila Hugo "
    "Zara Emil Rosa Dmitri Alma Bruno Nadia Oscar Irene Tariq Vera"
).split()
_LAST = (
    "Kowal Brandt Okafor Lindqvist Moreau Tanaka Alvarez Novak Haddad Petrov Sato Fischer "
    "Mensah Rossi Dubois Nakamura Jensen Castillo Varga Ibrahim Keller Laurent Horvat "
    "Silva Quinn Adeyemi Berg Costa Yilmaz Schultz Ortega Wojcik Farah Lund Mercer Ito "
    "Baptiste Novacek Rahman Dalton"
).split()
_CITIES = (
    "Lisbon Oslo Denver Nairobi Kyoto Porto Dublin Seville Krakow Montreal Austin "
    "Bergen Lyon Tampere Perth Valencia Graz Leeds Cork Bilbao Turin Ghent Malmo "
    "Quito Hobart Leipzig Geneva Tallinn Boise Halifax"
).split()
_PROFESSIONS = (
    "nurse;architect;carpenter;data analyst;pharmacist;civil engineer;librarian;"
    "pilot;baker;veterinarian;journalist;dentist;plumber;electrician;photographer;"
    "chef;translator;accountant;geologist;firefighter;tax lawyer;school teacher;"
    "software developer;marine biologist;optician;tailor;florist;surveyor;"
    "economist;physiotherapist"
).split(";")
_BRANDS = (
    "Zentra Novik Lumra Corvo Altair Brisa Kelvo Strato Orbix Pelican Vanta Quorra "
    "Helio Tundra Maxim Ferro Nimbus Osprey Radix Solvo"
).split()
_CATEGORIES = (
    "wireless speaker;desk lamp;electric kettle;rice cooker;smartwatch;tablet;"
    "coffee grinder;air purifier;hair dryer;blender;laptop;drone;e-reader;"
    "robot vacuum;space heater;toaster;webcam;gaming mouse;power bank;monitor"
).split(";")
_ORG_STEMS = (
    "Veltrix Oranda Kestrel Marlow Tessera Brightwater Halcyon Norfield Quantis "
    "Redwyn Solaris Thornbury Ulmara Vireo Westmark Yarrow Zephra Aldon Corvane "
    "Dunmore Ferrosa Galvant Ironvale Juniper Kalmar Lumen Meridian Northgate Oakhurst "
    "Pinecrest Quillon Ravenna Stonebridge Trivane Umbra Valora Wexford Ashcombe Beacon "
    "Cresta"
).split()
_ORG_SUFFIXES = "Group;Holdings;Partners;Labs;Corporation;Industries;Collective;Systems;Works;Alliance".split(
    ";"
)
_ORG_QUALIFIERS = ("", "", "", "", "", "North ", "Global ", "United ", "Pacific ", "Atlantic ")
_INDUSTRIES = (
    "shipping;solar energy;banking;biotech;retail;insurance;steel;telecoms;"
    "textiles;logistics;aerospace;publishing;agriculture;mining;software;"
    "pharmaceuticals;tourism;construction;food processing;robotics"
).split(";")
_ADJECTIVES = (
    "Silent Crimson Hidden Frozen Golden Broken Distant Hollow Wandering Burning "
    "Forgotten Last Velvet Scarlet Quiet Restless Bitter Endless Paper Iron Emerald "
    "Lonely Midnight Northern Painted Sleeping Stolen Crooked Winter Electric"
).split()
_NOUNS = (
    "Harbor Garden Mirror Orchard Lantern Compass Bridge Letter Tide Meadow Signal "
    "Station Island Voyage Summer Canyon Promise Window Frontier Shadow Kingdom Orchid "
    "Highway Whisper Engine Lighthouse Carnival Passage Horizon Raven"
).split()
_GENRES = (
    "comedy;thriller;documentary;western;science fiction film;drama;horror film;"
    "musical;animated film;romance;war film;crime drama;fantasy film;mystery;biopic"
).split(";")


def _a(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def _person(rng):
    return f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"


def _weight(rng):
    return f"{rng.randrange(2, 50) * 50} g" if rng.random() < 0.5 else f"{rng.randrange(11, 60) / 10} kg"


# keys, plural noun, the two fields stated in words, how to draw a name and the two fields,
# record templates (all three fields), mention templates (name only: not a record)
DOMAINS = {
    "people": dict(
        keys=("name", "profession", "city"),
        what="person",
        fields="their profession and the city where they work",
        draw_name=_person,
        draw=lambda rng: {"profession": rng.choice(_PROFESSIONS), "city": rng.choice(_CITIES)},
        records=[
            "{name} works as {a_profession} in {city}.",
            "In {city}, {name} has built a long career as {a_profession}.",
            "After moving to {city}, {name} found a job as {a_profession}.",
            "{name} is {a_profession} who lives and works in {city}.",
            "Colleagues in {city} describe {name} as a careful {profession}.",
        ],
        mentions=[
            "A short letter signed by {name} arrived at the office on Friday.",
            "{name} declined to answer any questions about the plans.",
            "Someone said that {name} enjoys long walks on weekends.",
            "Nobody has heard from {name} since the spring.",
        ],
    ),
    "products": dict(
        keys=("name", "category", "weight"),
        what="product",
        fields="its category and its weight",
        draw_name=lambda rng: f"{rng.choice(_BRANDS)} {rng.choice('KMRTVX')}{rng.randrange(10, 100)}",
        draw=lambda rng: {"category": rng.choice(_CATEGORIES), "weight": _weight(rng)},
        records=[
            "The {name} is {a_category} that weighs {weight}.",
            "Weighing only {weight}, the {name} is a popular {category}.",
            "Shoppers looking for {a_category} often pick the {name}, which weighs {weight}.",
            "The {name}, {a_category}, has a weight of {weight}.",
        ],
        mentions=[
            "Rumours about the {name} keep circulating online.",
            "The {name} was sold out in most stores last month.",
            "A reviewer promised to test the {name} sometime next year.",
            "The box of the {name} was lost during the move.",
        ],
    ),
    "organisations": dict(
        keys=("name", "industry", "headquarters"),
        what="organisation",
        fields="its industry and the city of its headquarters",
        draw_name=lambda rng: (
            f"{rng.choice(_ORG_STEMS)} {rng.choice(_ORG_QUALIFIERS)}{rng.choice(_ORG_SUFFIXES)}"
        ),
        draw=lambda rng: {"industry": rng.choice(_INDUSTRIES), "headquarters": rng.choice(_CITIES)},
        records=[
            "{name} is {a_industry} company headquartered in {headquarters}.",
            "Headquartered in {headquarters}, {name} works in {industry}.",
            "{name}, whose headquarters are in {headquarters}, is active in {industry}.",
            "From its headquarters in {headquarters}, {name} runs {a_industry} business.",
        ],
        mentions=[
            "{name} held its annual party last week.",
            "A spokesperson for {name} declined to comment.",
            "{name} changed its logo twice in one year.",
            "Several former employees of {name} met for dinner.",
        ],
    ),
    "films": dict(
        keys=("name", "director", "genre"),
        what="film",
        fields="its director and its genre",
        draw_name=lambda rng: f"The {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}",
        draw=lambda rng: {"director": _person(rng), "genre": rng.choice(_GENRES)},
        records=[
            "{name} is {a_genre} directed by {director}.",
            "Directed by {director}, {name} is {a_genre} that surprised many critics.",
            "{director} directed {name}, {a_genre} shot in only six weeks.",
            "Critics called {name}, {a_genre} by director {director}, a small triumph.",
        ],
        mentions=[
            "{name} was shown once at a small festival.",
            "Tickets for {name} sold out within an hour.",
            "A poster of {name} hangs in the hallway.",
            "The soundtrack of {name} is hard to find today.",
        ],
    ),
}

# Neutral sentences that state nothing about any record: the haystack around the records.
_FILLER = [
    "The weather stayed {weather} for most of the {period}.",
    "A new {facility} opened near the {place} on {day}.",
    "Officials said the {thing} would be repaired before {month}.",
    "Many residents spent the {period} {activity}.",
    "Prices for {goods} {trend} slightly over the {period}.",
    "Traffic on the main road was {traffic} during the morning rush.",
    "A committee met on {day} to review the budget for the {facility}.",
    "Volunteers planted {num} trees along the {place}.",
    "The {facility} will extend its opening hours in {month}.",
    "A survey found that {num} people visited the {place} in one week.",
    "Heavy rain delayed work on the {thing} for {num} days.",
    "The local newspaper printed a long article about {goods}.",
    "Children from the school painted a mural near the {place}.",
    "The {season} brought {weather} mornings and quiet evenings.",
    "Engineers inspected the {thing} again on {day}.",
    "A small market near the {place} sells {goods} every {day}.",
    "The council discussed parking rules for almost {num} minutes.",
    "Nobody expected the {thing} to attract so much attention.",
    "Attendance at the {facility} {trend} compared with last year.",
    "On {day}, a choir performed outside the {facility}.",
    "The old {thing} near the {place} was finally painted.",
    "Some neighbours complained about noise from the {facility}.",
    "Shops along the {place} closed early because of the {weather} weather.",
    "A guided tour of the {facility} now takes about {num} minutes.",
]
_SLOTS = {
    "weather": "mild;windy;cold;dry;humid;cloudy;sunny;foggy".split(";"),
    "period": "week;month;winter;summer;autumn;spring;holiday season".split(";"),
    "season": "winter;summer;autumn;spring".split(";"),
    "facility": "library;museum;swimming pool;community centre;sports hall;clinic;bakery;cinema".split(";"),
    "place": "river;harbour;main square;old bridge;train station;park;market street;town hall".split(";"),
    "day": "Monday;Tuesday;Wednesday;Thursday;Friday;Saturday;Sunday".split(";"),
    "thing": "fountain;clock tower;footbridge;bus shelter;playground;stone wall;pier;roof".split(";"),
    "month": "March;April;May;June;July;August;September;October".split(";"),
    "activity": "gardening;cycling;reading at home;visiting relatives;fishing;cleaning the attic".split(";"),
    "goods": "fresh bread;vegetables;firewood;coffee beans;olive oil;wool;honey;cheese".split(";"),
    "trend": "rose;fell;stayed flat;went up;went down".split(";"),
    "traffic": "heavy;light;slow;unusually calm".split(";"),
    "num": [str(n) for n in (12, 15, 20, 25, 30, 40, 45, 60, 75, 90)],
}


def _filler(rng):
    """An endless, seeded stream of neutral sentences."""
    while True:
        template = rng.choice(_FILLER)
        slots = {k: rng.choice(v) for k, v in _SLOTS.items()}
        yield template.format(**slots)


def _draw_records(domain, n_records, n_mentions, rng):
    """`n_records` records and `n_mentions` mention-only names, all names distinct and none
    a substring of another (so finding a name in the text is unambiguous)."""
    spec, names, tries = DOMAINS[domain], [], 0
    while len(names) < n_records + n_mentions:
        name, tries = spec["draw_name"](rng), tries + 1
        if not any(name in other or other in name for other in names):
            names.append(name)
        elif tries > 50 * (n_records + n_mentions):
            raise ValueError(
                f"cannot draw {n_records + n_mentions} distinct {domain} names for one prompt: "
                "ask for a shorter prompt"
            )
    records = [{"name": nm, **spec["draw"](rng)} for nm in names[:n_records]]
    return records, names[n_records:]


def _sentence(template, fields):
    return template.format(**fields, **{f"a_{k}": _a(v) for k, v in fields.items()})


def _prompt(domain, text):
    spec = DOMAINS[domain]
    k1, k2, k3 = spec["keys"]
    what = spec["what"]
    return (
        f"Read the text below and extract every {what} record from it.\n"
        f"A record is a {what} whose name is given together with {spec['fields']}. "
        f"A {what} that is mentioned without {spec['fields']} is not a record: leave it out.\n\n"
        f"Text:\n{text}\n\n"
        f"List every {what} record from the text above, in the order they appear, as a JSON "
        f'list with one object per record. Each object has exactly the keys "{k1}", "{k2}" '
        f'and "{k3}", with string values copied from the text, like this: '
        f'[{{"{k1}": "...", "{k2}": "...", "{k3}": "..."}}]. '
        f"Answer with only the JSON list."
    )


def _build(domain, entity_sentences, fillers, k, para_sizes):
    """Prompt with the first `k` filler sentences and the entity sentences spread evenly
    among them (so records sit at every depth of the prompt), cut into paragraphs."""
    n_e, seq, f = len(entity_sentences), [], 0
    for j, sentence in enumerate(entity_sentences):
        stop = (2 * j + 1) * k // (2 * n_e)
        seq.extend(fillers[f:stop])
        f = stop
        seq.append(sentence)
    seq.extend(fillers[f:k])
    paragraphs, i, p = [], 0, 0
    while i < len(seq):
        size = para_sizes[p % len(para_sizes)]
        paragraphs.append(" ".join(seq[i : i + size]))
        i, p = i + size, p + 1
    return _prompt(domain, "\n\n".join(paragraphs))


def generate(n, target_tokens, tokenizer, seed=0, tokens_per_record=200, domains=None):
    """`n` synthetic Text2JSON samples whose prompt is `target_tokens` long (+-3% aimed,
    +-10% guaranteed) under `tokenizer` (anything with `encode(text) -> list[int]`).

    Same format as the released set (`problem` = the whole user turn, `answer` = JSON
    string), plus `domain`, `n_records`, `n_tokens` and `non_records` (the names that are
    mentioned but are not records). One record per `tokens_per_record`
    prompt tokens (~10 records at 2K: an answer a tiny model can write in a few hundred
    tokens), a third as many mention-only names, the rest neutral filler. Sample i uses
    domain i mod len(domains); everything is drawn from a generator seeded by (seed, i), so
    the same seed gives the same samples.
    """
    domains = list(domains or DOMAINS)
    for d in domains:
        if d not in DOMAINS:
            raise ValueError(f"unknown domain {d!r}; choose from {sorted(DOMAINS)}")
    if target_tokens < 256:
        raise ValueError(
            f"a {target_tokens}-token Text2JSON prompt is too short: ask for at least 256 tokens"
        )
    count = lambda text: len(tokenizer.encode(text))
    samples = []
    for i in range(n):
        rng = random.Random(f"text2json/{seed}/{i}")
        domain = domains[i % len(domains)]
        spec = DOMAINS[domain]
        n_records = max(2, round(target_tokens / tokens_per_record))
        records, mentions = _draw_records(domain, n_records, n_records // 3 + 1, rng)
        sentences = [_sentence(rng.choice(spec["records"]), r) for r in records]
        sentences += [rng.choice(spec["mentions"]).format(name=m) for m in mentions]
        order = list(range(len(sentences)))
        rng.shuffle(order)
        entity_sentences = [sentences[j] for j in order]
        answer = [records[j] for j in order if j < n_records]  # gold in text order
        para_sizes = [rng.randrange(4, 9) for _ in range(16)]
        stream, fillers = _filler(rng), []

        # Fit the filler count k to the target: measure, rescale by the observed tokens per
        # filler sentence, repeat. Tokenizer-agnostic, a handful of full encodes.
        base = count(_build(domain, entity_sentences, [], 0, para_sizes))
        if base > 0.9 * target_tokens:
            raise ValueError(
                f"a {target_tokens}-token Text2JSON prompt is too short for this tokenizer: its "
                f"{n_records} records and {len(mentions)} other names alone take {base} tokens, more "
                f"than 90% of it, leaving no room for the text around them: ask for a longer prompt"
            )
        fillers.extend(next(stream) for _ in range(64))
        per_filler = (count(" ".join(fillers)) + 1) / len(fillers)
        k = max(0, round((target_tokens - base) / per_filler))
        for _ in range(10):
            fillers.extend(next(stream) for _ in range(k - len(fillers)))
            prompt = _build(domain, entity_sentences, fillers, k, para_sizes)
            n_tokens = count(prompt)
            if abs(n_tokens - target_tokens) <= 0.03 * target_tokens:
                break
            if k:
                per_filler = max((n_tokens - base) / k, 1.0)
            k = max(0, k + round((target_tokens - n_tokens) / per_filler))
        if abs(n_tokens - target_tokens) > 0.1 * target_tokens:
            raise ValueError(
                f"could not fit a {target_tokens}-token Text2JSON prompt (got {n_tokens} tokens): ask for "
                "another length"
            )
        samples.append(
            {
                "problem": prompt,
                "answer": json.dumps(answer, ensure_ascii=False),
                "domain": domain,
                "n_records": n_records,
                "n_tokens": n_tokens,
                "non_records": mentions,
            }
        )
    return samples
