"""Stage configs: YAML files validated by one strict schema per stage, overridable from the command line.

A stage's schema is a subclass of `Config`. Unknown keys and wrong types are errors that name the key
and the file (or the command-line override that set it). `load_config` returns the validated
object; `dump_config` writes the fully resolved config (every default filled in) beside the outputs.

    cfg = load_config(DNAPrepConfig, "configs/dna/splice.yaml", ["tokenizer.kind=kmer", "split.seed=3"])
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from biomask.errors import ConfigError
from biomask.provenance import sha256_json
from biomask.resources import shipped_config

# the schemas' keys that name files or folders, at any depth (a list or mapping of them too)
PATH_FIELDS = (
    "output", "store", "path", "init_from", "checkpoint", "checkpoints", "input", "run_dir", "config",
    "pretrain", "provenance",
)  # fmt: skip


def expand_home(value: Any) -> Any:
    """`~` and `~user` at the start of a path (and of each path in a list or mapping) as the shell
    expands them; anything else as it is."""
    if isinstance(value, str):
        return os.path.expanduser(value) if value.startswith("~") else value
    if isinstance(value, list):
        return [expand_home(v) for v in value]
    if isinstance(value, dict):
        return {k: expand_home(v) for k, v in value.items()}
    return value


class Config(BaseModel):
    """Base of every stage schema: unknown keys are errors and values are not silently coerced."""

    # allow_inf_nan=False: `.inf` / `.nan` parse as YAML floats, and no setting means them (an infinite
    # target_sum wrote a store of infinities; a NaN learning rate passed `v <= 0` checks)
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, allow_inf_nan=False)

    @field_validator("output", "run_dir", check_fields=False)
    @classmethod
    def _output_named(cls, value: Any, info: ValidationInfo) -> Any:
        # `output=` is "" and " " a folder named by a space: "" resolved to the working directory
        if isinstance(value, str) and not value.strip():
            raise ValueError(f"{info.field_name}: a path, not an empty or blank name")
        if isinstance(value, str) and ("\\" in value or re.match(r"^[A-Za-z]:[\\/]", value)):
            # a Windows path (a config written there, or on WSL): on Linux `\` is a character of a
            # name, so `runs\main` made one folder of that name in the working directory
            raise ValueError(
                f"{info.field_name} {value!r} is a Windows path (a drive letter, or '\\', which here is part "
                "of a folder's name, not a separator): write it with '/' (WSL reaches C:\\ as /mnt/c)"
            )
        return value

    @field_validator(*PATH_FIELDS, check_fields=False)
    @classmethod
    def _home_expanded(cls, value: Any) -> Any:
        # `output=~/runs/x` as a shell leaves it (quoted, or after `=`): unexpanded it made a folder
        # named `~` in the working directory (one `rm -rf ~` from the user's home), or failed half-way
        return expand_home(value)


# A seed numpy and torch both take (numpy refuses a negative one, torch one of 2**64 or more)
MAX_SEED = 2**32 - 1
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class SplitFractions(Config):
    """A split section's `val` and `test` fractions (each schema gives its own bounds and defaults):
    together they must leave records for train."""

    val: float
    test: float

    @model_validator(mode="after")
    def _leaves_train(self) -> SplitFractions:
        if self.val + self.test >= 1.0:
            raise ValueError("val + test must leave something for train")
        return self


C = TypeVar("C", bound=Config)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` as a float (YAML 1.1 would read it as a string), and refuses
    what YAML 1.1 reads silently otherwise than a user means: a key given twice in one mapping (the
    first is dropped: a copied stage, a second `train:` section) and the octal and base-60 integers
    (`seed: 0755` is 493, `steps: 1:30` is 90)."""

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Checked here, before PyYAML folds a `<<:` merge's keys into the node's own list (which it
        # does in place, once, when the node is first merged or built): only the keys written in the
        # node count, and a key a merge brings in may be overridden, as YAML means.
        checked: set[int] = self.__dict__.setdefault("_checked_nodes", set())
        if id(node) not in checked:
            checked.add(id(node))
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, typing.Hashable) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"key {key!r} appears twice in one mapping (lines {seen[key]} and {line}); YAML "
                        "would keep only the second: merge them, or rename one",
                        key_node.start_mark,
                    )
                if isinstance(key, typing.Hashable):
                    seen[key] = line
        super().flatten_mapping(node)

    def construct_yaml_int(self, node: yaml.Node) -> int:
        text = str(self.construct_scalar(node))
        if re.fullmatch(r"[-+]?0[0-7_]+", text) or ":" in text:
            kind = "base-60" if ":" in text else "octal"
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"{text} is a YAML 1.1 {kind} number ({super().construct_yaml_int(node)}); write the "
                f"number you mean, or quote it if it is text: '{text}'",
                node.start_mark,
            )
        return super().construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, origin: str) -> Any:
    """Parse YAML text; a syntax error names `origin` and the line."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        # the mark names "<unicode string>": the origin says which file or override it is
        text = str(exc).replace('in "<unicode string>", ', "")
        raise ConfigError(f"{origin}: not valid YAML: {text}") from None
    except RecursionError:  # PyYAML composes nested nodes recursively: a file of [[[[...]]]]
        raise ConfigError(
            f"{origin}: nested too deeply to read (hundreds of levels of lists or mappings); a config "
            "needs a few"
        ) from None


def decode_config(raw: bytes, path: str | os.PathLike) -> str:
    """A config file's text: UTF-8 (a byte-order mark allowed) whatever the locale says; another
    encoding is named, with the line of the first byte UTF-8 cannot read."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(f"{path} is UTF-16 text; save it as UTF-8 (biomask reads configs as UTF-8)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}, line {line}: byte {raw[exc.start]:#04x} is not UTF-8 (Latin-1 or a Windows code page?); "
            "save the file as UTF-8"
        ) from None


