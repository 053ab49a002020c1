"""The shape of the package: no import cycles, one stage registry that the CLI and pipelines share, and
one class per cell tokenization scheme."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import biomask
from biomask.stages import STAGES

PACKAGE = Path(biomask.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _import_graph() -> dict[str, set[str]]:
    """Module -> the biomask modules it imports, at module level or inside functions alike. A package
    does not count as importing its own submodules' parents (`biomask.a.b` importing `biomask.a`)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = module.split(".")
                    keep = len(parts) - node.level + (1 if path.name == "__init__.py" else 0)
                    base = ".".join(parts[:keep] + ([base] if base else []))
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target not in (module, "biomask") and not module.startswith(target + "."):
                    graph[module].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_package_has_no_import_cycle():
    graph = _import_graph()
    assert "biomask.cli" in graph and "biomask.stages" in graph["biomask.cli"]
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_pipelines_do_not_import_the_cli():
    graph = _import_graph()
    assert not any("biomask.cli" in graph[m] for m in graph if m.startswith("biomask.pipelines"))


def test_every_name_a_package_exports_lazily_imports_and_the_readmes_python_names_exist(repo):
    """The README named `biomask.training.pretrain`, which was not importable from there."""
    import importlib
    import re

    for package in ("biomask", "biomask.training", "biomask.models", "biomask.masking"):
        module = importlib.import_module(package)
        for name in module.__all__:
            assert getattr(module, name) is not None, (package, name)
    readme = (repo / "README.md").read_text()
    named = set(re.findall(r"`(biomask(?:\.[a-z_]+)+)(?:\(|`)", readme)) - {"biomask.run_id"}  # an MLflow tag
    assert len(named) >= 7, named
    for dotted in sorted(named):
        parent, _, leaf = dotted.rpartition(".")
        try:
            importlib.import_module(dotted)
            continue
        except ImportError:
            pass
        assert hasattr(importlib.import_module(parent), leaf), f"README names {dotted}, which does not exist"


def test_every_registered_stage_is_a_cli_command_with_its_schema():
    """The CLI builds its stage commands from the registry, so a pipeline can run each of them."""
    from biomask.cli import build_parser
    from biomask.pipelines.commands import COMMANDS, is_available

    parser = build_parser()
    assert COMMANDS is STAGES
    for stage in STAGES.values():
        args = parser.parse_args([*stage.argv, "--print-config"])
        assert args.schema == stage.schema
        assert is_available(stage) and stage.config_class() is not None


def test_every_cell_scheme_says_what_its_records_imply():
    """A scheme is one class in the registry: its fields reach the model through the collator, its
    defaults are values the configs accept, and a prep config can name it."""
    from typing import get_args

    from biomask.batch import TOKEN_FIELDS
    from biomask.cells.config import TokenizerConfig
    from biomask.cells.tokenize import SCHEMES
    from biomask.masking.config import MaskingConfig
    from biomask.training.config import ModelConfig

    targets = get_args(MaskingConfig.model_fields["target"].annotation)
    value_embeddings = get_args(ModelConfig.model_fields["value_embedding"].annotation)
    for name, scheme in SCHEMES.items():
        assert scheme.name == name and TokenizerConfig(scheme=name).scheme == name
        assert isinstance(scheme.order_free, bool) and isinstance(scheme.complete_profile, bool)
        assert set(scheme.fields) <= set(TOKEN_FIELDS)
        assert scheme.default_target in targets and scheme.value_embedding in value_embeddings
        assert scheme.default_target != "bins" or scheme.writes_bins()
    names = [repr(name) for name in SCHEMES]
    listed = f"{', '.join(names[:-1])} or {names[-1]}"  # how pydantic lists a Literal's values
    with pytest.raises(ValueError, match=listed):
        TokenizerConfig(scheme="ranked")


def test_a_cell_scheme_that_cannot_serve_is_refused_where_it_is_registered():
    """A subclass that keeps its parent's name would replace the parent in SCHEMES; one that forgets
    `encode` or what its records imply would fail in prep or training instead, without its name."""
    import numpy as np

    from biomask.cells.tokenize import Encoded, RankScheme, Scheme, register

    class TopRank(RankScheme):  # a variant that forgot its own `name`
        pass

    with pytest.raises(TypeError, match="TopRank: the name 'rank' is RankScheme's"):
        register(RankScheme, TopRank)

    class NoEncode(Scheme):
        name, order_free, default_target, value_embedding = "no-encode", True, "tokens", "none"

        @classmethod
        def from_config(cls, cfg, vocab):
            return cls()

    with pytest.raises(TypeError, match="NoEncode does not implement encode"):
        register(NoEncode)

    class Unsaid(Scheme):
        name = "unsaid"

        @classmethod
        def from_config(cls, cfg, vocab):
            return cls()

        def encode(self, block, scale, cells):
            return Encoded(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))

    with pytest.raises(TypeError, match="Unsaid does not set order_free, default_target, value_embedding"):
        register(Unsaid)
    assert set(register(RankScheme)) == {"rank"}


