"""Run configs: loading, ``base`` chains, the merge rule, overrides, the errors, the committed configs."""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

import pytest

import icot_jax
from icot_jax.config import (
    Config,
    ConfigError,
    Mode,
    load_config,
    save_config,
    to_dict,
    validate,
)
from icot_jax.errors import UserError

REPO = Path(__file__).resolve().parents[1]
DEMO = Path(icot_jax.__file__).parent / "demo.yaml"
COMMITTED = sorted([*(REPO / "configs").rglob("[!_]*.yaml"), DEMO])
MINIMAL = ["model.from_scratch=true", "data.generate_digits=2"]
"""The least a config needs to validate (a model and some data)."""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def literal_fields() -> list[tuple[str, tuple]]:
    """Every ``section.key`` annotated with a ``Literal``, and its allowed values."""
    found = []
    for section, hint in typing.get_type_hints(Config).items():
        if dataclasses.is_dataclass(hint):
            found += [(f"{section}.{key}", typing.get_args(annotation))
                      for key, annotation in typing.get_type_hints(hint).items()
                      if typing.get_origin(annotation) is typing.Literal]
    return found


# ---------------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_every_committed_config_loads_and_round_trips(path, tmp_path):
    config = load_config(path)
    assert config.name == path.stem
    if "paper" in path.parts:
        assert config.model.hf and config.data.train
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert to_dict(config) == dataclasses.asdict(config)


def test_round_trip_keeps_infinity_lists_and_none(tmp_path):
    config = load_config(None, [*MINIMAL, "train.removal_smoothing_lambda=.inf", "data.buckets=[16, 32]",
                                "train.max_len_train=null", "model.overrides={n_layer: 1, n_inner: null}"])
    assert math.isinf(config.train.remove_all_when_remove_beyond) and math.isinf(config.train.removal_smoothing_lambda)
    save_config(config, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == config


def test_defaults_need_a_model_and_data():
    with pytest.raises(ConfigError, match=r"defaults: set 'model.hf' .* or 'model.from_scratch: true'"):
        load_config(None)
    assert load_config(None, MINIMAL) == dataclasses.replace(
        Config(name="run"), model=dataclasses.replace(Config().model, from_scratch=True),
        data=dataclasses.replace(Config().data, generate_digits=2))


def test_demo_is_the_documented_2x2_recipe():
    """README and docs/RESULTS.md quote the demo as configs/cpu/mult_2x2_tiny_icot_adaptive_decay.yaml under
    another name, and as the adaptive 2x2 recipe with the LR decay switched on."""
    recipe = load_config(REPO / "configs" / "cpu" / "mult_2x2_tiny_icot_adaptive_decay.yaml")
    assert dataclasses.replace(load_config(DEMO), name=recipe.name) == recipe
    adaptive = load_config(REPO / "configs" / "cpu" / "mult_2x2_tiny_icot_adaptive.yaml")
    decayed = dataclasses.replace(adaptive.train, lr_decay="after_removal")
    assert dataclasses.replace(adaptive, name=recipe.name, train=decayed) == recipe


def test_config_error_is_the_user_error_type():
    assert issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)


# ------------------------------------------------------------------------------------- base chains and merging


def test_base_chain_merges_mappings_at_every_depth(tmp_path):
    write(tmp_path, "root.yaml", "name: root\nmodel:\n  from_scratch: true\n"
          "  overrides: {n_layer: 2, n_embd: 128, resid_pdrop: 0.0}\n"
          "data: {generate_digits: 2, buckets: [16, 32, 64]}\ntrain: {epochs: 5, lr: 1.0e-3}\n")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "middle.yaml", "base: ../root.yaml\nmodel:\n  overrides: {n_embd: 64}\n"
          "train: {epochs: 7}\n")
    child = write(tmp_path, "child.yaml", "base: sub/middle.yaml\nmodel: {overrides: {resid_pdrop: 0.1}}\n"
                  "data: {buckets: [8]}\n")
    config = load_config(child)
    assert config.model.overrides == {"n_layer": 2, "n_embd": 64, "resid_pdrop": 0.1}
    assert list(config.model.overrides) == ["n_layer", "n_embd", "resid_pdrop"]  # the base's order is kept
    assert config.model.from_scratch and config.data.generate_digits == 2
    assert config.data.buckets == [8]  # a list replaces the base's list
    assert (config.train.epochs, config.train.lr) == (7, 1e-3)
    assert config.name == "child"  # a name is never inherited


