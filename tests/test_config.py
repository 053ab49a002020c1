"""Config files: strict schemas, errors naming key and file, command-line overrides, resolved output."""

from __future__ import annotations

import pytest
import yaml

from biomask.config import dump_config, load_config
from biomask.dna.config import DNAPrepConfig
from biomask.errors import ConfigError
from biomask.training.config import PretrainConfig


def write(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


BASE = "inputs:\n  - dataset: uci-splice\noutput: out\n"


def test_defaults_fill_the_resolved_config(tmp_path):
    cfg = load_config(DNAPrepConfig, write(tmp_path, BASE))
    resolved = yaml.safe_load(dump_config(cfg))
    assert resolved["tokenizer"]["kind"] == "char"
    assert resolved["split"]["seed"] == 0
    assert resolved["cleaning"]["ambiguous"] == "n_token"


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, BASE + "tokenizer:\n  knd: kmer\n")
    with pytest.raises(ConfigError) as err:
        load_config(DNAPrepConfig, path)
    message = str(err.value)
    assert str(path) in message and "tokenizer.knd" in message
    assert "kind" in message  # the allowed keys are listed


def test_wrong_type_names_key_and_file(tmp_path):
    path = write(tmp_path, BASE + "windows:\n  length: long\n")
    with pytest.raises(ConfigError) as err:
        load_config(DNAPrepConfig, path)
    assert "windows.length" in str(err.value) and str(path) in str(err.value)
    # strings are not silently coerced to numbers
    with pytest.raises(ConfigError, match="split.seed"):
        load_config(DNAPrepConfig, write(tmp_path, BASE + "split:\n  seed: '3'\n"))


def test_overrides(tmp_path):
    path = write(tmp_path, BASE)
    cfg = load_config(DNAPrepConfig, path, ["tokenizer.kind=kmer", "tokenizer.k=4", "split.val=1e-1"])
    assert (cfg.tokenizer.kind, cfg.tokenizer.k, cfg.split.val) == ("kmer", 4, 0.1)
    with pytest.raises(ConfigError) as err:
        load_config(DNAPrepConfig, path, ["tokenizer.kk=4"])
    assert "tokenizer.kk" in str(err.value) and "command line" in str(err.value)
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(DNAPrepConfig, path, ["tokenizer.kind"])
    with pytest.raises(ConfigError, match="tokenizer.kind"):
        load_config(DNAPrepConfig, path, ["tokenizer.kind=word"])


