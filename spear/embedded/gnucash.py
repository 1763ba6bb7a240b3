"""The GnuCash corpus (``data=gnucash_guide``, the default until the news corpus): the GnuCash guide (Debian ``gnucash-docs``, English DocBook) as plain text.

Cleaning: the guide's own entities (``&app;`` -> GnuCash, menu entities, URLs, ...) are read
from its DTD chain (``gnc-gui-C.dtd`` -> ``gnc-gui-struct.dtd`` -> ``gnc-docbookx.dtd``) and
expanded; standard XML/HTML entities are decoded; figures, screenshots, index terms, code
listings and footnotes are dropped; titles, paragraphs, list items and table rows become
paragraphs separated by blank lines; ``xref`` links become the title of their target.

Split: whole files (chapters) in the guide's reading order; the chapters in
:data:`HELDOUT_CHAPTERS` form the held-out domain text (~17% of the words), the rest the
training text. The legal notice and the GFDL appendix are never training text.
"""

from __future__ import annotations

import html.entities
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from spear.embedded import sources
from spear.errors import SpearError
from spear.io.hashing import file_sha256

GUIDE_SUBDIR = "usr/share/help/C/gnucash-guide"  # inside the .deb: the English guide
COPYRIGHT_FILE = "usr/share/doc/gnucash-docs/copyright"
MAIN_FILE = "index.docbook"

# Held out for domain perplexity: finance topics the model never trains on (document in README).
HELDOUT_CHAPTERS: tuple[str, ...] = (
    "ch_loans.xml",  # Loans
    "ch_capgain.xml",  # Capital Gains
    "ch_budgets.xml",  # Budgets
    "ch_oth_assets.xml",  # Other Assets
    "ch_dep.xml",  # Depreciation
)
# Never in either split: licence texts.
EXCLUDED_FILES: tuple[str, ...] = ("legal.xml", "fdl-appendix.xml")
LICENCE_FILE = "fdl-appendix.xml"

_XML_PREDEFINED = {"amp", "lt", "gt", "quot", "apos"}
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_DECL = re.compile(
    r"""<!ENTITY\s+(?P<pe>%\s+)?(?P<name>[\w.:-]+)\s+
        (?:"(?P<dq>[^"]*)"|'(?P<sq>[^']*)'|
           (?P<ext>SYSTEM\s+(?:"[^"]*"|'[^']*')|PUBLIC\s+(?:"[^"]*"|'[^']*')\s*(?:"[^"]*"|'[^']*')?))
        [^>]*>|%(?P<ref>[\w.:-]+);""",
    re.X | re.S,
)
_SYSTEM_ID = re.compile(r"""(?:"([^"]*)"|'([^']*)')\s*$""")
_PE_REF = re.compile(r"%([\w.:-]+);")
_GE_REF = re.compile(r"&([A-Za-z_][\w.:-]*);")
_DOCTYPE = re.compile(r"<!DOCTYPE\s[^\[>]*(?:\[.*?\]\s*)?>", re.S)
_XML_DECL = re.compile(r"<\?xml[^>]*\?>")
_XI_INCLUDE = re.compile(r"<xi:include\b[^>]*?/>|<xi:include\b.*?</xi:include>", re.S)
_DOCTYPE_SYSTEM = re.compile(r"""<!DOCTYPE\s+\w+\s+(?:SYSTEM|PUBLIC\s+"[^"]*")\s+"([^"]+)\"""")


@dataclass
class Entities:
    """General and parameter entities of a DTD chain; the first declaration wins (XML rule)."""

    general: dict[str, str] = field(default_factory=dict)
    parameter: dict[str, str] = field(default_factory=dict)
    external_pe: dict[str, str] = field(default_factory=dict)  # name -> system id


def _expand_pe(value: str, ents: Entities, depth: int = 0) -> str:
    if depth > 20 or "%" not in value:
        return value
    return _PE_REF.sub(lambda m: _expand_pe(ents.parameter.get(m.group(1), ""), ents, depth + 1), value)


