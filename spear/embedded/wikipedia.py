"""The general corpus: Wikipedia articles from a MediaWiki XML export, as plain text.

Source: gensim's test data (``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``,
a 2016 dump of ~100 articles). Articles (namespace 0, not redirects) are cleaned of wiki
markup: comments, ``<ref>``s, templates ``{{...}}`` (nested), tables ``{|...|}``, files,
images and categories are dropped; ``[[target|text]]`` becomes ``text``; external links keep
their label; bold/italic quotes and list markers go; headings become plain lines; trailing
reference sections (See also, References, External links, ...) are dropped; HTML entities are
decoded. Output: one article per block (title line, then one line per paragraph), blocks
separated by a blank line.
"""

from __future__ import annotations

import bz2
import html
import io
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from spear.embedded import sources
from spear.errors import SpearError
from spear.io.hashing import file_sha256

GENSIM_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

# Sections that hold only references/links once templates are gone: dropped with their subsections.
DROP_SECTIONS = {
    "see also", "references", "external links", "further reading", "notes", "bibliography", "sources",
    "footnotes", "citations", "notes and references", "references and notes", "works cited", "literature",
}  # fmt: skip
_NS_DROP = {"file", "image", "category", "media", "wikipedia", "wp", "help", "template", "portal",
            "special", "user", "talk", "wikt", "wiktionary", "s", "q", "commons", "meta"}  # fmt: skip
_DROP_TAGS = ("math", "gallery", "timeline", "score", "syntaxhighlight", "source", "imagemap", "chem",
              "hiero", "graph", "mapframe", "templatedata", "ce")  # fmt: skip

_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.S)
_REF_PAIR = re.compile(r"<ref\b(?:[^>/]|/(?!>))*>.*?</ref\s*>", re.S | re.I)
_REF_SELF = re.compile(r"<ref\b[^>]*/>", re.I)
_REFERENCES = re.compile(r"<references\b[^>]*/>|<references\b[^>]*>.*?</references\s*>", re.S | re.I)
_DROP_TAG = re.compile(r"<(" + "|".join(_DROP_TAGS) + r")\b[^>]*>.*?</\1\s*>", re.S | re.I)
_EXT_LABELLED = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+\s+([^\]]*)\]")
_EXT_BARE = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\]")
_BOLD_ITALIC = re.compile(r"'{2,5}")
_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")
_BR = re.compile(r"<br\s*/?>", re.I)
_TAG = re.compile(r"</?[A-Za-z][^<>]*?/?>")
_MAGIC = re.compile(r"__[A-Z]+__")
_LIST = re.compile(r"^[*#:;]+\s*")
_DASH_TEMPLATE = re.compile(r"\{\{\s*(?:snd|spaced ndash|spaced en dash|ndash|mdash|spaced mdash|dash)\s*\}\}", re.I)
_NBSP_TEMPLATE = re.compile(r"\{\{\s*(?:nbsp|sp|space)\s*\}\}", re.I)
# Inline templates whose text is part of the sentence: {{lang|grc|ἀναρχία}} -> ἀναρχία, ...
_LAST_ARG_TEMPLATE = re.compile(r"\{\{\s*(?:lang(?:-[a-z-]+)?|nowrap|nobr|transl|small|smaller|big|em|vr|math|mvar|ill)\s*\|([^{}]*)\}\}", re.I)
_CONVERT_TEMPLATE = re.compile(r"\{\{\s*(?:convert|cvt)\s*\|\s*([^|{}]+?)\s*\|\s*([^|{}]+?)\s*(?:\|[^{}]*)?\}\}", re.I)
_INTERLANG = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)?$")


def strip_balanced(text: str, open_: str, close_: str) -> str:
    """Remove every (possibly nested) ``open_ ... close_`` span; an unclosed opener is dropped
    alone so the text after it survives."""
    out: list[str] = []
    depth, i, start, top = 0, 0, 0, 0
    n = len(text)
    while i < n:
        if text.startswith(open_, i):
            if depth == 0:
                out.append(text[start:i])
                top = i
            depth += 1
            i += len(open_)
        elif depth and text.startswith(close_, i):
            depth -= 1
            i += len(close_)
            if depth == 0:
                start = i
        else:
            i += 1
    if depth:
        out.append(text[top + len(open_) :])
    else:
        out.append(text[start:])
    return "".join(out)