def test_committed_children_inherit_what_they_do_not_state():
    """The CPU configs that change a few model.overrides keys keep the rest of their base's model."""
    base = load_config(REPO / "configs" / "cpu" / "_mult_tiny.yaml", ["data.generate_digits=2"]).model.overrides
    four = load_config(REPO / "configs" / "cpu" / "mult_4x4_tiny_icot.yaml").model.overrides
    assert four == {**base, "n_positions": 80, "embd_pdrop": 0.1, "attn_pdrop": 0.1, "resid_pdrop": 0.1}
    bench = load_config(REPO / "configs" / "bench" / "gpt2_small_4x4.yaml").model.overrides
    assert bench["tie_word_embeddings"] is True and bench["n_layer"] == 12


def test_base_errors_name_the_file(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    cycle = write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"b.yaml: 'base' chain loops back to this file"):
        load_config(cycle)
    with pytest.raises(ConfigError, match="loops back"):
        load_config(write(tmp_path, "self.yaml", "base: self.yaml\n"))
    with pytest.raises(ConfigError, match=r"missing.yaml: config file not found"):
        load_config(write(tmp_path, "orphan.yaml", "base: missing.yaml\n"))
    with pytest.raises(ConfigError, match=r"list.yaml: key 'base' must be a file name"):
        load_config(write(tmp_path, "list.yaml", "base: [a.yaml]\n"))
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML"):
        load_config(write(tmp_path, "bad.yaml", "train: {epochs: 1\n"))
    with pytest.raises(ConfigError, match=r"top.yaml: top level must be a mapping"):
        load_config(write(tmp_path, "top.yaml", "- 1\n"))
    with pytest.raises(ConfigError, match=r"section.yaml: section 'train' must be a mapping"):
        load_config(write(tmp_path, "section.yaml", "train: 3\n"))


# -------------------------------------------------------------------------------------------------- overrides


def test_overrides_parse_yaml_values_into_the_field_types():
    config = load_config(None, [*MINIMAL, "train.lr=1e-4", "train.epochs=3", "train.keep_position=true",
                                "train.remove_all_when_remove_beyond=.inf", "train.remove_per_epoch=2",
                                "data.buckets=[16, 32]", "run_dir=", "name=try1"])
    assert config.train.lr == 1e-4 and isinstance(config.train.lr, float)  # YAML 1.1 reads 1e-4 as a string
    assert config.train.epochs == 3 and config.train.keep_position is True
    assert math.isinf(config.train.remove_all_when_remove_beyond)
    assert config.train.remove_per_epoch == 2.0 and isinstance(config.train.remove_per_epoch, float)
    assert config.data.buckets == [16, 32] and config.run_dir is None and config.name == "try1"


def test_an_override_replaces_the_value_at_its_key():
    demo = load_config(DEMO).model.overrides
    one_entry = load_config(DEMO, ["model.overrides.n_layer=4"]).model.overrides
    assert one_entry == {**demo, "n_layer": 4}
    assert load_config(DEMO, ["model.overrides={n_layer: 1}"]).model.overrides == {"n_layer": 1}


@pytest.mark.parametrize(("override", "message"), [
    ("train.lr", r"command line: override 'train.lr' is not of the form key=value"),
    ("train.epochs.x=1", r"command line: key 'epochs' in 'train.epochs.x' is not a section"),
    ("train.batch_size=big", r"key 'train.batch_size' must be an integer, got 'big'"),
    ("train.epochs=2.5", r"key 'train.epochs' must be an integer"),
    ("train.lr=fast", r"key 'train.lr' must be a number, got 'fast'"),
    ("train.keep_position=1", r"key 'train.keep_position' must be true or false"),
    ("data.buckets=16", r"key 'data.buckets' must be a list"),
    ("model.overrides=3", r"key 'model.overrides' must be a mapping"),
    ("model.hf=7", r"key 'model.hf' must be a string"),
])
def test_override_type_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEMO, [override])


# ----------------------------------------------------------------------------------------------- unknown keys