def parse_dtd(text: str, base_dir: Path | None = None, ents: Entities | None = None, _seen=None) -> Entities:
    """Entity declarations of a DTD text, following local external parameter entities
    (``<!ENTITY % x SYSTEM "file.dtd"> %x;``) relative to ``base_dir``; remote ones are skipped."""
    ents = ents if ents is not None else Entities()
    seen = _seen if _seen is not None else set()
    for m in _DECL.finditer(_COMMENT.sub("", text)):
        if m.group("ref"):
            name = m.group("ref")
            if name in ents.parameter:
                parse_dtd(ents.parameter[name], base_dir, ents, seen)
            elif name in ents.external_pe and base_dir is not None:
                path = (base_dir / ents.external_pe[name]).resolve()
                if path.is_file() and path not in seen:
                    seen.add(path)
                    parse_dtd(path.read_text(encoding="utf-8"), path.parent, ents, seen)
            continue
        name, is_pe = m.group("name"), bool(m.group("pe"))
        table = ents.parameter if is_pe else ents.general
        if name in table or (is_pe and name in ents.external_pe):
            continue
        if m.group("ext"):
            sysid = _SYSTEM_ID.search(m.group("ext").strip())
            if is_pe and sysid:
                ents.external_pe[name] = sysid.group(1) or sysid.group(2) or ""
            continue
        value = m.group("dq") if m.group("dq") is not None else m.group("sq")
        table[name] = _expand_pe(value, ents)
    return ents


def load_entities(dtd_path: Path) -> Entities:
    return parse_dtd(Path(dtd_path).read_text(encoding="utf-8"), Path(dtd_path).parent)


def expand_entities(text: str, general: dict[str, str], unknown: set[str] | None = None, _depth: int = 0) -> str:
    """Replace ``&name;`` by the entity's (recursively expanded) value.

    XML's five predefined entities and character references are left to the XML parser;
    other names not in ``general`` are decoded from the HTML5 table (``&rsquo;`` -> ’), and
    names unknown to both are dropped (and added to ``unknown``).
    """

    def repl(m: re.Match) -> str:
        name = m.group(1)
        if name in _XML_PREDEFINED:
            return m.group(0)
        if name in general:
            if _depth > 20:
                return ""
            return expand_entities(general[name], general, unknown, _depth + 1)
        char = html.entities.html5.get(name + ";")
        if char is not None:
            return char.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        if unknown is not None:
            unknown.add(name)
        return ""

    return _GE_REF.sub(repl, text)


# ---- DocBook -> text ---------------------------------------------------------------------
SKIP = {
    "figure", "screenshot", "mediaobject", "inlinemediaobject", "imageobject", "imagedata", "graphic",
    "indexterm", "remark", "comment", "screen", "programlisting", "footnote", "footnoteref", "colspec",
    "spanspec", "include", "bookinfo", "articleinfo", "chapterinfo", "sectioninfo", "info", "authorgroup",
    "revhistory", "legalnotice", "glosssee", "glossseealso", "anchor", "titleabbrev",
}  # fmt: skip
BLOCK = {
    "book", "part", "chapter", "appendix", "preface", "glossary", "glossdiv", "glossentry", "glossterm",
    "glossdef", "sect1", "sect2", "sect3", "sect4", "sect5", "section", "simplesect", "title", "subtitle",
    "para", "simpara", "formalpara", "blockquote", "note", "tip", "warning", "important", "caution",
    "itemizedlist", "orderedlist", "variablelist", "varlistentry", "term", "listitem", "procedure", "step",
    "substeps", "literallayout", "example", "informalexample", "equation", "informalequation", "bridgehead",
    "caption", "table", "informaltable", "tgroup", "thead", "tbody", "tfoot", "address", "abstract",
    "sidebar", "highlights", "epigraph", "qandaset", "qandaentry", "question", "answer", "mathphrase",
}  # fmt: skip
TITLED = {"book", "part", "chapter", "appendix", "preface", "glossary", "sect1", "sect2", "sect3", "sect4",
          "sect5", "section", "simplesect", "table", "informaltable", "example", "equation", "figure"}  # fmt: skip