# Values a config may expand to once its aliases are copied out: far above any real config (the
# largest pipeline has a few thousand), far below what a file of nested anchors can claim (nine lines
# give 10**9, exhausting memory before any check ran).
MAX_CONFIG_VALUES = 1_000_000


def _unshared(value: Any, origin: str = "the config") -> Any:
    """The data with every mapping and list its own: YAML's anchors (`<<: *gpu_training`, `*dna_finetune`)
    give several keys one shared object, so an override of one stage's key changed every stage that
    used the anchor. Refused past MAX_CONFIG_VALUES values."""
    count = 0

    def copy(item: Any) -> Any:
        nonlocal count
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise ConfigError(
                f"{origin}: its anchors and aliases expand to more than {MAX_CONFIG_VALUES:,} values; a config "
                "needs far fewer (is it a YAML 'billion laughs' file?)"
            )
        if isinstance(item, dict):
            return {key: copy(inner) for key, inner in item.items()}
        if isinstance(item, list):
            return [copy(inner) for inner in item]
        return item

    try:
        return copy(value)
    except RecursionError:  # aliases can nest deeper than the file's text shows
        raise ConfigError(f"{origin}: nested too deeply to read; a config needs a few levels") from None


class UnreadableRecord(yaml.YAMLError):
    """A YAML file in an output folder (a recorded config.yaml) too large or deep once its aliases are copied."""


