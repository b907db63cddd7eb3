"""A deterministic generator of fictional documents and questions: the default dataset, needing no files.

Each document tells the story of a fictional person, the organisation they founded and the town they came
from, stating dates, numbers and names inside ordinary prose padded with filler. Its questions ask for
facts stated only in that document: every coined name (surname, organisation, town) is unique across the
whole dataset, so a question about one document's entities cannot be answered from another document, and
since all names and facts are invented, pretrained knowledge does not help either.

Splits are disjoint by construction: a coined word belongs to exactly one split (by a hash of the word),
and each split draws from its own random stream, seeded by (seed, split). A split's k-th document depends
only on the seed, the split and k, so enlarging one split neither changes other splits nor its own first
documents.
"""

import random
import zlib

from camels_jax.data.sources import Document

# Splits of the generated dataset; "loc" holds question-free documents for the locality (KL) term.
SPLITS = ("qa_train", "qa_val", "meta_train", "meta_val", "test", "loc")

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "pr", "r", "s", "sk",
           "st", "t", "th", "tr", "v", "vr", "z", "zh", "w", "j")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou", "y", "ia")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "m", "k", "nd", "rn", "sk", "v", "x", "lt")  # [3:] non-empty
# Given names end in a vowel, coined words in a consonant, so no given name can equal a coined word.
_GIVEN_ENDINGS = ("a", "o", "ia", "u", "e", "ie", "ea")
_ORG_KINDS = ("Company", "Cooperative", "Works", "Guild", "Society", "Trading House", "Partnership",
              "Consortium", "Collective", "Foundation")
_PROFESSIONS = ("glassblower", "cartographer", "schoolteacher", "clockmaker", "surveyor", "pharmacist",
                "bookbinder", "stonemason", "weaver", "shipwright", "botanist", "printer", "tailor",
                "engineer", "beekeeper", "luthier", "miller", "potter", "bookkeeper", "saddler")
_PRODUCTS = ("copper kettles", "woollen blankets", "pocket watches", "paper lanterns", "rope", "barometers",
             "canvas sails", "ceramic tiles", "harmonicas", "wax candles", "bicycle frames", "ink",
             "leather saddles", "fishing nets", "umbrellas", "telescopes", "roof slates", "buttons",
             "weather vanes", "sewing needles", "almanacs", "garden tools", "bells", "spectacles")
_FILLER = (
    "Records from that period are incomplete, and some details remain uncertain.",
    "The winters in the region were long, and travel between towns was slow.",
    "Local newspapers of the time covered the story in some detail.",
    "Historians have since written about the era at considerable length.",
    "Few photographs survive, although several letters have been preserved.",
    "Life in {town} followed the rhythm of the seasons and the market days.",
    "Visitors to {town} often remarked on its narrow streets and crowded harbour.",
    "The surrounding countryside was mostly farmland, dotted with small villages.",
    "It was a time of rapid change, and many families moved in search of work.",
    "Neighbours later described those years as busy but hopeful.",
    "The work was demanding, and the hours were long.",
    "Not everyone in {town} approved of the new venture at first.",
    "Prices rose and fell with the harvest, as they did everywhere else.",
    "A small museum in {town} still keeps a few objects from those days.",
    "Several accounts of the period disagree on minor points.",
    "The roads were often muddy in spring, which delayed deliveries.",
    "Apprentices came from nearby villages to learn the trade.",
    "Competition from larger firms was a constant worry.",
    "The building that housed the workshop was later converted into flats.",
    "Many of the early customers were farmers and shopkeepers.",
)
# Facts in narrative order: (key, sentence templates, question template, answer template).
_FACTS = (
    ("birth_year", ("{person} was born in {birth_year} in {town}.",
                    "Born in {birth_year}, {person} grew up in the town of {town}."),
     "In what year was {person} born?", "{birth_year}"),
    ("town", ("{person} spent a quiet childhood in {town}, where the family kept a small shop.",
              "The family of {person} had lived in {town} for generations."),
     "In which town did {person} grow up?", "{town}"),
    ("profession", ("As a young adult, {person} trained as a {profession}.",
                    "{person} worked for several years as a {profession} before changing course."),
     "What trade did {person} first train in?", "{profession}"),
    ("founded_year", ("In {founded_year}, {person} founded the {org}.",
                      "{person} established the {org} in {founded_year}, using savings from earlier work."),
     "In what year was the {org} founded?", "{founded_year}"),
    ("founder", ("The founder of the {org}, {person}, ran it from a rented room at first.",
                 "Everyone in {town} knew that the {org} had been started by {person}."),
     "Who founded the {org}?", "{person}"),
    ("product", ("The {org} became known for its {product}.",
                 "The best-selling goods of the {org} were {product}, sold across the region."),
     "What was the {org} known for making?", "{product}"),
    ("employees", ("At its peak, the {org} employed {employees} people.",
                   "By its busiest year the {org} had {employees} workers on its payroll."),
     "How many people did the {org} employ at its peak?", "{employees}"),
    ("successor", ("Eventually {successor} took over the running of the {org}.",
                   "Leadership of the {org} later passed to {successor}."),
     "Who took over the {org} from {person}?", "{successor}"),
    ("successor_year", ("The handover to {successor} took place in {successor_year}.",
                        "{successor} became head of the {org} in {successor_year}."),
     "In what year did {successor} take over the {org}?", "{successor_year}"),
)
MAX_QUESTIONS = len(_FACTS)  # one question per fact a document can state