JOINED = {"menuchoice": " \u2192 ", "keycombo": "+"}  # children joined the way DocBook renders them


def _local(tag) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _norm(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r" ([.,;:!?)\]])(?=\s|$|[.,;:!?)\]])", r"\1", text)  # "Cash Flow ." -> "Cash Flow."
    return re.sub(r"([(\[]) ", r"\1", text)


def _joined(elem: ET.Element, titles: dict[str, str]) -> str:
    parts = [_inline_text(c, titles) for c in elem if _local(c.tag) not in SKIP and _local(c.tag) != "shortcut"]
    return JOINED[_local(elem.tag)].join(p for p in parts if p)


def _inline_text(elem: ET.Element, titles: dict[str, str]) -> str:
    """All text of an element flattened to one line (used for table cells and titles)."""
    parts: list[str] = []

    def walk(e: ET.Element) -> None:
        name = _local(e.tag)
        if name in SKIP:
            return
        if name == "xref":
            parts.append(titles.get(e.get("linkend", ""), ""))
            return
        if name in JOINED:
            parts.append(_joined(e, titles))
            return
        if name == "quote":
            parts.append("\u201c")
        if name in BLOCK and parts:
            parts.append(" ")
        parts.append(e.text or "")
        for child in e:
            walk(child)
            parts.append(child.tail or "")
        if name == "ulink" and not _norm("".join(e.itertext())):
            parts.append(e.get("url", ""))
        if name == "quote":
            parts.append("\u201d")
        if name in BLOCK:
            parts.append(" ")

    walk(elem)
    return _norm("".join(parts))


class _Renderer:
    def __init__(self, titles: dict[str, str]):
        self.titles = titles
        self.blocks: list[str] = []
        self.buf: list[str] = []

    def flush(self) -> None:
        text = _norm("".join(self.buf))
        self.buf = []
        if text and re.search(r"\w", text):
            self.blocks.append(text)

    def render(self, elem: ET.Element) -> None:
        name = _local(elem.tag)
        if name in SKIP:
            return
        if name == "row":
            self.flush()
            cells = [_inline_text(c, self.titles) for c in elem if _local(c.tag) == "entry"]
            if any(cells):
                self.blocks.append(" | ".join(cells))
            return
        if name == "xref":
            self.buf.append(self.titles.get(elem.get("linkend", ""), ""))
            return
        if name in JOINED:
            self.buf.append(_joined(elem, self.titles))
            return
        block = name in BLOCK
        if block:
            self.flush()
        if name == "quote":
            self.buf.append("\u201c")
        self.buf.append(elem.text or "")
        for child in elem:
            self.render(child)
            self.buf.append(child.tail or "")
        if name == "ulink" and not _norm("".join(elem.itertext())):
            self.buf.append(elem.get("url", ""))
        if name == "quote":
            self.buf.append("\u201d")
        if block:
            self.flush()


def parse_docbook(xml_text: str, general: dict[str, str], unknown: set[str] | None = None) -> ET.Element:
    """Parse one DocBook file after expanding its entities (DOCTYPE and XIncludes removed)."""
    text = _XML_DECL.sub("", xml_text, count=1)
    text = _DOCTYPE.sub("", text, count=1)
    text = _COMMENT.sub("", text)
    text = _XI_INCLUDE.sub("", text)
    text = expand_entities(text, general, unknown)
    return ET.fromstring(text)


def collect_titles(root: ET.Element, titles: dict[str, str]) -> dict[str, str]:
    """``id -> title`` of every titled element (targets of ``xref``)."""
    for elem in root.iter():
        ident = elem.get("id")
        if not ident:
            continue
        title = next((c for c in elem if _local(c.tag) == "title"), None)
        if title is not None:
            titles.setdefault(ident, _inline_text(title, {}))
    return titles


def docbook_to_paragraphs(root: ET.Element, titles: dict[str, str] | None = None) -> list[str]:
    renderer = _Renderer(titles or {})
    renderer.render(root)
    renderer.flush()
    return renderer.blocks