def load_recorded_yaml(text: str, origin: str) -> Any:
    """A YAML file biomask wrote into an output folder, read back (yaml.safe_load, no tags) with the
    limits a config file has: nested anchors there (a crafted or damaged run folder) would otherwise
    expand in the comparisons that read it. Raises yaml.YAMLError, which its readers already handle."""
    try:
        return _unshared(yaml.safe_load(text), origin)
    except (ConfigError, RecursionError) as exc:
        raise UnreadableRecord(
            str(exc) if isinstance(exc, ConfigError) else f"{origin}: nested too deeply"
        ) from None


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping from a file, with errors that name the file."""
    path = Path(path)
    if not path.exists():  # `configs/...` outside a checkout: the copy shipped in the wheel
        path = shipped_config(path) or path
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        shipped = (
            " (`biomask configs` lists the configs biomask ships)" if path.parts[:1] == ("configs",) else ""
        )
        raise ConfigError(f"config file {path} does not exist{shipped}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    text = decode_config(raw, path)
    data = _unshared(parse_yaml(text, str(path)), str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a config must be a mapping of keys to values, found {type(data).__name__}"
        )
    return data


_COMMENT = re.compile(r"(^|\s)#")  # where YAML starts a comment in a plain value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> set[tuple[str, ...]]:
    """Apply `key.sub=value` overrides in place (values parsed as YAML); return the paths they set."""
    touched: set[tuple[str, ...]] = set()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"command-line override {item!r} is not of the form key.sub=value")
        parts = tuple(key.split("."))
        value = parse_yaml(raw, f"command-line override {item!r}") if raw != "" else ""
        if _COMMENT.search(raw) and json.dumps(value, default=str).count("#") < raw.count("#"):
            # `output=runs/run #3`: YAML ends the value at " #" and a run would read or write another path
            quoted = raw.replace("'", "''")  # YAML's single quotes double a quote inside
            # inside a shell's double quotes these would be read by the shell: no copy-paste advice then
            pasted = (
                f"\"{key}='{quoted}'\""
                if not set('$`"\\!') & set(raw)
                else f"{key}='{quoted}' as one argument"
            )
            raise ConfigError(
                f"command-line override {item!r}: YAML reads ' #' as the start of a comment, so the value "
                f"would be {value!r}; quote it, inside the shell's quotes: {pasted}"
            )
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part) if isinstance(node, dict) else None
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                hint = ""
                if isinstance(child, list):  # e.g. inputs.0.path=...: lists are set whole
                    first = child[0] if child else None
                    item_form = (
                        f"{{{next(iter(first))}: ...}}" if isinstance(first, dict) and first else "..."
                    )
                    hint = f"; a list is set whole: '{where}=[{item_form}, ...]'"
                raise ConfigError(f"command-line override {item!r}: {where} is a value, not a section{hint}")
            node = child
        node[parts[-1]] = value
        touched.add(parts)
    return touched


def field_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `Model`, `Model | None` or `list[Model]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = field_model(arg)
        if found is not None:
            return found
    return None


def _allowed_keys(schema: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """The keys a schema accepts at a location (used to suggest fixes for unknown keys)."""
    model: type[BaseModel] | None = schema
    keyed = False  # the last field was a mapping of names to models (a pipeline's stages): skip the name
    for part in loc:
        if model is None:
            return []
        if isinstance(part, int) or keyed:
            keyed = False
            continue
        field = model.model_fields.get(part)
        model = field_model(field.annotation) if field else None
        keyed = field is not None and typing.get_origin(field.annotation) is dict
    return sorted(model.model_fields) if model else []


# names pydantic puts in an error's location for the union member or validator it tried
_TYPE_TAGS = frozenset({"float", "int", "str", "bool", "list", "dict", "tuple", "set", "none", "literal"})


def _data_location(loc: tuple[Any, ...], data: Any) -> list[Any]:
    """An error's location as keys of the data: pydantic's also names the union member or validator it
    tried (`UniformRatio`, `float`, `function-after[...]`), which are dropped -- but a key the data
    holds is kept whatever it looks like (`Output`, a report's `DNA-ecoli`)."""
    kept: list[Any] = []
    node = data
    for part in loc:
        in_dict = isinstance(node, dict) and part in node
        if in_dict or (isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)):
            kept.append(part)
            node = node[part]
        elif (
            isinstance(part, str)
            and (
                not isinstance(node, dict)  # below a value nothing is a key: a tag
                or part[:1].isupper()
                or "[" in part
                or part.startswith("function-")
                or part in _TYPE_TAGS
            )
        ):
            continue
        else:  # a key the data lacks (a missing required key)
            kept.append(part)
            node = None
    return kept