class _Namer:
  """Coins capitalised pseudo-words, each used once per split and owned by exactly one split."""

  def __init__(self, rng: random.Random, split: str):
    self._rng, self._split, self._used = rng, SPLITS.index(split), set()

  def word(self) -> str:
    while True:
      r = self._rng
      w = (r.choice(_ONSETS) + r.choice(_VOWELS) + r.choice(_CODAS) + r.choice(_ONSETS) + r.choice(_VOWELS)
           + r.choice(_CODAS[3:])).capitalize()
      if w not in self._used and zlib.crc32(w.encode()) % len(SPLITS) == self._split:
        self._used.add(w)
        return w

  def given_name(self) -> str:
    # Given names may repeat (across splits too); the unique surname makes the full name unique.
    r = self._rng
    return (r.choice(_ONSETS) + r.choice(_VOWELS) + r.choice(_ONSETS[:12])
            + r.choice(_GIVEN_ENDINGS)).capitalize()


def _document(rng: random.Random, namer: _Namer, n_questions: int, filler: tuple[int, int]):
  """One document's text and (question, answer) pairs."""
  birth = rng.randint(1720, 1960)
  founded = birth + rng.randint(22, 45)
  values = dict(
      person=f"{namer.given_name()} {namer.word()}", successor=f"{namer.given_name()} {namer.word()}",
      town=namer.word(), org=f"{namer.word()} {rng.choice(_ORG_KINDS)}", profession=rng.choice(_PROFESSIONS),
      product=rng.choice(_PRODUCTS), birth_year=str(birth), founded_year=str(founded),
      successor_year=str(founded + rng.randint(8, 35)), employees=str(rng.randint(12, 4000)))
  # A random subset of the facts is stated, in narrative order; questions ask only about stated facts.
  stated = sorted(rng.sample(range(len(_FACTS)), rng.randint(max(n_questions, 5), len(_FACTS))))
  sentences = [rng.choice(_FACTS[i][1]).format(**values) for i in stated]
  for line in rng.sample(_FILLER, rng.randint(*filler)):
    sentences.insert(rng.randint(1, len(sentences)), line.format(**values))
  asked = sorted(rng.sample(stated, n_questions))
  qas = [(_FACTS[i][2].format(**values), _FACTS[i][3].format(**values)) for i in asked]
  return " ".join(sentences), qas


def generate(seed: int, split: str, n_docs: int, questions_per_doc: int = 3,
             filler: tuple[int, int] = (2, 5)) -> list[Document]:
  """The first `n_docs` documents of one split of the generated dataset.

  Args:
    seed: dataset seed; together with `split` it fixes every document.
    split: one of `SPLITS`; documents of "loc" carry no questions.
    n_docs: number of documents.
    questions_per_doc: questions asked about each document (at most MAX_QUESTIONS = 9; 0 for "loc").
    filler: (min, max) number of filler sentences mixed into each document.

  Returns:
    Documents with ids "{split}-{k}"; each is its own group. Question j has id "{split}-{k}/q{j}" and its
    one answer as its only gold.
  """
  if split not in SPLITS:
    raise ValueError(f"unknown generated split {split!r}; expected one of {SPLITS}")
  if not 0 <= questions_per_doc <= MAX_QUESTIONS:
    raise ValueError(f"questions_per_doc={questions_per_doc} must be in [0, {MAX_QUESTIONS}]")
  # A string seed is hashed with SHA-512 by `random`, so streams are stable across Python versions.
  rng = random.Random(f"camels-generated/{seed}/{split}")
  namer = _Namer(rng, split)
  n_questions = 0 if split == "loc" else questions_per_doc
  docs = []
  for k in range(n_docs):
    text, qas = _document(rng, namer, n_questions, filler)
    doc_id = f"{split}-{k}"
    docs.append(Document(doc_id, doc_id, text, tuple(q for q, _ in qas), tuple(a for _, a in qas),
                         question_ids=tuple(f"{doc_id}/q{j}" for j in range(len(qas))),
                         gold_answers=tuple((a,) for _, a in qas)))
  return docs
