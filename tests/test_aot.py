"""``icot aot``: TPU slice names, built-in model configs, and a real compile for a TPU (needs libtpu)."""

from __future__ import annotations

import argparse
import importlib.util
import json

import pytest
import yaml

import icot_jax.commands.aot  # noqa: F401 (registers commands.aot)
from icot_jax import aot, build, commands
from icot_jax.config import load_config

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install 'jax[tpu]')")


@pytest.mark.parametrize("name, topology, chip_config, bounds, chips", [
    ("v5p-8", "v5:2x2x1", "megacore", (2, 2, 1), 4),
    ("v4-16", "v4:2x2x2", "megacore", (2, 2, 1), 8),
    ("v5e-16", "v5e:4x4", "default", (2, 2, 1), 16),
    ("v5litepod-4", "v5e:2x2", "default", (2, 2, 1), 4),
    ("v6e-8", "v6e:2x4", "default", (2, 4, 1), 8),
])
def test_slice_names(name, topology, chip_config, bounds, chips):
    tpu = aot.tpu_slice(name)
    assert (tpu.topology_name, tpu.generation.chip_config, tpu.chips_per_host_bounds, tpu.chips) == (
        topology, chip_config, bounds, chips)


def test_wraparound_only_on_full_dimensions():
    assert aot.tpu_slice("v5e-256").wrap == (True, True, False)
    assert aot.tpu_slice("v5e-128").wrap == (False, True, False)
    assert aot.tpu_slice("v4-128").wrap == (True, True, True)
    assert aot.tpu_slice("v5p-16").wrap == (False, False, False)


@pytest.mark.parametrize("name, message", [("v5p-6", "unknown slice size"), ("v3-8", "expected GENERATION-SIZE"),
                                           ("v5e-12", "known: v5e-1, v5e-4")])
def test_bad_slice_names(name, message):
    with pytest.raises(ValueError, match=message):
        aot.tpu_slice(name)


def test_paper_models_resolve_offline():
    config = load_config("configs/paper/gsm8k_mistral_7b_icot.yaml")
    hf_config = build.model_hf_config(config)
    assert (hf_config.model_type, hf_config.hidden_size, hf_config.num_key_value_heads) == ("mistral", 4096, 8)
    shapes = aot.run_shapes(config)  # no GSM8K files nor Mistral tokenizer here: the config's lengths
    assert (shapes.stored_width, shapes.widths, shapes.source) == (1024, (150,), "config")
    phi3 = build.model_hf_config(load_config("configs/paper/gsm8k_phi3_mini_icot.yaml", ["model.overrides.num_hidden_layers=2"]))
    assert (phi3.model_type, phi3.vocab_size, phi3.num_hidden_layers) == ("phi3", 32064, 2)


def _run(tmp_path, capsys, model: dict, topology: str, *overrides: str) -> tuple[int, dict]:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"model": {"hf": "gpt2", "overrides": model},
                                    "data": {"train": "unused.txt", "max_length": 32},
                                    "train": {"batch_size": 8, "accumulate_steps": 2}}))
    parser = argparse.ArgumentParser()
    commands.aot.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["aot", str(path), "mesh.remat=dots", *overrides, "--topology", topology])
    status = args.run(args)
    return status, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


TINY = {"n_layer": 1, "n_embd": 64, "n_head": 4, "vocab_size": 512}


@needs_libtpu
def test_compiles_a_tiny_model_for_a_tpu_slice(tmp_path, capsys):
    status, report = _run(tmp_path, capsys, TINY, "v5e-4")
    assert status == 0
    assert report["topology"] == "v5e-4" and report["fits"] is True
    assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert report["hbm_bytes_per_device"] == 16 * 2**30
    params_and_moments = 3 * 4 * report["num_params"] / 4  # fp32 params, mu, nu sharded over 4 chips
    assert params_and_moments <= report["argument_bytes"] <= report["bytes_per_device"] < report["hbm_bytes_per_device"]
    assert 0.5 < report["flops_per_device"] / report["model_flops_per_device"] < 2


@needs_libtpu
def test_compiles_scanned_layers_for_a_tpu_slice(tmp_path, capsys):
    status, report = _run(tmp_path, capsys, {**TINY, "n_layer": 2}, "v5e-4", "mesh.scan_layers=true")
    assert status == 0 and report["fits"] is True
    assert report["scan_layers"] is True and report["remat"] == "dots"


@needs_libtpu
def test_a_step_that_cannot_fit_is_reported(tmp_path, capsys):
    # 1.3 B fp32 parameters (a 20 M-token vocabulary) need ~21 GB of weights and moments on a 16 GiB chip.
    status, report = _run(tmp_path, capsys, {**TINY, "vocab_size": 20_000_000}, "v5e-1")
    assert status == 1
    assert report["fits"] is False


@needs_libtpu
def test_compiles_the_step_a_from_scratch_run_executes(tmp_path, capsys):
    from icot_jax.data.tokenize import build_builtin_tokenizer

    parser = argparse.ArgumentParser()
    commands.aot.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["aot", "configs/cpu/mult_2x2_tiny_icot.yaml", "data.generate_train=500",
                              "--topology", "v5e-1"])
    assert args.run(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["vocab_size"] == len(build_builtin_tokenizer())  # not GPT-2's 50,257 rows
    assert report["shapes_from"] == "data" and report["stored_width"] == 21  # 2x2 rows: 21 tokens
    assert report["seq_len"] == report["widths"][-1] <= 21 and len(report["widths"]) <= 8


def test_icot_aot_is_a_subcommand_and_names_a_bad_topology(tmp_path, capsys):
    from icot_jax.cli import main

    with pytest.raises(SystemExit, match="icot aot: error: .*v5e-12"):
        main(["aot", "configs/paper/gsm8k_mistral_7b_icot.yaml", "--topology", "v5e-12"])