def docbook_to_text(xml_text: str, general: dict[str, str] | None = None) -> str:
    """Plain text (paragraphs separated by blank lines) of a DocBook snippet or file."""
    root = parse_docbook(xml_text, general or {})
    return "\n\n".join(docbook_to_paragraphs(root, collect_titles(root, {})))


def reading_order(guide_dir: Path) -> list[str]:
    """The guide's files in reading order: follow ``xi:include`` from ``index.docbook``;
    files not reached are appended in name order."""
    order: list[str] = []

    def visit(name: str) -> None:
        path = guide_dir / name
        if name in order or not path.is_file():
            return
        order.append(name)
        for href in re.findall(r"<xi:include\s[^>]*href=\"([^\"]+)\"", _COMMENT.sub("", path.read_text(encoding="utf-8"))):
            visit(href)

    visit(MAIN_FILE)
    order.remove(MAIN_FILE) if MAIN_FILE in order else None
    rest = sorted(p.name for p in guide_dir.glob("*.xml") if p.name not in order)
    return order + rest


def word_count(text: str) -> int:
    return len(text.split())


@dataclass
class GuideSplit:
    train: str
    heldout: str
    licence_text: str
    chapters: list[dict]  # {"file", "title", "split", "words"} in reading order
    unknown_entities: list[str]

    @property
    def train_words(self) -> int:
        return word_count(self.train)

    @property
    def heldout_words(self) -> int:
        return word_count(self.heldout)


def split_guide(guide_dir: Path, heldout: tuple[str, ...] = HELDOUT_CHAPTERS) -> GuideSplit:
    """Clean every chapter of the guide and split by chapter into train / held-out text."""
    guide_dir = Path(guide_dir)
    main = (guide_dir / MAIN_FILE).read_text(encoding="utf-8") if (guide_dir / MAIN_FILE).is_file() else ""
    dtd = _DOCTYPE_SYSTEM.search(main)
    dtd_path = guide_dir / (dtd.group(1) if dtd else "gnc-gui-C.dtd")
    general = load_entities(dtd_path).general if dtd_path.is_file() else {}
    unknown: set[str] = set()
    files = reading_order(guide_dir)
    missing = [name for name in heldout if name not in files]
    if missing:
        raise SpearError(f"held-out chapters {missing} are not in {guide_dir}; is this the GnuCash guide?")
    roots = {name: parse_docbook((guide_dir / name).read_text(encoding="utf-8"), general, unknown) for name in files}
    titles: dict[str, str] = {}
    for root in roots.values():
        collect_titles(root, titles)
    train, held, chapters, licence = [], [], [], ""
    for name in files:
        root = roots[name]
        text = "\n\n".join(docbook_to_paragraphs(root, titles))
        title_elem = next((c for c in root if _local(c.tag) == "title"), None)
        title = _inline_text(title_elem, {}) if title_elem is not None else name
        if name == LICENCE_FILE:
            licence = text
        if name in EXCLUDED_FILES:
            split = "excluded"
        else:
            split = "heldout" if name in heldout else "train"
            (held if split == "heldout" else train).append(text)
        chapters.append({"file": name, "title": title, "split": split, "words": word_count(text)})
    return GuideSplit(
        train="\n\n".join(t for t in train if t) + "\n",
        heldout="\n\n".join(t for t in held if t) + "\n",
        licence_text=licence,
        chapters=chapters,
        unknown_entities=sorted(unknown),
    )


# ---- preparation ---------------------------------------------------------------------------
PACKAGE = "gnucash-docs"
KEY = "gnucash_deb"
DEFAULT_LICENCE = "GFDL-NIV-1.1+"
LICENCE_NOTE = "GNU FDL 1.1 or later, no Invariant Sections, no Front-Cover or Back-Cover Texts"


def copyright_licence(text: str) -> str:
    """Licence short name of the ``Files: *`` stanza of a Debian copyright file."""
    stanza = re.search(r"^Files:\s*\*\s*$(.*?)(?:^\s*$|\Z)", text, re.M | re.S)
    found = re.search(r"^License:\s*(\S+)", stanza.group(1) if stanza else text, re.M)
    return found.group(1) if found else DEFAULT_LICENCE


