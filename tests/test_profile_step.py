"""bench/profile_step.py: it sorts XLA and torch operations into the right kinds and profiles both sides."""

import jax
import jax.numpy as jnp
import pytest

from conftest import bench_module


@pytest.fixture(scope="module")
def profile_step():
    """bench/profile_step.py as a module."""
    with bench_module("profile_step") as module:
        yield module


def test_xla_kinds_names_dots_copies_and_leaves_out_control_flow(profile_step):
    def f(x, w, flag):
        y = jnp.tanh(x @ w)
        y = jax.lax.cond(flag, lambda y: y, lambda y: y * 2, y)
        return (y.T * 3.0).reshape(-1)[:5], y.sum(0)

    x, w = jnp.ones((64, 32)), jnp.ones((32, 48))
    text = jax.jit(f).lower(x, w, True).compile().as_text()
    kinds = profile_step.xla_kinds(text)

    assert "matmul" in kinds.values()
    assert not any(name.startswith(("conditional", "while")) for name in kinds)
    for name, kind in kinds.items():
        if name.startswith(("dot.", "dot")) and kind != "matmul":
            raise AssertionError(f"{name} is a dot but was counted as {kind}")
        if "copy" in name or "transpose" in name:
            assert kind in ("copy", "matmul"), name


def test_torch_kinds(profile_step):
    assert profile_step.torch_kind("aten::addmm") == "matmul"
    assert profile_step.torch_kind("aten::bmm") == "matmul"
    assert profile_step.torch_kind("aten::copy_") == "copy"
    assert profile_step.torch_kind("aten::mul") == "other"


def test_both_sides_profile_the_same_tiny_run(profile_step, tmp_path):
    pytest.importorskip("torch")
    from test_torch_baseline import tiny_config  # the 2-layer, 32-wide GPT-2 of the torch baseline's tests

    config = tiny_config()
    ours = profile_step.profile_jax(config, 1, 1, tmp_path / "trace")
    theirs = profile_step.profile_torch(config, 1, 1)

    assert ours["products"] == [(32, 96), (32, 32), (32, 64), (64, 32)] * 2  # q/k/v, out, MLP in, MLP out
    assert ours["tokens"] % 8 == 0 and ours["tokens"] // 8 in ours["widths"]  # batch 8 × the profiled width
    for side in (ours, theirs):
        assert side["step_ms"] > 0
        assert set(side["profiled_ms"]) == set(profile_step.KINDS)
        assert side["profiled_ms"]["matmul"] > 0  # the trace was read and its multiplies found
    assert list((tmp_path / "trace" / "plugins" / "profile").iterdir())  # the JAX trace is kept where asked


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_dense_products_alone_are_timed_by_form(profile_step, backend):
    if backend == "torch":
        pytest.importorskip("torch")
    ms = profile_step.gemm_alone_ms(16, [(8, 24), (8, 24), (24, 8)], backend, repeats=2)
    assert set(ms) == set(profile_step.GEMM_FORMS) and all(value > 0 for value in ms.values())
