"""Lucene's English analysis in Python, as Anserini's ``DefaultEnglishAnalyzer`` does it:
a StandardTokenizer approximation, possessive filter, lowercasing, Lucene's 33 stop words and
Lucene's Porter stemmer (which departs from Snowball's).

Design notes (tokenizer rules, known gaps, stemmer differences): docs/retrieval.md.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache
from typing import ClassVar

#: Lucene's ``EnglishAnalyzer.ENGLISH_STOP_WORDS_SET`` (used by Anserini's default analyzer).
LUCENE_ENGLISH_STOPWORDS: frozenset[str] = frozenset(
    {
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "but",
        "by",
        "for",
        "if",
        "in",
        "into",
        "is",
        "it",
        "no",
        "not",
        "of",
        "on",
        "or",
        "such",
        "that",
        "the",
        "their",
        "then",
        "there",
        "these",
        "they",
        "this",
        "to",
        "was",
        "will",
        "with",
    }
)

_MAX_TOKEN_LENGTH = 255  # Lucene StandardTokenizer default maxTokenLength


# --------------------------------------------------------------------------------------
# Lucene's Porter stemmer (reference implementation with its departures)
# --------------------------------------------------------------------------------------


class _Porter:
    """Porter stemmer following Lucene's ``PorterStemmer`` step by step.

    Works on the string ``b`` with ``k`` the index of the last live character
    and ``j`` the end of the stem found by the last successful :meth:`ends`.
    Any character other than a, e, i, o, u (and y after a consonant) counts as
    a consonant, as in Lucene.
    """

    __slots__ = ("b", "j", "k")

    _STEP3: ClassVar[dict[str, tuple]] = {  # Porter's step 2 (Lucene numbers it 3), keyed by the penultimate letter
        "a": (("ational", "ate"), ("tional", "tion")),
        "c": (("enci", "ence"), ("anci", "ance")),
        "e": (("izer", "ize"),),
        "l": (
            ("bli", "ble"),
            ("alli", "al"),
            ("entli", "ent"),
            ("eli", "e"),
            ("ousli", "ous"),
        ),
        "o": (("ization", "ize"), ("ation", "ate"), ("ator", "ate")),
        "s": (
            ("alism", "al"),
            ("iveness", "ive"),
            ("fulness", "ful"),
            ("ousness", "ous"),
        ),
        "t": (("aliti", "al"), ("iviti", "ive"), ("biliti", "ble")),
        "g": (("logi", "log"),),
    }
    _STEP4: ClassVar[dict[str, tuple]] = {  # keyed by the last letter
        "e": (("icate", "ic"), ("ative", ""), ("alize", "al")),
        "i": (("iciti", "ic"),),
        "l": (("ical", "ic"), ("ful", "")),
        "s": (("ness", ""),),
    }
    _STEP5: ClassVar[dict[str, tuple]] = {  # suffixes removed when m() > 1, keyed by the penultimate letter
        "a": ("al",),
        "c": ("ance", "ence"),
        "e": ("er",),
        "i": ("ic",),
        "l": ("able", "ible"),
        "n": ("ant", "ement", "ment", "ent"),
        "s": ("ism",),
        "t": ("ate", "iti"),
        "u": ("ous",),
        "v": ("ive",),
        "z": ("ize",),
    }

    def __init__(self, word: str) -> None:
        self.b = word
        self.k = len(word) - 1
        self.j = 0

    def cons(self, i: int) -> bool:
        ch = self.b[i]
        if ch in "aeiou":
            return False
        if ch == "y":
            return True if i == 0 else not self.cons(i - 1)
        return True

    def m(self) -> int:
        """Number of VC sequences in b[0..j]."""
        n, i, j = 0, 0, self.j
        while True:
            if i > j:
                return n
            if not self.cons(i):
                break
            i += 1
        i += 1
        while True:
            while True:
                if i > j:
                    return n
                if self.cons(i):
                    break
                i += 1
            i += 1
            n += 1
            while True:
                if i > j:
                    return n
                if not self.cons(i):
                    break
                i += 1
            i += 1

    def vowelinstem(self) -> bool:
        return any(not self.cons(i) for i in range(self.j + 1))

    def doublec(self, j: int) -> bool:
        return j >= 1 and self.b[j] == self.b[j - 1] and self.cons(j)

    def cvc(self, i: int) -> bool:
        if i < 2 or not self.cons(i) or self.cons(i - 1) or not self.cons(i - 2):
            return False
        return self.b[i] not in "wxy"

    def ends(self, s: str) -> bool:
        o = self.k - len(s) + 1
        if o < 0 or not self.b.startswith(s, o, self.k + 1):
            return False
        self.j = self.k - len(s)
        return True

    def setto(self, s: str) -> None:
        self.b = self.b[: self.j + 1] + s
        self.k = self.j + len(s)

    def r(self, s: str) -> None:
        if self.m() > 0:
            self.setto(s)

    def step1(self) -> None:
        if self.b[self.k] == "s":
            if self.ends("sses"):
                self.k -= 2
            elif self.ends("ies"):
                self.setto("i")
            elif self.b[self.k - 1] != "s":
                self.k -= 1
        if self.ends("eed"):
            if self.m() > 0:
                self.k -= 1
        elif (self.ends("ed") or self.ends("ing")) and self.vowelinstem():
            self.k = self.j
            if self.ends("at"):
                self.setto("ate")
            elif self.ends("bl"):
                self.setto("ble")
            elif self.ends("iz"):
                self.setto("ize")
            elif self.doublec(self.k):
                ch = self.b[self.k]
                self.k -= 1
                if ch in "lsz":
                    self.k += 1
            elif self.m() == 1 and self.cvc(self.k):
                self.setto("e")

    def step2(self) -> None:
        if self.ends("y") and self.vowelinstem():
            self.b = self.b[: self.k] + "i" + self.b[self.k + 1 :]

    def step3(self) -> None:
        if self.k == 0:
            return
        for suffix, repl in self._STEP3.get(self.b[self.k - 1], ()):
            if self.ends(suffix):
                self.r(repl)
                break

    def step4(self) -> None:
        for suffix, repl in self._STEP4.get(self.b[self.k], ()):
            if self.ends(suffix):
                self.r(repl)
                break

    def step5(self) -> None:
        if self.k == 0:
            return
        ch = self.b[self.k - 1]
        if ch == "o":
            matched = (self.ends("ion") and self.j >= 0 and self.b[self.j] in "st") or self.ends("ou")
        else:
            matched = any(self.ends(s) for s in self._STEP5.get(ch, ()))
        if matched and self.m() > 1:
            self.k = self.j

    def step6(self) -> None:
        self.j = self.k
        if self.b[self.k] == "e":
            a = self.m()
            if a > 1 or (a == 1 and not self.cvc(self.k - 1)):
                self.k -= 1
        if self.b[self.k] == "l" and self.doublec(self.k) and self.m() > 1:
            self.k -= 1

    def stem(self) -> str:
        if self.k > 1:  # Lucene leaves words of one or two characters alone
            self.step1()
            self.step2()
            self.step3()
            self.step4()
            self.step5()
            self.step6()
        return self.b[: self.k + 1]


@lru_cache(maxsize=1 << 20)
def lucene_porter_stem(word: str) -> str:
    """Stem ``word`` as Lucene's ``PorterStemFilter`` does (expects lowercase input)."""
    return _Porter(word).stem()


