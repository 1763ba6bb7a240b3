"""policy=optimized: per-unit t fitted through the merged model on calibration text (SPEC §1.8)."""

from __future__ import annotations

import random

import pytest
import torch

from spear.errors import SpearError

BROKEN = (1, 3)  # layers the "CPT" model breaks: restoring them helps both losses
WINDOW = 64


def _text(words: str, seed: int, n: int = 900) -> str:
    rng = random.Random(seed)
    vocab = words.split()
    return " ".join(rng.choice(vocab) for _ in range(n))


@pytest.fixture(scope="module")
def cpt_pair(tiny_llama_dir, tmp_path_factory):
    """A base trained on general text, and a 'CPT' of it: trained on domain text, layers BROKEN then damaged."""
    from transformers import AutoModelForCausalLM

    from spear.models.tiny import byte_tokenizer

    root = tmp_path_factory.mktemp("optimized")
    general = _text("the cat sat on a mat and the dog ran to the park with a red ball", 0)
    domain = _text("ledger debit credit accrual invoice equity liability asset revenue audit", 1)
    (root / "general.txt").write_text(general)
    (root / "domain.txt").write_text(domain)
    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)

    def train(text: str, steps: int) -> None:
        ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(steps)
        model.train()
        for _ in range(steps):
            starts = torch.randint(0, ids.numel() - 129, (8,), generator=gen)
            batch = torch.stack([ids[s:s + 128] for s in starts])
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()

    train(general + " " + domain, 40)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    train(domain, 30)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(7)
        for name, param in model.named_parameters():
            if any(f"layers.{layer}." in name for layer in BROKEN) and param.ndim == 2:
                param.add_(0.5 * param.std() * torch.randn(param.shape, generator=gen))
    model.save_pretrained(root / "adapted")
    tok.save_pretrained(root / "adapted")
    return root


def _proxy(root):
    from spear.config.schema import ProxyConfig

    corpus = {"max_tokens": 256}
    return ProxyConfig.model_validate({
        "general": {"name": "general", "source": str(root / "general.txt"), **corpus},
        "domain": {"name": "domain", "source": str(root / "domain.txt"), **corpus},
        "max_length": WINDOW, "stride": WINDOW,
    })


def _policy(**values):
    from spear.config.schema import OptimizedPolicy

    return OptimizedPolicy(**{"window": WINDOW, "calibration_tokens": 1024, "steps": 30, "windows_per_step": 2,
                             "report_tokens": 1024, **values})


def _load(path):
    from transformers import AutoModelForCausalLM

    from spear.models.tiny import byte_tokenizer

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval(), byte_tokenizer()


def _calibration_objective(model, tokenizer, root, tmap, merge, domain_weight: float) -> float:
    """The fit's objective on its whole calibration slices, for the model merged at ``tmap`` by the merger."""
    from spear.evaluation.proxy import calibration_text
    from spear.merging.inmemory import InMemoryMerger

    proxy = _proxy(root)
    merger = InMemoryMerger(model, root / "base", merge)
    merger.apply(tmap)
    losses = {}
    with torch.no_grad():
        for role in ("general", "domain"):
            ids = calibration_text(tokenizer, proxy, role, 1024, "policy.calibration_tokens").ids
            windows = [ids[i:i + WINDOW] for i in range(0, ids.numel() - WINDOW + 1, WINDOW)]
            nll = [torch.nn.functional.cross_entropy(model(input_ids=w[None]).logits[0, :-1], w[1:], reduction="sum")
                   for w in windows]
            losses[role] = float(sum(nll)) / sum(w.numel() - 1 for w in windows)
    merger.reset()
    return losses["general"] + domain_weight * losses["domain"]