def test_unknown_keys_name_the_file_and_the_closest_key(tmp_path):
    bad = write(tmp_path, "bad.yaml", "model: {from_scratch: true}\ndata: {generate_digits: 2}\n"
                "train: {remove_per_epochs: 1}\n")
    with pytest.raises(ConfigError,
                       match=r"bad.yaml: unknown key 'train.remove_per_epochs'; did you mean 'remove_per_epoch'\?"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"command line: unknown key 'train.epoch'; did you mean 'epochs'\?"):
        load_config(DEMO, ["train.epoch=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'trian'; did you mean 'train'\?"):
        load_config(DEMO, ["trian.lr=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'zzz'; valid keys: checkpoint, data, eval, log_every_steps"):
        load_config(write(tmp_path, "zzz.yaml", "zzz: 1\n"))


def test_a_file_error_is_reported_before_the_overrides(tmp_path):
    bad = write(tmp_path, "bad.yaml", "train: {epoch: 3}\n")
    with pytest.raises(ConfigError, match=r"^\S*bad.yaml: unknown key 'train.epoch'"):
        load_config(bad, ["train.epochs=3"])


# ---------------------------------------------------------------------------------------------- allowed values


def test_the_literal_fields_are_the_keys_with_fixed_values():
    keys = dict(literal_fields())
    assert keys["train.mode"] == typing.get_args(Mode) == ("icot", "explicit", "no_cot")
    assert {"train.removal_side", "data.join", "data.too_long", "data.on_malformed", "model.dtype",
            "model.param_dtype", "mesh.remat"} <= set(keys)


@pytest.mark.parametrize(("key", "allowed"), literal_fields(), ids=[key for key, _ in literal_fields()])
def test_a_literal_field_takes_exactly_its_values(key, allowed, tmp_path):
    section, name = key.split(".")
    for value in allowed:
        assert getattr(getattr(load_config(DEMO, [f"{key}={value}"]), section), name) == value
    path = write(tmp_path, "bad.yaml", f"base: {DEMO}\n{section}: {{{name}: nonsense}}\n")
    expected = f"bad.yaml: key '{key}' is 'nonsense'; expected one of {', '.join(allowed)}"
    with pytest.raises(ConfigError, match=expected):
        load_config(path)
    made_in_code = load_config(DEMO)
    setattr(getattr(made_in_code, section), name, "nonsense")
    with pytest.raises(ConfigError, match=f"config: key '{key}' is 'nonsense'"):
        validate(made_in_code)


def test_the_training_docs_list_the_allowed_values():
    rows = [line for line in (REPO / "docs" / "training.md").read_text().splitlines() if line.startswith("| `")]
    for key, allowed in literal_fields():
        row = next(r for r in rows if f"`{key}`" in r.split("|")[1])
        assert row.split("|")[2].strip() == ", ".join(f"`{value}`" for value in allowed), key


def test_a_literal_error_suggests_the_closest_value():
    with pytest.raises(ConfigError, match=r"key 'train.mode' is 'no-cot'; expected one of icot, explicit, no_cot; "
                                          r"did you mean 'no_cot'\?"):
        load_config(DEMO, ["train.mode=no-cot"])
    with pytest.raises(ConfigError, match=r"'model.dtype' is 'half'; expected one of float32, bfloat16$"):
        load_config(DEMO, ["model.dtype=half"])


# ----------------------------------------------------------------------------------------- validate(): ranges


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.batch_size=30", "train.accumulate_steps=4"],
     r"train.batch_size \(30\) must be divisible by train.accumulate_steps \(4\)"),
    (["train.epochs=0"], r"key 'train.epochs' must be >= 1, got 0"),
    (["train.length_buckets=[8, 0]"], r"key 'train.length_buckets\[1\]' must be >= 1"),
    (["checkpoint.keep=0"], r"key 'checkpoint.keep' must be >= 1"),
    (["train.max_len_train=0"], r"'train.max_len_train' must be >= 1 or null"),
    (["train.random_position_shift=-1"], r"'train.random_position_shift' must be >= 0"),
    (["train.warmup_steps=-1"], r"'train.warmup_steps' must be >= 0"),
    (["train.remove_per_epoch=0"], r"'train.remove_per_epoch' must be > 0"),
    (["train.removal_smoothing_lambda=0"], r"'train.removal_smoothing_lambda' must be > 0"),
    (["model.from_scratch=false"], r"set 'model.hf' \(a checkpoint\) or 'model.from_scratch: true'"),
    (["data.generate_digits=null"], r"set 'data.train' \(a file\) or 'data.generate_digits'"),
])
def test_validate_rejects_values_that_types_allow(overrides, message):
    with pytest.raises(ConfigError, match=rf"demo.yaml \(with overrides\): .*{message}"):
        load_config(DEMO, overrides)