def test_a_scheme_built_on_the_panel_encodes_as_itself_and_counts_as_a_whole_profile(monkeypatch, tmp_path):
    """A contributor's PanelScheme subclass (sqrt values instead of log1p) was registered and named in
    the manifest, yet `for_input` built a plain PanelScheme: prep and embed wrote log1p values under
    its name. And the report, `fit_cells` and the loss units recognised whole profiles by the name
    `panel` alone."""
    import numpy as np
    import scipy.sparse as sp

    from biomask.cells import tokenize
    from biomask.cells.tokenize import NUM_SPECIAL, PanelScheme, complete_profile, register

    class PanelSqrt(PanelScheme):
        name = "panel_sqrt"

        def encode(self, block, scale, cells):
            encoded = super().encode(block, scale, cells)
            encoded.values[:] = 7.0  # recognisably its own
            return encoded

    monkeypatch.setattr(tokenize, "SCHEMES", {**tokenize.SCHEMES, **register(PanelSqrt)})
    scheme = PanelSqrt(NUM_SPECIAL + 3).for_input(np.arange(NUM_SPECIAL, NUM_SPECIAL + 3))
    assert type(scheme) is PanelSqrt
    block = sp.csr_matrix(np.array([[1.0, 0.0, 2.0]], dtype=np.float32))
    assert set(scheme.encode(block, np.ones(1, np.float32), np.arange(1)).values.tolist()) == {7.0}
    assert complete_profile("panel") and complete_profile("panel_sqrt")
    assert not complete_profile("binned") and not complete_profile("made-up") and not complete_profile(None)
    # its users: the report's loss unit, and fit_cells' init_from (a binned model is refused by name)
    import json

    from biomask.embedding.fit import _check_init_from
    from biomask.errors import InputError
    from biomask.models import pretrained
    from biomask.models.checkpoint_config import CHECKPOINT_FORMAT
    from biomask.report.collect import PretrainRun

    run = PretrainRun(
        tmp_path,
        "x",
        {},
        {"architecture": {"target": "values", "scheme": "panel_sqrt"}},
        None,
        None,
        np.zeros(0),
        {},
    )
    assert run.loss_unit == "standardised-MSE units"
    monkeypatch.setattr(pretrained, "load_pretrained", lambda path: None)  # the weights are not the point
    for scheme in ("panel_sqrt", "binned", "rank"):
        (tmp_path / scheme).mkdir()
        (tmp_path / scheme / "config.json").write_text(
            json.dumps({"format": CHECKPOINT_FORMAT, "modality": "cells", "scheme": scheme})
        )
    # fit_cells prepares the panel scheme itself: a checkpoint of another one, even a panel subclass,
    # is refused before it is continued on values of the wrong kind (it then refused its own output)
    for scheme in ("panel_sqrt", "binned", "rank"):
        with pytest.raises(InputError, match=f"of the {scheme} scheme; fit_cells continues"):
            _check_init_from(tmp_path / scheme)
    with pytest.raises(InputError, match="biomask pretrain model.init_from"):
        _check_init_from(tmp_path / "panel_sqrt")


def test_the_model_card_names_every_schemes_ratio_as_trained():
    """The exported card spelled out R²MAE's range only: "Masking: beta_sample" hid what it trained on."""
    from biomask.export.hf import card_masking

    assert (
        card_masking(
            {
                "scheme": "r2mae",
                "ratio": {"kind": "uniform", "low": 0.15, "high": 0.45, "granularity": "batch"},
            }
        )
        == "R²MAE, mask ratio ~ U(0.15, 0.45) per batch"
    )
    assert (
        card_masking({"scheme": "fixed", "ratio": {"kind": "fixed", "value": 0.4, "granularity": "batch"}})
        == "fixed, mask ratio 40%"
    )
    assert (
        card_masking(
            {
                "scheme": "scgpt",
                "ratio": {"kind": "discrete", "values": [0.25, 0.5, 0.75], "granularity": "sample"},
            }
        )
        == "scgpt, mask ratio {0.25, 0.5, 0.75} per sample"
    )


def test_every_model_kind_is_named_once_and_registered():
    """A kind a config accepts is one a checkpoint can record and the registry can build."""
    from typing import get_args

    from biomask.models.config import EncoderConfig, ModelKind
    from biomask.models.kinds import MODEL_KINDS
    from biomask.training.config import ModelConfig

    kinds = set(get_args(ModelKind))
    assert set(MODEL_KINDS) == kinds
    assert ModelConfig.model_fields["kind"].annotation is ModelKind
    assert {ModelConfig(kind=k, preset="tiny").kind for k in kinds} == kinds
    assert EncoderConfig(vocab_size=10, kind="cnn").kind == "cnn"