def _link_text(inner: str) -> str:
    """Display text of the content of a ``[[...]]`` link ('' for files, categories, ...)."""
    target, _, label = inner.partition("|")
    bare = target.strip()
    if bare.startswith(":"):
        bare = bare[1:]
    elif ":" in bare:
        prefix = bare.split(":", 1)[0].strip().lower()
        if prefix in _NS_DROP or _INTERLANG.match(prefix):
            return ""
    if label:
        if label.strip() == "":  # pipe trick [[Paris, Texas|]] -> Paris
            return re.sub(r"\s*[(,].*$", "", bare)
        return label.rsplit("|", 1)[-1] if "|" in label else label
    return bare.split("#", 1)[-1] if bare.startswith("#") else bare


def replace_links(text: str) -> str:
    """Resolve ``[[...]]`` links innermost first, so captions with nested links work."""
    out: list[str] = []
    stack: list[int] = []  # positions in out where an open [[ started
    i, n = 0, len(text)
    buf: list[str] = []
    while i < n:
        if text.startswith("[[", i):
            stack.append(len(buf))
            buf.append("[[")
            i += 2
        elif stack and text.startswith("]]", i):
            pos = stack.pop()
            inner = "".join(buf[pos + 1 :])
            del buf[pos:]
            buf.append(_link_text(inner))
            i += 2
        else:
            buf.append(text[i])
            i += 1
    out.append("".join(buf))
    return "".join(out)


def _split_sections(lines: list[str]) -> list[str]:
    """Drop reference-type sections (and their subsections) and headings without text;
    headings become plain lines."""
    items: list[tuple[int, str]] = []  # (heading level or 0 for text, line)
    drop_level = 0
    for line in lines:
        m = _HEADING.match(line)
        if m:
            level, title = len(m.group(1)), m.group(2).strip()
            if drop_level and level > drop_level:
                continue
            drop_level = level if title.lower().strip(" :") in DROP_SECTIONS else 0
            if not drop_level and title:
                items.append((level, title))
            continue
        if not drop_level:
            items.append((0, line))
    kept = []
    for i, (level, line) in enumerate(items):
        if level:  # keep a heading only when text or a subsection follows it
            nxt = next((lv for lv, _ in items[i + 1 :]), None)
            if nxt is None or (nxt and nxt <= level):
                continue
        kept.append(line)
    return kept


def _last_arg(m: re.Match) -> str:
    args = [a for a in m.group(1).split("|") if "=" not in a]
    return args[-1].strip() if args else ""


def inline_templates(text: str) -> str:
    """Replace the few inline templates whose output is part of the sentence (dashes, spaces,
    ``lang``, ``nowrap``, ``convert``); every other template is dropped later."""
    text = _DASH_TEMPLATE.sub(" \u2013 ", text)
    text = _NBSP_TEMPLATE.sub(" ", text)
    text = _CONVERT_TEMPLATE.sub(lambda m: f"{m.group(1)} {m.group(2)}", text)
    for _ in range(3):  # nested ones, innermost first
        text, count = _LAST_ARG_TEMPLATE.subn(_last_arg, text)
        if not count:
            break
    return text


def clean_wikitext(text: str) -> str:
    """Plain text of an article's wikitext: one line per paragraph/heading/list item."""
    text = _COMMENT.sub("", text)
    text = _REF_PAIR.sub("", text)
    text = _REF_SELF.sub("", text)
    text = _REFERENCES.sub("", text)
    text = _DROP_TAG.sub("", text)
    text = inline_templates(text)
    text = strip_balanced(text, "{{", "}}")
    text = strip_balanced(text, "{|", "|}")
    text = replace_links(text).replace("[[", "").replace("]]", "")
    text = _EXT_LABELLED.sub(r"\1", text)
    text = _EXT_BARE.sub("", text)
    text = _BOLD_ITALIC.sub("", text)
    text = _BR.sub("\n", text)
    text = _TAG.sub("", text)
    text = _MAGIC.sub("", text)
    text = html.unescape(html.unescape(text)).replace("\u00a0", " ")
    lines = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("----"):
            continue
        if not _HEADING.match(line):
            line = _LIST.sub("", line)
        line = re.sub(r"[ \t]+", " ", line).strip()
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # "( )" left by dropped templates
        line = re.sub(r" ([,.;:])", r"\1", line)
        line = re.sub(r"\s+", " ", line).strip()
        if line and re.search(r"\w", line) and not re.fullmatch(r"\([^()]*\)", line):
            lines.append(line)
    return "\n".join(_split_sections(lines))