@pytest.mark.parametrize("granularity", ["layer", "module", "tied"])
def test_the_fit_beats_every_uniform_point_on_its_objective_with_t_in_the_unit_interval(cpt_pair, granularity):
    from spear.config.schema import LinearMerge
    from spear.merging.optimize import fit_tmap
    from spear.merging.plan import TMap

    model, tok = _load(cpt_pair / "adapted")
    merge = LinearMerge()
    policy = _policy(tie_layers=True) if granularity == "tied" else _policy(granularity=granularity)
    tmap, record = fit_tmap(model, tok, cpt_pair / "base", policy, _proxy(cpt_pair), merge)
    assert all(0.0 <= t <= 1.0 for t in record["t"])
    if granularity == "tied":  # two parameters: every layer at one t, the non-layer tensors at another
        assert record["units"] == ["layers", "non_layer"] and set(tmap.layer_t.values()) == {record["t"][0]}
        assert tmap.non_layer_t == record["t"][1]
    fitted = _calibration_objective(model, tok, cpt_pair, tmap, merge, policy.domain_weight)
    # the TMap merges to the model that was optimised
    assert fitted == pytest.approx(record["after"]["objective"], rel=1e-4)
    uniform = [_calibration_objective(model, tok, cpt_pair, TMap.everywhere(4, t), merge, policy.domain_weight)
               for t in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert record["before"]["objective"] == pytest.approx(uniform[2], rel=1e-4)  # it starts at uniform t=0.5
    assert fitted < min(uniform), (fitted, uniform)
    if granularity == "layer":  # the broken layers are restored more than the ones that carry the domain gain
        layer_t = tmap.layer_t
        assert min(layer_t[b] for b in BROKEN) > max(layer_t[k] for k in layer_t if k not in BROKEN)


def test_calibration_text_follows_the_evaluated_slice(cpt_pair):
    from spear.config.schema import SlerpMerge
    from spear.merging.optimize import fit_tmap

    model, tok = _load(cpt_pair / "adapted")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, record = fit_tmap(model, tok, cpt_pair / "base", _policy(steps=2), _proxy(cpt_pair), SlerpMerge())
    for role in ("general", "domain"):
        calibration = record["calibration"][role]
        assert calibration["part"] == "calibration" and calibration["evaluated_tokens"] == 256
        assert calibration["tokens"] == 1023  # scored: every calibration token but the first
    # token positions: evaluation reads [0, 256) of each corpus, the fit [256, 1280) of the same tokenisation
    from spear.evaluation.perplexity import tokenize_corpus
    from spear.evaluation.proxy import ProxyEvaluator, calibration_text, read_corpus

    proxy = _proxy(cpt_pair)
    evaluated = {role: text.ids for role, text in ProxyEvaluator(tok, proxy).texts.items()}
    for role in ("general", "domain"):
        whole = tokenize_corpus(tok, read_corpus(getattr(proxy, role).source, role), 256 + 1024)
        calib = calibration_text(tok, proxy, role, 1024, "policy.calibration_tokens").ids
        assert torch.equal(torch.cat([evaluated[role], calib]), whole)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # the model is left as it was
    assert not any(p.requires_grad is False for p in model.parameters())


def test_slerp_and_linear_fits_merge_like_the_in_memory_merger(cpt_pair):
    """The differentiable merged parameters equal the merger's at the same t map, for both kernels."""
    from spear.config.schema import LinearMerge, OptimizedPolicy, SlerpMerge
    from spear.merging.inmemory import InMemoryMerger
    from spear.merging.optimize import MergedParameters, fit_units, tensor_weights, tmap_of
    from spear.models.layer_map import layer_map_for

    model, _ = _load(cpt_pair / "adapted")
    lmap = layer_map_for(model.config)
    names = [n for n, _ in model.named_parameters()]
    for merge in (LinearMerge(), SlerpMerge()):
        for policy in (OptimizedPolicy(granularity="module"), OptimizedPolicy(fit_non_layer=False, non_layer_t=0.3)):
            units = fit_units(policy, 4)
            ts = torch.linspace(0.1, 0.9, len(units))
            params = MergedParameters(model, cpt_pair / "base", merge, tensor_weights(units, policy, 4, lmap, names, merge))(ts)
            merger = InMemoryMerger(model, cpt_pair / "base", merge)
            merger.apply(tmap_of(units, ts.tolist(), policy, 4))
            for name, param in model.named_parameters():
                if name in params:
                    assert torch.allclose(params[name], param, atol=1e-5), (merge.name, name)
            merger.reset()


def test_kernels_that_filter_the_delta_are_refused(cpt_pair):
    from spear.config.schema import TiesMerge
    from spear.merging.optimize import fit_tmap

    model, tok = _load(cpt_pair / "adapted")
    with pytest.raises(SpearError, match="merge=ties is not differentiable"):
        fit_tmap(model, tok, cpt_pair / "base", _policy(), _proxy(cpt_pair), TiesMerge())
