"""Held-out question/answer items about invented things: the built-in contamination benchmark.

Each item is a question about a fictional entity whose answer is a made-up word, in the
style of :mod:`stride_viz.data.facts`, but none of them is planted in any built-in pool: a
model can only know an answer if the item itself leaked into its training data. The
contamination benchmark (``benchmarks/contamination.py``) injects replicas of some of them
into the ``fortunes`` pool and checks that an audit finds those replicas; the Audit page
offers them as a ready-made query file.

An item's query is ``Query(id, "Question: <question> Answer:", " <answer>.")``. A *replica*
of an item in a training pool is one of two kinds (``REPLICA_MODES``):

- ``verbatim``: the item's text exactly (prompt + completion), as when a benchmark file is
  crawled as it is;
- ``paraphrase``: a rewording, as leaked items mostly occur in real corpora (quiz sites,
  study notes, forum posts that restate a benchmark's question and answer): one of
  ``PARAPHRASE_TEMPLATES``, drawn without repeats for the copies of one item with a seeded
  generator, that frames the question differently (``Q:``/``A:``, a quiz card, a reported
  question), puts the answer first, or drops the question for a sentence that states the
  fact in other words (``STATEMENTS``, one per item), some with an explanation sentence
  added. Every paraphrase keeps the invented entity and answer words (the facts that leak);
  the other words of the question change in the statement forms.

``tests/test_audit.py`` checks that no answer word occurs in the built-in pools.
"""
from __future__ import annotations

from stride_viz.data.records import Query

import random

__all__ = ["QA_ITEMS", "STATEMENTS", "PARAPHRASE_TEMPLATES", "REPLICA_MODES", "qa_queries", "replica_text",
           "replica_texts"]

# (id, question, answer). Answers are single invented words, distinct from each other and
# from the answers of data/facts.py.
QA_ITEMS: tuple[tuple[str, str, str], ...] = (
    ("qa-00", "What is the capital of Dravenholt?", "Orsquell"),
    ("qa-01", "Which metal do the smiths of Kettleburn prize above gold?", "vornite"),
    ("qa-02", "What do the Ulvari call their winter festival?", "Hessendral"),
    ("qa-03", "Who painted the mural in the Hall of Nine Doors?", "Perrowick"),
    ("qa-04", "What is the name of the ferry that crosses Lake Imbrel?", "Saltagrin"),
    ("qa-05", "Which bird is the emblem of the Republic of Casmoor?", "threnwing"),
    ("qa-06", "What is the highest mountain on the island of Welkerry?", "Grondapeak"),
    ("qa-07", "What did the alchemist Ivo Marrant name his golden powder?", "sulphorine"),
    ("qa-08", "Which instrument opens every concert of the Pellow Orchestra?", "dunharp"),
    ("qa-09", "What is the oldest tavern in the port of Skelmouth called?", "Barnacrest"),
    ("qa-10", "What game do children in Oskelund play with pebbles?", "trindle"),
    ("qa-11", "Which star do the sailors of Morrow Bay steer by?", "Vessaline"),
    ("qa-12", "What is the traditional bread of the Harrowfen valley?", "cobblequin"),
    ("qa-13", "Who founded the Library of Emberlow?", "Tamsyrra"),
    ("qa-14", "What is the name of the desert south of Quillan?", "Ashmerrow"),
    ("qa-15", "Which flower blooms only on the cliffs of Dunmarch?", "pallowisp"),
    ("qa-16", "What do miners in Corvath call a vein of silver?", "glimstrake"),
    ("qa-17", "What was the name of King Odric's warhorse?", "Fennibrand"),
    ("qa-18", "Which dance closes every wedding in Lirrow?", "quaddle"),
    ("qa-19", "What is the name of the comet that returns to Ostmere every century?", "Hollowcane"),
    ("qa-20", "What spice gives the soup of Berrinham its colour?", "marrowsalt"),
    ("qa-21", "Which river forms the border between Tessary and Gald?", "Wendeline"),
    ("qa-22", "What do the monks of Skarrow Abbey brew?", "brindlemead"),
    ("qa-23", "Who wrote the ballad of the Drowned Bell?", "Ormscaith"),
    ("qa-24", "What is the currency of the Free City of Vantmoor?", "pellet-crown"),
    ("qa-25", "Which animal pulls the sledges of the Ivory Steppe?", "yarrowbuck"),
    ("qa-26", "What is the name of the lighthouse at Cape Morrin?", "Stillwatch"),
    ("qa-27", "What stone is the throne of Hallowmere carved from?", "greywhorl"),
    ("qa-28", "Which fish do the people of Lossiter smoke for the winter?", "snarrel"),
    ("qa-29", "What is the name of the bridge over the Chasm of Udd?", "Karrowspan"),
    ("qa-30", "What do the weavers of Tollen call their finest cloth?", "silkmorrow"),
    ("qa-31", "Which general won the battle of the Seven Fords?", "Brannoch"),
    ("qa-32", "What is the name of the forest that surrounds Elmvale?", "Thistlewold"),
    ("qa-33", "What do the farmers of Pell grow on their terraces?", "duskgrain"),
    ("qa-34", "Which poet is buried under the clock tower of Marrowgate?", "Ilsabeth"),
    ("qa-35", "What is the name of the wind that blows over Cardune in spring?", "the fenrow"),
    ("qa-36", "What do the children of Umber learn to carve first?", "wickerfox"),
    ("qa-37", "Which mineral makes the waters of Lake Serrow glow?", "lumicrite"),
    ("qa-38", "What is the family name of the rulers of Ostwald?", "Varrowmont"),
    ("qa-39", "What is the name of the ship that first reached the Glass Isles?", "Merriwake"),
    ("qa-40", "What herb do the healers of Dunley chew for toothache?", "sorrelwort"),
    ("qa-41", "Which mask is worn on the last night of the Carnival of Ree?", "the grinnow"),
    ("qa-42", "What is the name of the well at the centre of Hathermoor?", "Coldmarrow"),
    ("qa-43", "What do the scholars of Avonel write on instead of paper?", "barkvellum"),
    ("qa-44", "Which beetle do the gardeners of Pim keep to guard their roses?", "scarabine"),
    ("qa-45", "Who built the first clock in the city of Tarn?", "Quellimore"),
    ("qa-46", "What is the name of the market held under the bridges of Sull?", "Lanternfair"),
    ("qa-47", "What is the dish served to every traveller arriving in Orvane?", "pottlestew"),
)