def _format_errors(
    schema: type[BaseModel],
    exc: ValidationError,
    origin: str,
    overridden: set[tuple[str, ...]],
    overridden_where: str = "on the command line",
    data: Any = None,
) -> str:
    lines = []
    for err in exc.errors():
        loc = _data_location(err["loc"], data)
        key = ".".join(str(p) for p in loc) or "(top level)"
        str_loc = tuple(str(p) for p in loc)
        source = origin
        # the error's key is, lies inside or holds a key set on the command line
        if str_loc and any(
            str_loc[: len(path)] == path or path[: len(str_loc)] == str_loc for path in overridden
        ):
            source = f"{origin} (value set {overridden_where})"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(schema, loc[:-1])
            hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
            near = difflib.get_close_matches(str(loc[-1]), allowed, n=1) if loc and allowed else []
            if loc and "." in str(loc[-1]):  # `train.steps: 5` in a file: the command line's form
                parts = str(loc[-1]).split(".")
                nested = (
                    "".join(f"{part}: {{" for part in parts[:-1])
                    + f"{parts[-1]}: ..."
                    + "}" * (len(parts) - 1)
                )
                hint = f"; a dotted key is the command line's form: in a file, nest it ({nested}){hint}"
            elif near or (loc and str(loc[-1]).lower() in allowed):
                hint = f"; did you mean '{near[0] if near else str(loc[-1]).lower()}'?{hint}"
            lines.append(f"{source}: unknown key '{key}'{hint}")
        elif err["type"] == "missing":
            lines.append(f"{source}: missing required key '{key}'")
        else:
            got = err.get("input")
            shown = f" (got {got!r})" if not isinstance(got, dict) else ""
            if err["type"] == "string_type" and source != origin and not isinstance(got, (dict, list)):
                # `output=2024`, `yes`, `null`: YAML read a number, a switch or nothing, not the name
                inside = any(isinstance(p, int) for p in loc)  # an item of a list is set with its list
                shown += "; a value on the command line is read as YAML: quote it" + (
                    " inside the list's YAML" if inside else f", inside the shell's quotes: \"{key}='...'\""
                )
            lines.append(f"{source}: key '{key}': {err['msg']}{shown}")
    return "invalid config:\n  " + "\n  ".join(lines)


def validate_config(
    schema: type[C],
    data: dict[str, Any],
    origin: str,
    overridden: set[tuple[str, ...]] | None = None,
    overridden_where: str = "on the command line",
) -> C:
    """Validate a mapping against a schema, turning pydantic's errors into a `ConfigError`
    (`overridden`: the keys set `overridden_where`, named in the message)."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            _format_errors(schema, exc, origin, overridden or set(), overridden_where, data)
        ) from None


def load_config(
    schema: type[C],
    path: str | os.PathLike | None,
    overrides: Sequence[str] = (),
    overridden_where: str = "on the command line",
) -> C:
    """Read a YAML config (or start from the schema's defaults), apply overrides (set
    `overridden_where`, as an error message says), and validate."""
    data = read_yaml(path) if path is not None else {}
    overridden = apply_overrides(data, overrides)
    origin = str(path) if path is not None else "command line"
    return validate_config(schema, data, origin, overridden, overridden_where)


def dump_config(config: BaseModel) -> str:
    """The fully resolved config as YAML (defaults included, keys in schema order)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, default_flow_style=None)