def make_stemmer(name: str) -> Callable[[str], str] | None:
    """Return a str->str stemmer for ``name`` (None for no stemming)."""
    if name == "none":
        return None
    if name == "porter":
        return lucene_porter_stem
    import Stemmer  # PyStemmer

    algo = "porter" if name == "snowball-porter" else name
    if algo not in Stemmer.algorithms():
        raise ValueError(
            f"unknown stemmer {name!r}: use 'porter' (Lucene's), 'snowball-porter', 'none' "
            f"or one of PyStemmer's {Stemmer.algorithms()}"
        )
    return Stemmer.Stemmer(algo).stemWord


# --------------------------------------------------------------------------------------
# Analyzer
# --------------------------------------------------------------------------------------

# Characters \w matches that UAX#29 classes as Word_Break=Other (numeric symbols).
_NUM_SYMBOLS = (
    "\u00b2\u00b3\u00b9\u00bc-\u00be\u2070\u2074-\u2079\u2080-\u2089\u2150-\u215f\u2189"
    "\u2460-\u249b\u24ea-\u24ff\u2776-\u2793"
)
# Han ideographs and Hiragana: StandardTokenizer emits one token per character.
_IDEO = "\u3040-\u309f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
# Format / Extend characters that stay inside a word (WB4), Latin-relevant subset.
_EXT = (
    "\u00ad\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u200c-\u200f\u202a-\u202e\u2060-\u2064"
    "\u20d0-\u20ff\ufe00-\ufe0f\ufe20-\ufe2f\ufeff"
)
_W = rf"[^\W{_NUM_SYMBOLS}{_IDEO}]"  # word character (letter, digit, underscore)
_LETTER = rf"[^\W\d_{_NUM_SYMBOLS}{_IDEO}]"
# MidLetter + MidNumLet + Single_Quote: join letters.
_MID_LETTER = "['.:\u00b7\u0387\u05f4\u2018\u2019\u2024\u2027\ufe13\ufe52\ufe55\uff07\uff0e\uff1a]"
# MidNum + MidNumLet + Single_Quote: join digits.
_MID_NUM = (
    "[',.;\u037e\u0589\u060c\u060d\u066c\u07f8\u2018\u2019\u2024\u2044"
    "\ufe10\ufe14\ufe50\ufe52\ufe54\uff07\uff0c\uff0e\uff1b]"
)
_MID_ANY = _MID_LETTER[:-1] + _MID_NUM[1:]  # cheap guard before the look-arounds
_UNIT = rf"{_W}+(?:[{_EXT}]+{_W}*)*"
_TOKEN_RE = re.compile(
    rf"{_UNIT}(?:(?={_MID_ANY})(?:(?<={_LETTER}){_MID_LETTER}(?={_LETTER})|(?<=\d){_MID_NUM}(?=\d)){_UNIT})*"
    rf"|[{_IDEO}]"
)
_POSSESSIVE_APOSTROPHES = ("'", "\u2019", "\uff07")
_CACHE_LIMIT = 1 << 21  # analysed-word cache entries before it is reset (bounds memory)


