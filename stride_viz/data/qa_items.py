"""Held-out question/answer items about invented things: the built-in contamination benchmark.

Each item is a question about a fictional entity whose answer is a made-up word, in the
style of :mod:`stride_viz.data.facts`, but none of them is planted in any built-in pool: a
model can only know an answer if the item itself leaked into its training data. The
contamination benchmark (``benchmarks/contamination.py``) injects replicas of some of them
into the ``fortunes`` pool and checks that an audit finds those replicas; the Audit page
offers them as a ready-made query file.

An item's query is ``Query(id, "Question: <question> Answer:", " <answer>.")``; a replica in a
pool is that text verbatim (prompt + completion), the way a benchmark item leaks into a
crawled corpus. ``tests/test_audit.py`` checks that no answer word occurs in the built-in
pools.
"""
from __future__ import annotations

from stride_viz.data.records import Query

__all__ = ["QA_ITEMS", "qa_queries", "replica_text"]

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


def qa_queries() -> list[Query]:
    """The items as queries: prompt ``Question: ... Answer:``, completion `` <answer>.``."""
    return [Query(qid, f"Question: {question} Answer:", f" {answer}.") for qid, question, answer in QA_ITEMS]


def replica_text(query: Query) -> str:
    """The text of a replica of an item in a training pool: the item verbatim."""
    return query.prompt + (query.completion or "")