def write_config(config: BaseModel, directory: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved config beside a stage's outputs."""
    path = Path(directory) / name
    path.write_text(dump_config(config), encoding="utf-8")
    return path


def _earlier_embed_norm(value: Any, flat: dict[str, Any]) -> bool:
    """model.embed_norm does what biomask did before it existed (the raw latent) at none, and at auto
    for every kind but the profile autoencoder (auto is l2 there: another embedding)."""
    return value == "none" or (value == "auto" and flat.get("model.kind") != "mlp")


# Keys added after outputs were written, each with the value that does what biomask did before it
# existed. At that value a key is left out of fingerprints and config diffs, so an output written
# before the key existed stays current (no needless rerun after an upgrade). Add a new key here
# when its default keeps the earlier behaviour.
ADDED_KEYS: dict[str, Any] = {
    "model.decorrelation": 0.0,
    "model.batch_covariate": False,
    "model.input_scale": "none",
    "batch_column": None,  # prep cells
    "labels.min_cells": 0,  # prep cells, 2026-12-06
    "standardise": "checkpoint",  # evaluate, embed, 2026-12-06
    "evaluations{}.chosen_on": None,  # report, 2026-12-07
    "splits.group": "none",  # evaluate, 2026-12-07
    "embedding.key": "X_biomask",  # report, 2026-12-07
    # read only by splits.group=shared_sequence
    "splits.min_shared": lambda value, flat: value == 32 or flat.get("splits.group") != "shared_sequence",
}


# Keys added before ADDED_KEYS was (2026-12-05), oldest first, each with its earlier-behaviour value
# (or a function of the value and the flattened config that says whether it does what biomask did
# before). Fingerprints kept them, so outputs written since a key existed hold it: those are left as
# they are. An output written before holds neither it nor the keys after it; `config_fingerprints`
# gives the fingerprint it holds. `a[].b`: key b of every item of the list a (`a{}.b`: of every value
# of the mapping a).
def _earlier_unless_finetuning(earlier: Any) -> Any:
    """An evaluate `finetune.*` key: it does what biomask did before it existed at `earlier`, and at
    any value in an evaluation that does not fine-tune (no protocol reads it)."""

    def check(value: Any, flat: dict[str, Any]) -> bool:
        return value == earlier or "finetune" not in (flat.get("protocols") or [])

    return check


RETROFITTED_KEYS: list[tuple[str, Any]] = [
    # three pretrain keys of 2026-12-03 listed 2026-12-07 (an upgrade from 12-02 called every run
    # changed, and a pipeline retrained it): at the front, so every fingerprint listed before stays
    ("model.loss", "mse"),  # 2026-12-03 02:38
    ("model.max_visible", 64),  # 2026-12-03 03:14
    ("model.ratio_input", False),  # 2026-12-03 07:35
    ("model.embed_norm", _earlier_embed_norm),  # 2026-12-03
    ("model.objective", "mae"),  # 2026-12-03
    # evaluate's keys of 2026-12-03/04, listed 2026-12-06 (an upgrade refused evaluations written
    # before them). Only keys of one schema date each other's fingerprints, so keys of a schema with
    # none here yet could join at their dates; never reorder or insert among a schema's keys listed
    ("select_on_val", False),  # 2026-12-03, evaluate
    ("finetune.dropout", _earlier_unless_finetuning(0.0)),  # 2026-12-03, evaluate
    ("inputs[].task", None),  # 2026-12-04, prep dna
    ("finetune.mix", _earlier_unless_finetuning([1.0])),  # 2026-12-04, evaluate
    ("finetune.select", _earlier_unless_finetuning("mcc")),  # 2026-12-04, evaluate
    ("finetune.min_gain_se", _earlier_unless_finetuning(0.0)),  # 2026-12-04, evaluate
    # on a CPU the foreach kernel, as before; on a GPU the fused one, which moves float rounding only
    # (as other code does, which reuse accepts with a warning)
    ("optim.fused", "auto"),  # 2026-12-04
    ("train.compile", False),  # 2026-12-04
    ("device", lambda value, flat: value in ("auto", "cpu")),  # 2026-12-04, evaluate (as optim.fused)
    ("finetune.screen_epochs", _earlier_unless_finetuning(None)),  # 2026-12-04, evaluate
    ("finetune.fresh_head_lr", _earlier_unless_finetuning(None)),  # 2026-12-04, evaluate
    ("finetune.min_budget_steps", _earlier_unless_finetuning(None)),  # 2026-12-05, evaluate
]


def _is_earlier(earlier: Any, value: Any, flat: dict[str, Any]) -> bool:
    return bool(earlier(value, flat)) if callable(earlier) else value == earlier


def _sections(data: Any, parts: list[str]) -> list[dict[str, Any]]:
    """The dicts a dotted path's parents lead to (`a[]`: every item of the list a; `a{}`: every value
    of the mapping a, e.g. a report's `evaluations`)."""
    nodes = [data]
    for part in parts:
        name, many = (part[:-2], part[-2:]) if part.endswith(("[]", "{}")) else (part, "")
        found: list[Any] = []
        for node in nodes:
            child = node.get(name) if isinstance(node, dict) else None
            if many == "[]":
                found += child if isinstance(child, list) else []
            elif many == "{}":
                found += list(child.values()) if isinstance(child, dict) else []
            else:
                found.append(child)
        nodes = [node for node in found if isinstance(node, dict)]
    return nodes


def without_added_keys(
    data: dict[str, Any], added: Iterable[tuple[str, Any]] | None = None
) -> dict[str, Any]:
    """A resolved config (as model_dump or config.yaml gives it) less the `added` keys (default:
    `ADDED_KEYS`) at their earlier-behaviour value: what an output written before they existed
    recorded."""
    data = copy.deepcopy(data)
    flat = flatten(data)
    for key, earlier in ADDED_KEYS.items() if added is None else added:
        *parents, last = key.split(".")
        for section in _sections(data, parents):
            if last in section and _is_earlier(earlier, section[last], flat):
                del section[last]
    return data


def config_fingerprint(config: BaseModel, exclude: Iterable[str] = ()) -> str:
    """A hash of the config's semantic content: equal configs give equal fingerprints.

    `exclude` names dotted keys that do not change results (output paths, worker counts); keys of
    `ADDED_KEYS` at their earlier-behaviour value are left out too.
    """
    return _fingerprint(without_added_keys(config.model_dump(mode="json")), exclude)


def config_fingerprints(config: BaseModel | dict[str, Any], exclude: Iterable[str] = ()) -> list[str]:
    """`config_fingerprint`, then the fingerprints outputs of this config written before each of
    `RETROFITTED_KEYS` existed hold (newest first): the same results, fingerprinted as they were.
    `config` may be a resolved config's data (as `model_dump(mode="json")` gives it)."""
    data = without_added_keys(config if isinstance(config, dict) else config.model_dump(mode="json"))
    found = [_fingerprint(data, exclude)]
    for start in range(len(RETROFITTED_KEYS) - 1, -1, -1):
        earlier = _fingerprint(without_added_keys(data, RETROFITTED_KEYS[start:]), exclude)
        if earlier not in found:
            found.append(earlier)
    return found


def _fingerprint(data: dict[str, Any], exclude: Iterable[str]) -> str:
    data = copy.deepcopy(data)
    for dotted in exclude:
        node = data
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    return sha256_json(data)


def flatten(data: Any, prefix: str = "", *, keep_empty: bool = False) -> dict[str, Any]:
    """`{"a": {"b": 1}}` → `{"a.b": 1}` (lists are kept as values). `keep_empty`: an empty mapping is
    a value of its own (`{"a": {}}` → `{"a": {}}`), as overrides need it: it empties the section."""
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        nested = isinstance(value, dict) and (value or not keep_empty)
        for dotted, leaf in (
            flatten(value, name, keep_empty=keep_empty) if nested else {name: value}
        ).items():
            if dotted in flat:  # `split.seed: 1` beside `split: {seed: 2}`: one would be dropped
                raise ConfigError(f"{dotted} is given twice (as a dotted key and inside a section); keep one")
            flat[dotted] = leaf
    return flat


def config_diff(
    old: dict[str, Any], new: dict[str, Any], ignore: Sequence[str] = (), *, as_added: bool = True
) -> list[str]:
    """Human-readable differences between two resolved configs, one `key: old -> new` per line; a key
    absent on one side and at its earlier-behaviour value (`ADDED_KEYS`, `RETROFITTED_KEYS`) on the
    other is no difference (unless `as_added=False`: every value that differs), nor is a key of
    `ignore` (dotted; its sub-keys too: keys that change no result)."""
    a, b = flatten(old), flatten(new)
    # compared as an output written before the added keys would be: a difference is shown as it is
    added = [*ADDED_KEYS.items(), *RETROFITTED_KEYS] if as_added else []
    a_then, b_then = flatten(without_added_keys(old, added)), flatten(without_added_keys(new, added))
    return [
        f"{key}: {a.get(key, '(absent)')!r} -> {b.get(key, '(absent)')!r}"
        for key in sorted(a.keys() | b.keys())
        if a.get(key) != b.get(key)
        and a_then.get(key) != b_then.get(key)
        and not any(key == k or key.startswith(f"{k}.") for k in ignore)
    ]