def iter_pages(xml_stream: io.BufferedIOBase) -> Iterator[tuple[str, int, bool, str]]:
    """(title, namespace, is_redirect, wikitext) of each page of a MediaWiki XML export."""
    for _, elem in ET.iterparse(xml_stream, events=("end",)):
        if elem.tag.rsplit("}", 1)[-1] != "page":
            continue
        fields: dict[str, str] = {}
        redirect = False
        for child in elem.iter():
            name = child.tag.rsplit("}", 1)[-1]
            if name in ("title", "ns", "text") and name not in fields:
                fields[name] = child.text or ""
            elif name == "redirect":
                redirect = True
        ns = int(fields.get("ns", "0") or 0)
        if fields.get("text", "").lstrip().lower().startswith("#redirect"):
            redirect = True
        yield fields.get("title", ""), ns, redirect, fields.get("text", "")
        elem.clear()


def wiki_corpus(xml_bytes: bytes, min_words: int = 20) -> tuple[str, list[str]]:
    """(corpus text, article titles) from an (optionally bz2-compressed) MediaWiki export."""
    if xml_bytes[:3] == b"BZh":
        xml_bytes = bz2.decompress(xml_bytes)
    blocks, titles = [], []
    for title, ns, redirect, wikitext in iter_pages(io.BytesIO(xml_bytes)):
        if ns != 0 or redirect:
            continue
        body = clean_wikitext(wikitext)
        if len(body.split()) < min_words:
            continue
        blocks.append(f"{title}\n{body}")
        titles.append(title)
    return "\n\n".join(blocks) + "\n", titles


# ---- preparation ---------------------------------------------------------------------------
DIST, VERSION = "gensim", "4.4.0"
KEY = "gensim_wheel"
ASSET = "general_text"
LICENCE = "CC-BY-SA-3.0 (Wikipedia text, 2016 dump; shipped as gensim test data, gensim itself LGPL-2.1)"
# One fixed wheel for every machine (only its data is read), so the artifact hash is stable.
PLATFORM_ARGS = ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                 "--implementation", "cp", "--abi", "cp311")  # fmt: skip


def read_dump(local: str | None, downloads: Path) -> tuple[bytes, dict]:
    """(bz2 bytes of the dump, source record) from ``assets.local.gensim_wheel`` (a wheel, an
    sdist ``.tar.gz``, or the ``.bz2``/``.xml`` itself) or the pinned gensim wheel."""
    import tarfile

    member_name = GENSIM_MEMBER.rsplit("/", 1)[-1]
    if local:
        path = sources.check_local(local, KEY, ASSET)
        source = {"kind": "local", "key": f"assets.local.{KEY}", "path": str(path.resolve()),
                  "artifact_sha256": file_sha256(path)}  # fmt: skip
        if path.suffix in (".whl", ".zip"):
            data = sources.read_zip_member(path, GENSIM_MEMBER)
        elif path.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(path) as tar:
                member = next((m for m in tar.getmembers() if m.name.endswith(member_name)), None)
                if member is None:
                    raise SpearError(f"asset {ASSET!r}: {path} does not contain {member_name}")
                data = tar.extractfile(member).read()
        else:
            data = path.read_bytes()
    else:
        wheel = sources.pip_download(DIST, VERSION, Path(downloads), asset=ASSET, key=KEY,
                                     example=f"/path/to/gensim-{VERSION}-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
                                     platform_args=PLATFORM_ARGS)  # fmt: skip
        source = {"kind": "pypi", "package": DIST, "version": VERSION, "how": "pip download",
                  "artifact": str(wheel), "artifact_sha256": file_sha256(wheel)}  # fmt: skip
        data = sources.read_zip_member(wheel, GENSIM_MEMBER)
    source |= {"member": GENSIM_MEMBER, "sha256": sources.sha256_bytes(data), "bytes": len(data)}
    return data, source


def prepare(out_path, local: str | None, downloads, status=lambda msg: None) -> dict:
    """Write the general corpus (and an attribution list beside it); returns manifest fields."""
    from spear.io.atomic import write_text_atomic

    status("locating the Wikipedia dump")
    data, source = read_dump(local, Path(downloads))
    status("cleaning Wikipedia markup")
    text, titles = wiki_corpus(data)
    out_path = Path(out_path)
    write_text_atomic(out_path, text)
    attribution = ("Text of the following English Wikipedia articles (2016 revisions, from the gensim "
                   "test data), licensed CC BY-SA 3.0; cleaned of markup by spear-mm. Authors: see each "
                   "article's history.\n\n" + "".join(f"{t}\thttps://en.wikipedia.org/wiki/{t.replace(' ', '_')}\n" for t in titles))  # fmt: skip
    write_text_atomic(out_path.parent / "ATTRIBUTION.txt", attribution)
    details = {"articles": len(titles), "words": len(text.split()), "titles": titles}
    return {"source": source, "licence": LICENCE, "details": details}