def locate_guide(local: str | None, downloads: Path, workdir: Path) -> tuple[Path, dict, str]:
    """(dir of the English guide's XML, source record, Debian copyright text)."""
    asset = "gnucash_train"
    if local:
        path = sources.check_local(local, KEY, asset)
        source = {"kind": "local", "key": f"assets.local.{KEY}", "path": str(path.resolve())}
        if path.is_dir():
            guide = path if (path / MAIN_FILE).is_file() else path / GUIDE_SUBDIR
            if not (guide / MAIN_FILE).is_file():
                raise SpearError(f"asset {asset!r}: assets.local.{KEY}={path} is neither a .deb nor a dir holding {MAIN_FILE}")
            return guide, source, ""
        deb = path
    else:
        deb = sources.apt_download(PACKAGE, downloads, asset=asset, key=KEY, example="/path/to/gnucash-docs_4.13-1_all.deb")
        source = {"kind": "debian", "package": PACKAGE, "version": sources.deb_version(deb), "how": "apt-get download",
                  "artifact": str(deb)}  # fmt: skip
    source |= {"sha256": file_sha256(deb), "bytes": deb.stat().st_size}
    if "version" not in source:
        source["version"] = sources.deb_version(deb)
    sources.extract_deb(deb, workdir, (GUIDE_SUBDIR + "/", COPYRIGHT_FILE))
    guide = workdir / GUIDE_SUBDIR
    if not (guide / MAIN_FILE).is_file():
        raise SpearError(f"asset {asset!r}: {deb} holds no {GUIDE_SUBDIR}/{MAIN_FILE}; set assets.local.{KEY} to a gnucash-docs .deb")
    copyright_path = workdir / COPYRIGHT_FILE
    return guide, source, copyright_path.read_text(encoding="utf-8") if copyright_path.is_file() else ""


def prepare(train_path: Path, heldout_path: Path, local: str | None, downloads: Path, status=lambda msg: None) -> dict:
    """Write the train / held-out text (and the GFDL text beside them); returns manifest fields
    ``{asset: {"source", "licence", "details"}}`` for ``gnucash_train`` and ``gnucash_heldout``."""
    import tempfile

    from spear.io.atomic import write_text_atomic

    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gnucash-", dir=downloads) as work:
        status("locating the GnuCash guide")
        guide, source, copyright_text = locate_guide(local, downloads, Path(work))
        status("cleaning the GnuCash guide")
        split = split_guide(guide)
    licence = copyright_licence(copyright_text) if copyright_text else DEFAULT_LICENCE
    licence = f"GFDL-1.1+ (Debian copyright: {licence}; {LICENCE_NOTE})"
    write_text_atomic(train_path, split.train)
    write_text_atomic(heldout_path, split.heldout)
    if split.licence_text:
        notice = (f"The finance corpus (train.txt, heldout.txt) is derived from the GnuCash Tutorial and Concepts "
                  f"Guide (Debian package {PACKAGE} {source.get('version', '')}), (c) the GnuCash Documentation Team "
                  f"and contributors, licensed under the {LICENCE_NOTE}. Cleaned to plain text by spear-mm.\n\n")  # fmt: skip
        write_text_atomic(train_path.parent / "COPYING-GFDL.txt", notice + split.licence_text + "\n")
    total = split.train_words + split.heldout_words
    common = {"chapters": split.chapters, "total_words": total, "train_words": split.train_words,
              "heldout_words": split.heldout_words, "heldout_fraction": round(split.heldout_words / max(total, 1), 4),
              "heldout_chapters": list(HELDOUT_CHAPTERS), "excluded_files": list(EXCLUDED_FILES),
              "unknown_entities": split.unknown_entities}  # fmt: skip
    return {
        "gnucash_train": {"source": source, "licence": licence, "details": {"split": "train", "words": split.train_words, **common}},
        "gnucash_heldout": {"source": source, "licence": licence, "details": {"split": "heldout", "words": split.heldout_words, **common}},
    }