def test_an_override_value_yaml_would_cut_or_retype_is_refused_with_how_to_quote_it(tmp_path):
    """`output=runs/run #3` read as YAML became `runs/run` (a comment), exit 0: another path read or
    written than the one named; `output=yes` said only "Input should be a valid string (got True)"."""
    path = write(tmp_path, BASE)
    with pytest.raises(ConfigError) as err:
        load_config(DNAPrepConfig, path, ["output=runs/run #3"])
    assert "would be 'runs/run'; quote it, inside the shell's quotes: \"output='runs/run #3'\"" in str(
        err.value
    )
    # the advice pasted into a shell works (the shell keeps the inner quotes)
    assert load_config(DNAPrepConfig, path, ["output='runs/run #3'"]).output == "runs/run #3"
    with pytest.raises(ConfigError, match=r"quote it"):
        load_config(DNAPrepConfig, path, ["inputs=[{path: a.fa}] # the genome"])
    with pytest.raises(ConfigError, match=r"quote it"):  # a date YAML reads is no crash
        load_config(DNAPrepConfig, path, ["output=2024-01-01 #x"])
    assert load_config(DNAPrepConfig, path, ["output=runs/run#3"]).output == "runs/run#3"  # no comment there
    for value, got in (("yes", "True"), ("2024", "2024"), ("null", "None")):
        with pytest.raises(ConfigError) as err:
            load_config(DNAPrepConfig, path, [f"output={value}"])
        said = "a value on the command line is read as YAML: quote it, inside the shell's quotes: \"output='...'\""
        assert f"(got {got}); {said}" in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(DNAPrepConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(DNAPrepConfig, write(tmp_path, "inputs: [\n"))
    with pytest.raises(ConfigError, match="missing required key 'output'"):
        load_config(DNAPrepConfig, write(tmp_path, "inputs:\n  - dataset: x\n"))
    with pytest.raises(ConfigError, match="exactly one of"):
        load_config(DNAPrepConfig, write(tmp_path, "inputs:\n  - {dataset: x, path: y}\noutput: o\n"))


def test_every_shipped_dna_config_is_valid(repo):
    for path in sorted((repo / "configs" / "dna").glob("*.yaml")):
        load_config(DNAPrepConfig, path)


@pytest.mark.parametrize(
    "precision, bf16, autocast",
    [("fp32", False, False), ("bf16", False, True), ("bf16-weights", True, False)],
)
def test_precision_picks_one_deepspeed_bf16_mode(precision, bf16, autocast):
    """train.precision bf16 is torch autocast over fp32 weights; bf16-weights is DeepSpeed's bf16."""
    from biomask.training.ds_config import preset_config

    ds = preset_config(2, micro_batch_size=4, precision=precision)
    assert ds["bf16"]["enabled"] is bf16
    assert ds["torch_autocast"]["enabled"] is autocast
    assert ds["torch_autocast"].get("dtype") == ("bfloat16" if autocast else None)


def test_deepspeed_json_contradicting_precision_is_refused(tmp_path):
    from biomask.training.config import PretrainConfig
    from biomask.training.ds_config import build_ds_config

    user = tmp_path / "ds.json"
    user.write_text('{"torch_autocast": {"enabled": true}, "zero_optimization": {"stage": 1}}')
    cfg = PretrainConfig.model_validate(
        {"data": {"store": "x"}, "output": "y", "deepspeed": {"config": str(user)}}
    )
    assert build_ds_config(cfg, precision="bf16")["torch_autocast"]["enabled"] is True
    for precision in ("fp32", "bf16-weights"):
        with pytest.raises(ConfigError, match=r"ds\.json: torch_autocast\.enabled is True.*" + precision):
            build_ds_config(cfg, precision=precision)
    user.write_text('{"bf16": true}')  # DeepSpeed wants an object there
    with pytest.raises(ConfigError, match=r"ds\.json: bf16 must be an object"):
        build_ds_config(cfg, precision="bf16")


def test_deepspeed_stage_auto_is_zero0_alone_and_zero2_across_processes():
    """One process has nothing to partition (ZeRO-2 only costs time on one GPU); several get ZeRO-2."""
    from biomask.training.ds_config import build_ds_config

    cfg = PretrainConfig.model_validate({"data": {"store": "s"}, "output": "o"})
    assert cfg.deepspeed.stage == "auto"
    assert build_ds_config(cfg, precision="fp32", world_size=1)["zero_optimization"]["stage"] == 0
    assert build_ds_config(cfg, precision="fp32", world_size=4)["zero_optimization"]["stage"] == 2
    pinned = PretrainConfig.model_validate({"data": {"store": "s"}, "output": "o", "deepspeed": {"stage": 3}})
    assert build_ds_config(pinned, precision="fp32", world_size=1)["zero_optimization"]["stage"] == 3


def test_an_override_into_a_list_shows_how_to_set_the_list(cli, repo):
    code, _, err = cli("prep", "dna", "-c", repo / "configs/dna/splice.yaml", "inputs.0.path=x.csv")
    assert (
        code == 2
        and "inputs is a value, not a section; a list is set whole: 'inputs=[{dataset: ...}, ...]'" in err
    )


def test_a_key_added_later_keeps_outputs_written_before_it_current():
    """A config key biomask gained later, at the value that does what it did before, neither
    changes the fingerprint nor shows as a changed key: an upgrade does not make old runs stale."""
    import copy

    from biomask.config import ADDED_KEYS, config_diff, config_fingerprint, config_fingerprints
    from biomask.provenance import sha256_json

    assert ADDED_KEYS["model.decorrelation"] == 0.0
    base = ["data.store=runs/prep/x", "output=runs/pretrain/x"]
    now = load_config(PretrainConfig, None, base)
    before = now.model_dump(mode="json")
    for key in (
        "decorrelation",
        "batch_covariate",
        "input_scale",
    ):  # as a run written before the keys existed
        del before["model"][key]
    assert config_fingerprint(now) == sha256_json(before)
    assert config_diff(before, now.model_dump(mode="json")) == []
    other = load_config(PretrainConfig, None, [*base, "model.kind=mlp", "model.decorrelation=0.1"])
    mlp = load_config(PretrainConfig, None, [*base, "model.kind=mlp"])
    assert config_fingerprint(other) != config_fingerprint(mlp)
    assert config_diff(before, other.model_dump(mode="json")) == [
        "model.decorrelation: '(absent)' -> 0.1",
        "model.kind: 'transformer' -> 'mlp'",
    ]
    # a top-level key (prep cells' batch_column) the same way
    from biomask.cells.config import CellsPrepConfig

    prep = load_config(CellsPrepConfig, None, ["inputs=[{dataset: pbmc3k}]", "output=runs/prep/y"])
    old = prep.model_dump(mode="json")
    del old["batch_column"]
    del old["labels"]["min_cells"]  # 2026-12-06, as labels.min_cells
    old_task = copy.deepcopy(old)
    assert (
        config_fingerprint(prep) == sha256_json(old) and config_diff(old, prep.model_dump(mode="json")) == []
    )
    # prep cells' inputs[].task came later than prep dna's (a retrofitted key): a prep cells output
    # written before it holds none, and is still current
    for spec in old_task["inputs"]:
        del spec["task"]
    assert sha256_json(old_task) in config_fingerprints(prep)
    assert config_diff(old_task, prep.model_dump(mode="json")) == []
    batched = load_config(
        CellsPrepConfig, None, ["inputs=[{dataset: pbmc3k}]", "output=runs/prep/y", "batch_column=sample"]
    )
    assert config_fingerprint(batched) != config_fingerprint(prep)
    # a key inside each value of a mapping (a report's evaluations{}.chosen_on) the same way
    from biomask.report.config import ReportConfig

    report = load_config(ReportConfig, None, ["output=o", "evaluations={a: {path: x}, b: {path: y}}"])
    old = report.model_dump(mode="json")
    for spec in old["evaluations"].values():
        del spec["chosen_on"]
    assert (
        config_fingerprint(report) == sha256_json(old)
        and config_diff(old, report.model_dump(mode="json")) == []
    )
    noted = load_config(
        ReportConfig, None, ["output=o", "evaluations={a: {path: x, chosen_on: z}, b: {path: y}}"]
    )
    assert config_fingerprint(noted) != config_fingerprint(report)


def test_keys_added_before_added_keys_existed_keep_older_outputs_current(repo):
    """A prep dna output of 2026-12-03 recorded its inputs without `task`, a pretrain run no
    model.embed_norm, model.objective, optim.fused or train.compile: at their earlier-behaviour
    values those are the same results (the fingerprint they hold is one of the config's). The
    profile autoencoder's embed_norm auto is l2, another embedding: not the same run."""
    from biomask.config import config_diff, config_fingerprint, config_fingerprints
    from biomask.dna.config import DNAPrepConfig
    from biomask.provenance import sha256_json

    prep = load_config(DNAPrepConfig, repo / "configs/dna/splice.yaml", [])
    before = prep.model_dump(mode="json")
    for entry in before["inputs"]:
        del entry["task"]
    assert sha256_json(before) in config_fingerprints(prep)
    assert config_fingerprints(prep)[0] == config_fingerprint(prep)  # today's outputs: as they were
    assert config_diff(before, prep.model_dump(mode="json")) == []

    def written_before(cfg):
        data = cfg.model_dump(mode="json")
        for section, key in [("model", "embed_norm"), ("model", "objective"), ("model", "decorrelation"),
                             ("model", "batch_covariate"), ("model", "input_scale"), ("optim", "fused"),
                             ("train", "compile")]:  # fmt: skip
            del data[section][key]
        return data

    base = ["data.store=runs/prep/x", "output=runs/pretrain/x"]
    cnn = load_config(PretrainConfig, repo / "configs/pretrain/dna-cnn-quick.yaml", base)
    assert sha256_json(written_before(cnn)) in config_fingerprints(cnn)
    # written on 2026-12-02 (an upgrade audit's find): without model.loss, max_visible, ratio_input either
    earliest = written_before(cnn)
    for key in ("loss", "max_visible", "ratio_input"):
        del earliest["model"][key]
    assert sha256_json(earliest) in config_fingerprints(cnn)
    assert config_diff(earliest, cnn.model_dump(mode="json")) == []
    mlp = load_config(PretrainConfig, repo / "configs/pretrain/cells-mlp.yaml", base)
    assert sha256_json(written_before(mlp)) not in config_fingerprints(mlp)
    assert config_diff(written_before(mlp), mlp.model_dump(mode="json")) == [
        "model.embed_norm: '(absent)' -> 'auto'"
    ]
    # the refusal says how to keep such a run rather than train it again (an upgrade walkthrough met it)
    from biomask.training.rundir import _embed_norm_hint

    changed = ";\nchanged keys:\n  model.embed_norm: '(absent)' -> 'auto'"
    assert "model.embed_norm=none reuses it as it is" in _embed_norm_hint(changed)
    assert _embed_norm_hint(changed + "\n  train.steps: 40 -> 80") == ""


def test_evaluations_written_before_their_later_keys_stay_current_unless_they_fine_tune(repo):
    """An evaluation of 2026-12-03 holds none of select_on_val, finetune.dropout / mix / select /
    min_gain_se and device: an upgrade refused it as "a different config" though none of them
    changes an evaluation that does not fine-tune (an upgrade walkthrough found it)."""
    from biomask.config import config_fingerprints
    from biomask.evaluation.config import EvaluateConfig
    from biomask.provenance import sha256_json

    later = [(None, "select_on_val"), ("finetune", "dropout"), ("finetune", "mix"), ("finetune", "select"),
             ("finetune", "min_gain_se"), (None, "device"), ("finetune", "screen_epochs"),
             ("finetune", "fresh_head_lr"), ("finetune", "min_budget_steps"), (None, "standardise"),
             ("splits", "group"), ("splits", "min_shared")]  # fmt: skip

    def written_before(cfg, keys):
        data = cfg.model_dump(mode="json")
        for section, key in keys:
            del (data[section] if section else data)[key]
        return data

    probe = load_config(EvaluateConfig, repo / "configs/evaluate/pbmc68k_reduced.yaml", [])
    assert "finetune" not in probe.protocols
    assert sha256_json(written_before(probe, later)) in config_fingerprints(probe)
    # written between select_on_val and finetune.mix: it holds the first two
    assert sha256_json(written_before(probe, later[2:])) in config_fingerprints(probe)
    tuned = load_config(EvaluateConfig, repo / "configs/evaluate/position-task.yaml", [])
    assert "finetune" in tuned.protocols
    # a fine-tuning evaluation: today's mixing and selection are other results than before them
    assert sha256_json(written_before(tuned, later)) not in config_fingerprints(tuned)


def _error(schema, path, *overrides) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(schema, path, list(overrides))
    return str(err.value)


def test_what_yaml_or_a_typo_would_turn_into_another_setting_is_refused_naming_it(tmp_path):
    """Each of these used to run with a value other than the one written, or to crash after writing."""
    from biomask.cells.config import CellsPrepConfig
    from biomask.evaluation.config import EvaluateConfig

    # a second `split:` section dropped the first; an octal or base-60 number read as another number
    message = _error(DNAPrepConfig, write(tmp_path, BASE + "split:\n  val: 0.2\nsplit:\n  seed: 3\n"))
    assert "cfg.yaml: not valid YAML: key 'split' appears twice in one mapping (lines 4 and 6)" in message
    assert "0755 is a YAML 1.1 octal number (493)" in _error(
        DNAPrepConfig, write(tmp_path, BASE), "split.seed=0755"
    )
    assert "1:30 is a YAML 1.1 base-60 number (90)" in _error(
        PretrainConfig, write(tmp_path, "data: {store: s}\noutput: o\ntrain: {steps: 1:30}\n")
    )
    # merge keys still work (a later key overrides the merged one, as YAML means)
    from biomask.config import parse_yaml

    assert parse_yaml("x: &d {val: 0.3, test: 0.1}\ny:\n  <<: *d\n  val: 0.2\n", "f")["y"] == {
        "val": 0.2,
        "test": 0.1,
    }
    # a mapping that merges and overrides, merged again elsewhere: PyYAML folds the merged keys into
    # the node in place, which must not read as the node's own key written twice
    chained = "base: &b {s: 100, lr: 1}\nmid: &m {<<: *b, s: 200}\ntop: {<<: *m, lr: 2}\n"
    assert parse_yaml(chained, "f")["top"] == {"s": 200, "lr": 2}
    # a file in another encoding is named, whatever the locale
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(BASE.encode() + "# caf\xe9\n".encode("latin-1"))
    assert "latin.yaml, line 4: byte 0xe9 is not UTF-8" in _error(DNAPrepConfig, latin)
    latin.write_bytes(BASE.encode("utf-16"))
    assert "latin.yaml is UTF-16 text; save it as UTF-8" in _error(DNAPrepConfig, latin)
    # no setting means infinity or NaN (an infinite target_sum wrote a store of infinities)
    cells = write(tmp_path, "inputs: [{dataset: pbmc68k_reduced}]\noutput: o\n")
    assert "key 'normalise.target_sum': Input should be a finite number" in _error(
        CellsPrepConfig, cells, "normalise.target_sum=.inf"
    )
    assert "qc.min_genes (500) is above qc.max_genes (100)" in _error(
        CellsPrepConfig, cells, "qc.min_genes=500", "qc.max_genes=100"
    )
    ev = write(tmp_path, "store: s\noutput: o\n")
    assert "key 'finetune.lr': Input should be a finite number" in _error(
        EvaluateConfig, ev, "finetune.lr=.nan"
    )
    # a repeated evaluation seed repeats a split: it was counted as another replicate
    assert "seeds: [1] given more than once" in _error(EvaluateConfig, ev, "seeds=[0,1,1]")
    # seeds numpy cannot take, and Adam's decay rates outside [0, 1): crashed after writing the run folder
    pretrain = write(tmp_path, "data: {store: s}\noutput: o\n")
    assert "train.seed': Input should be greater than or equal to 0" in _error(
        PretrainConfig, pretrain, "train.seed=-1"
    )
    assert "less than or equal to 4294967295" in _error(PretrainConfig, pretrain, "train.seed=99999999999")
    assert "optim.betas: each in [0, 1)" in _error(PretrainConfig, pretrain, "optim.betas=[1.0, 0.99]")
    assert "optim.betas: each in [0, 1)" in _error(PretrainConfig, pretrain, "optim.betas=[-0.1, 0.99]")
    assert "output: a path, not an empty or blank name" in _error(PretrainConfig, pretrain, "output=' '")
    assert "qc.min_counts (500) is above qc.max_counts (100)" in _error(
        CellsPrepConfig, cells, "qc.min_counts=500", "qc.max_counts=100"
    )
    assert "unknown key 'TRAIN'; did you mean 'train'?" in _error(PretrainConfig, pretrain, "TRAIN.steps=3")
    assert "output: a path, not an empty or blank name" in _error(PretrainConfig, pretrain, "output=")
    # a Windows path (a config written there, or typed on WSL) made one folder named `runs\main` here
    for windows in ("runs\\main", "C:/data/run", "d:\\x"):
        assert f"output {windows!r} is a Windows path" in _error(
            PretrainConfig, pretrain, f"output={windows}"
        )
    from biomask.pipelines.schema import Pipeline

    with pytest.raises(ValueError, match=r"run_dir 'runs\\\\x' is a Windows path .*write it with '/'"):
        Pipeline.model_validate(
            {"name": "p", "run_dir": "runs\\x", "stages": {"a": {"command": "report", "config": "c"}}}
        )
    # a key in the wrong case is shown as written, with the key meant
    assert "unknown key 'Output'; did you mean 'output'?" in _error(PretrainConfig, pretrain, "Output=x")
    assert "unknown key 'train.stepz'; did you mean 'steps'?" in _error(
        PretrainConfig, pretrain, "train.stepz=3"
    )
    deep = write(tmp_path, "data: {store: s}\noutput: o\nmodel.init.x: 5\n")
    assert "nest it (model: {init: {x: ...}})" in _error(PretrainConfig, deep)
    dotted = write(tmp_path, "data: {store: s}\noutput: o\ntrain.steps: 5\n")
    assert "unknown key 'train.steps'; a dotted key is the command line's form: in a file, nest it" in _error(
        PretrainConfig, dotted
    )


def test_a_config_that_expands_without_bound_is_refused_before_it_exhausts_memory(tmp_path, monkeypatch):
    """Nine lines of nested anchors claim 10**9 values ('billion laughs'): copying the aliases out (so
    that an override of one stage leaves its anchor's other users) took all memory, then blamed
    block_size. A file nested thousands deep was a RecursionError traceback. Both are refused naming the
    file, and a run folder's recorded config.yaml is read with the same limits."""
    import biomask.config
    from biomask.config import UnreadableRecord, load_recorded_yaml

    levels = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    laughs = write(tmp_path, "\n".join(levels) + "\n")
    assert "cfg.yaml: its anchors and aliases expand to more than 1,000,000 values" in _error(
        DNAPrepConfig, laughs
    )
    with pytest.raises(UnreadableRecord, match="expand to more than"):
        load_recorded_yaml(laughs.read_text(), "run/config.yaml")
    deep = write(tmp_path, "x: " + "[" * 3000 + "]" * 3000 + "\n")
    assert "cfg.yaml: nested too deeply to read" in _error(DNAPrepConfig, deep)
    from biomask.relocation import recorded_config  # every stage's reuse check reads this first

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.yaml").write_text(deep.read_text())
    assert recorded_config(tmp_path / "out") is None  # unreadable: not reused, and no traceback
    # the bound counts values, so a real config (anchors shared by many stages) is far inside it
    monkeypatch.setattr(biomask.config, "MAX_CONFIG_VALUES", 12)
    shared = write(tmp_path, "d: &d {a: 1, b: 2}\ns1: *d\ns2: *d\ns3: *d\n")
    assert "expand to more than 12 values" in _error(DNAPrepConfig, shared)
    monkeypatch.setattr(biomask.config, "MAX_CONFIG_VALUES", 13)
    assert "expand to more than" not in _error(DNAPrepConfig, shared)


def test_every_reader_of_a_recorded_config_keeps_the_limits(tmp_path, monkeypatch):
    """A run folder's config.yaml (damaged, or crafted with nested anchors) is read back by every
    stage's reuse check, --overwrite's message, pipeline previews and the report: each reads it with
    a config file's limits (here lowered, so a small file stands for a billion laughs)."""
    import biomask.config
    from biomask.errors import InputError
    from biomask.outputs import _describe_difference
    from biomask.report.collect import _read_yaml
    from biomask.training.rundir import _changed_keys

    monkeypatch.setattr(biomask.config, "MAX_CONFIG_VALUES", 12)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("d: &d {a: 1, b: 2}\ns1: *d\ns2: *d\ns3: *d\n")
    new = {"d": {"a": 2, "b": 2}}
    assert _describe_difference(run, new) == ""  # not readable: no difference to show, no traceback
    assert _changed_keys(run, new) == ""
    with pytest.raises(InputError, match="config.yaml is corrupt"):
        _read_yaml(run / "config.yaml")
    monkeypatch.setattr(biomask.config, "MAX_CONFIG_VALUES", 1_000)  # within the limits: read as before
    assert "d.a: 1 -> 2" in _describe_difference(run, new) and "d.a: 1 -> 2" in _changed_keys(run, new)


def test_the_shipped_configs_are_listed_printed_whole_and_a_wrong_name_gets_the_near_ones(cli, tmp_path):
    """An installed biomask has no configs/ folder to copy a template from (the README says to copy
    configs/evaluate/motif-task.yaml): `biomask configs` lists every one with what it is for, prints one
    whole (comments included, which --print-config drops), and a misspelt name is refused naming the
    near ones; a missing `configs/...` file points at the list."""
    from biomask.resources import configs_dir

    code, listed, _ = cli("configs")
    shipped = sorted(p.relative_to(configs_dir()).as_posix() for p in configs_dir().rglob("*.yaml"))
    assert code == 0 and all(name in listed for name in shipped)
    assert "evaluate/motif-task.yaml" in listed and "Template: a MOTIF task" in listed
    for spelled in ("configs/evaluate/motif-task.yaml", "./evaluate/motif-task.yaml"):
        code, text, _ = cli("configs", spelled)
        assert code == 0 and text == (configs_dir() / "evaluate" / "motif-task.yaml").read_text(
            encoding="utf-8"
        )
    assert cli("configs", "../pyproject.toml")[0] == 2
    # byte for byte under an ASCII locale too (the configs hold UTF-8 comments: "—", "²"), as a shell
    # redirect copies it; the in-process capture above cannot see the stream's encoding
    import os
    import subprocess
    import sys

    ascii_env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": "ascii"}
    done = subprocess.run([sys.executable, "-m", "biomask", "configs", "evaluate/motif-task.yaml"],
                          capture_output=True, env=ascii_env, check=False)  # fmt: skip
    assert (
        done.returncode == 0 and done.stdout == (configs_dir() / "evaluate" / "motif-task.yaml").read_bytes()
    )
    code, _, err = cli("configs", "pretrain/dna-tny.yaml")
    assert code == 2 and "did you mean pretrain/dna-tiny.yaml" in err, err
    code, _, err = cli("pretrain", "-c", "configs/pretrain/dna-tny.yaml", f"output={tmp_path / 'x'}")
    assert code == 2 and "`biomask configs` lists" in err and not (tmp_path / "x").exists(), err