def _lower(token: str) -> str:
    """Per-character lowercase, like Java's ``Character.toLowerCase`` (no final-sigma rule)."""
    if token.isascii():
        return token.lower()
    return "".join(ch.lower()[0] if ch.lower() else ch for ch in token)


def standard_tokenize(text: str) -> list[str]:
    """Approximate Lucene's StandardTokenizer (docs/retrieval.md)."""
    toks = _TOKEN_RE.findall(text)
    # rare slow path: underscore-only tokens to drop, over-long tokens to cut
    if toks and ("_" in text or max(map(len, toks)) > _MAX_TOKEN_LENGTH):
        out: list[str] = []
        for tok in toks:
            if not tok.strip("_"):
                continue
            out.extend(tok[i : i + _MAX_TOKEN_LENGTH] for i in range(0, len(tok), _MAX_TOKEN_LENGTH))
        return out
    return toks


class LuceneAnalyzer:
    """Anserini's ``DefaultEnglishAnalyzer`` in Python (docs/retrieval.md).

    Tokenize -> strip possessive ``'s`` -> lowercase -> drop stop words -> stem.
    Stems are cached per distinct word, so analysing a corpus costs little more
    than tokenizing it.
    """

    def __init__(self, stemmer: str = "porter", stopwords: str = "lucene") -> None:
        if stopwords not in ("lucene", "none"):
            raise ValueError(f"stopwords must be 'lucene' or 'none', got {stopwords!r}")
        self.stemmer = stemmer
        self.stopwords = stopwords
        self._stop = LUCENE_ENGLISH_STOPWORDS if stopwords == "lucene" else frozenset()
        self._stem = make_stemmer(stemmer)
        self._cache: dict[str, str | None] = {}

    def _normalize(self, tok: str) -> str | None:
        t = tok
        if len(t) >= 2 and t[-1] in "sS" and t[-2] in _POSSESSIVE_APOSTROPHES:
            t = t[:-2]
        t = _lower(t)
        if not t or t in self._stop:
            return None
        return self._stem(t) if self._stem is not None else t

    def __call__(self, text: str) -> list[str]:
        toks = standard_tokenize(text)
        cache = self._cache
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        for tok in toks:
            if tok not in cache:
                cache[tok] = self._normalize(tok)
        terms = [cache[tok] for tok in toks]
        return [t for t in terms if t is not None]


def document_text(title: str | None, text: str) -> str:
    """Pyserini's BEIR ``contents``: title, a space, text (just text when no title)."""
    title = (title or "").strip()
    return f"{title} {text}" if title else text