def test_a_model_kind_without_the_interface_is_refused_where_it_is_registered():
    """Not after training, when evaluate or embed first call the missing method."""
    import torch
    from torch import nn

    from biomask.models.kinds import checked

    class NoEmbed(nn.Module):
        def forward(self, batch):
            return {}

        def features(self, batch, pooling="mean", layer=-1):
            return torch.zeros(1)

        def num_parameters(self):
            return 0

    with pytest.raises(TypeError, match="'gru' \\(NoEmbed\\) does not define embed, poolings"):
        checked({"gru": NoEmbed})

    class NoForward(NoEmbed):
        forward = nn.Module.forward
        embed = NoEmbed.features
        poolings = ("mean",)

    with pytest.raises(TypeError, match="does not define forward"):
        checked({"x": NoForward})

    class NoFamily(NoForward):
        forward = NoEmbed.forward

    # without a family the trainer would not know how to resolve its config (it once fell through
    # to the transformer's, and a GRU trained with MAE corruption and position flags it never read)
    with pytest.raises(TypeError, match="'x' \\(NoFamily\\) has family None; give the class one of tokens, "):
        checked({"x": NoFamily})
    NoFamily.family = "sequence"
    assert checked({"x": NoFamily}) == {"x": NoFamily}


def test_a_new_kind_of_a_family_resolves_through_that_familys_checks(monkeypatch, genome_store):
    """The pretrain config of a kind registered beside the cnn gets the cnn's checks and records its
    own name: nothing in the trainer names the kinds of a family."""
    from biomask.config import load_config
    from biomask.errors import InputError
    from biomask.models import kinds
    from biomask.store import TokenStore
    from biomask.training.architecture import build_architecture
    from biomask.training.config import PretrainConfig
    from biomask.training.data import DataSpec

    monkeypatch.setitem(kinds.MODEL_KINDS, "cnn2", kinds.MODEL_KINDS["cnn"])
    config = Path(biomask.__file__).parent.parent / "configs/pretrain/dna-cnn-quick.yaml"
    base = [f"data.store={genome_store}", "output=unused"]
    cfg = load_config(PretrainConfig, config, base)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"kind": "cnn2"})})
    spec = DataSpec.from_store(TokenStore(genome_store))
    arch = build_architecture(cfg, spec)
    assert arch.kind == "cnn2" and not arch.positions and arch.decoder_layers == 0
    mae = load_config(PretrainConfig, config, [*base, "masking.scheme=mae75"])
    mae = mae.model_copy(update={"model": mae.model.model_copy(update={"kind": "cnn2"})})
    with pytest.raises(
        InputError, match="not possible with model.kind=cnn2: it reads every position in place"
    ):
        build_architecture(mae, spec)


def test_a_kind_with_presets_of_its_own_is_sized_and_checked_from_the_registry(monkeypatch):
    """A new kind's sizes are one entry in KIND_PRESETS: the config reads them and refuses the presets
    it lacks (there was one if-branch per kind in the config schema)."""
    from biomask.models.config import KIND_PRESETS
    from biomask.training.config import ModelConfig

    tiny = {"d_model": 16, "n_layers": 1, "n_heads": 1, "d_ff": 32}
    monkeypatch.setitem(KIND_PRESETS, "panel_transformer", {"tiny": tiny})
    assert ModelConfig(kind="panel_transformer", preset="tiny").sizes() == tiny
    with pytest.raises(
        ValueError, match="model.kind panel_transformer has presets tiny \\(or custom\\), not small"
    ):
        ModelConfig(kind="panel_transformer", preset="small")
    with pytest.raises(ValueError, match="model.kind cnn has presets tiny, small \\(or custom\\), not base"):
        ModelConfig(kind="cnn", preset="base")


def test_the_readmes_masking_tables_list_every_registered_scheme_and_ratio_kind(repo):
    """The README's schemes table and ratio-kind list are written by hand: a scheme or kind added to
    the registry without them is one a user cannot find."""
    import typing

    from biomask.masking.config import SCHEMES, RatioConfig

    readme = (repo / "README.md").read_text()
    table = readme[readme.index("| `masking.scheme` | ratio |") :]
    table = table[: table.index("\n\n")]
    assert [name for name in SCHEMES if f"\n| `{name}`" not in table] == []
    kinds = readme[readme.index("- `masking.ratio.kind`:") :].split("\n- ")[0]
    assert [
        k for k in typing.get_args(RatioConfig.model_fields["kind"].annotation) if f"`{k}`" not in kinds
    ] == []


def test_the_suite_collects_the_same_test_ids_every_time(repo):
    """`make test` runs two pytest-xdist workers, which refuse to start when they collect different
    test ids: a parameter holding the time (a gzip header's mtime) made CI fail whenever the two
    collections fell in different seconds."""
    import subprocess
    import sys
    import time

    def collect() -> list[str]:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
            cwd=repo, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return [line for line in done.stdout.splitlines() if "::" in line]

    first = collect()
    time.sleep(1.1)  # a time in seconds in any id differs now
    assert first and collect() == first