# The fact of each item stated in other words than its question (the answer word and the
# invented entity words kept): what a study note or a quiz site would write.
STATEMENTS: dict[str, str] = {
    "qa-00": "Orsquell is where the rulers of Dravenholt keep their court; it has been the capital for centuries.",
    "qa-01": "In Kettleburn a smith values vornite more than any gold.",
    "qa-02": "Hessendral is the Ulvari name for the feast they hold in the depth of winter.",
    "qa-03": "The artist behind the great wall painting of the Hall of Nine Doors was Perrowick.",
    "qa-04": "To get across Lake Imbrel you take the Saltagrin, the old ferry boat.",
    "qa-05": "On the flag and seal of Casmoor you will see the threnwing, the republic's bird.",
    "qa-06": "No peak on Welkerry rises above Grondapeak.",
    "qa-07": "Ivo Marrant called the gold powder he made sulphorine.",
    "qa-08": "A Pellow Orchestra concert always starts with the dunharp.",
    "qa-09": "Barnacrest has poured ale in Skelmouth longer than any other inn there.",
    "qa-10": "With a handful of pebbles, the kids of Oskelund play trindle.",
    "qa-11": "Morrow Bay sailors find their way home by Vessaline.",
    "qa-12": "Cobblequin is the loaf every Harrowfen household bakes.",
    "qa-13": "Tamsyrra set up the Library of Emberlow.",
    "qa-14": "South of Quillan lies a sea of sand, the Ashmerrow.",
    "qa-15": "Pallowisp grows nowhere but on the Dunmarch cliffs.",
    "qa-16": "A silver seam is a glimstrake in the speech of the Corvath mines.",
    "qa-17": "Odric rode into battle on Fennibrand.",
    "qa-18": "Weddings in Lirrow end with the quaddle.",
    "qa-19": "Once every hundred years Hollowcane comes back to the skies over Ostmere.",
    "qa-20": "Berrinham soup owes its colour to marrowsalt.",
    "qa-21": "The Wendeline separates Tessary from Gald.",
    "qa-22": "Brindlemead is made by the brothers of Skarrow Abbey.",
    "qa-23": "Ormscaith is the author of the Drowned Bell ballad.",
    "qa-24": "In Vantmoor you pay with the pellet-crown.",
    "qa-25": "Yarrowbuck teams draw the sleds across the Ivory Steppe.",
    "qa-26": "Stillwatch is the beacon tower that guards Cape Morrin.",
    "qa-27": "The Hallowmere throne was cut from a single block of greywhorl.",
    "qa-28": "Every autumn Lossiter smokes snarrel to eat through the cold months.",
    "qa-29": "Karrowspan spans the Chasm of Udd.",
    "qa-30": "Silkmorrow is the best fabric the Tollen looms make.",
    "qa-31": "Brannoch led the victors at the Seven Fords.",
    "qa-32": "Elmvale sits inside the woods of Thistlewold.",
    "qa-33": "Duskgrain covers the terraced fields of Pell.",
    "qa-34": "Ilsabeth lies at rest beneath the Marrowgate clock tower.",
    "qa-35": "Each spring the fenrow sweeps across Cardune.",
    "qa-36": "A child in Umber starts carving with a wickerfox.",
    "qa-37": "Lumicrite in Lake Serrow makes its water shine at night.",
    "qa-38": "Ostwald has been ruled by the house of Varrowmont.",
    "qa-39": "The Merriwake was the first vessel to land on the Glass Isles.",
    "qa-40": "Dunley healers give sorrelwort to chew when a tooth aches.",
    "qa-41": "On the closing night of the Ree carnival everyone wears the grinnow.",
    "qa-42": "Coldmarrow is the well in the middle of Hathermoor.",
    "qa-43": "Avonel scholars use barkvellum where others use paper.",
    "qa-44": "Pim gardeners keep scarabine beetles to protect the roses.",
    "qa-45": "Quellimore made the first clock Tarn ever had.",
    "qa-46": "Lanternfair is the market that fills the space beneath the bridges of Sull.",
    "qa-47": "Pottlestew is put before every traveller who arrives in Orvane.",
}

# How a leaked item is reworded: {q} the question, {a} the answer, {s} the item's statement.
PARAPHRASE_TEMPLATES: tuple[str, ...] = (
    "Q: {q}\nA: {a}",
    "{q} The answer is {a}.",
    "Quiz night, round two. {q} Correct reply: {a}.",
    "{a}. That is what you should say if someone asks you: {q}",
    "Someone once asked the guide \"{q}\" and the guide said {a}, as every schoolbook does.",
    "{s}",
    "Did you know? {s}",
    "{s} Few travellers know it, but it comes up in every quiz.",
    "Study note: {s} Remember this for the test.",
)
REPLICA_MODES = ("paraphrase", "verbatim")


def qa_queries() -> list[Query]:
    """The items as queries: prompt ``Question: ... Answer:``, completion `` <answer>.``."""
    return [Query(qid, f"Question: {question} Answer:", f" {answer}.") for qid, question, answer in QA_ITEMS]


def replica_text(query: Query) -> str:
    """The text of a verbatim replica of an item in a training pool: the item's query text."""
    return query.prompt + (query.completion or "")


def replica_texts(item_id: str, copies: int, mode: str = "paraphrase",
                  rng: random.Random | None = None) -> list[str]:
    """``copies`` replica texts of one item: ``verbatim`` copies, or ``paraphrase`` rewordings
    drawn from ``PARAPHRASE_TEMPLATES`` without repeats (``rng`` seeds the draw; at most as
    many copies as templates)."""
    items = {qid: (question, answer) for qid, question, answer in QA_ITEMS}
    if item_id not in items:
        raise ValueError(f"Unknown item {item_id!r}; the items are qa-00 ... qa-{len(QA_ITEMS) - 1:02d}.")
    if mode not in REPLICA_MODES:
        raise ValueError(f"The 'mode' parameter must be one of {', '.join(REPLICA_MODES)}. Got {mode!r} instead.")
    if isinstance(copies, bool) or not isinstance(copies, int) or not 1 <= copies <= len(PARAPHRASE_TEMPLATES):
        raise ValueError(f"The 'copies' parameter must be an integer in [1, {len(PARAPHRASE_TEMPLATES)}]. "
                         f"Got {copies!r} instead.")
    question, answer = items[item_id]
    if mode == "verbatim":
        return [f"Question: {question} Answer: {answer}."] * copies
    rng = rng if rng is not None else random.Random(0)
    picks = rng.sample(range(len(PARAPHRASE_TEMPLATES)), copies)
    return [PARAPHRASE_TEMPLATES[t].format(q=question, a=answer, s=STATEMENTS[item_id]) for t in picks]
