"""Normalisation statistics and the three normalisers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastwam.data.normalize import NORM_MODES, Normalizer, NormStats


def _data(seed: int = 0) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    action = g.normal(size=(500, 4)) * np.array([1.0, 5.0, 0.1, 2.0]) + np.array([0.0, 3.0, -1.0, 0.5])
    action[:, 3] = 0.7  # a constant dimension (zero range)
    state = g.uniform(-2, 7, size=(500, 3))
    return {"action": action, "state": state}


def test_compute_values():
    d = _data()
    st = NormStats.compute(d)
    np.testing.assert_allclose(st["action"]["min"], d["action"].min(0))
    np.testing.assert_allclose(st["state"]["std"], d["state"].std(0))
    np.testing.assert_allclose(st["state"]["q99"], np.quantile(d["state"], 0.99, axis=0))
    assert st.dim("action") == 4 and st.keys() == ["action", "state"]


@pytest.mark.parametrize("mode", NORM_MODES)
def test_round_trip_numpy_and_torch(mode):
    d = _data()
    norm = Normalizer(NormStats.compute(d), mode)
    x = d["action"]
    y = norm.normalize("action", x)
    assert np.abs(y).max() <= 5.0  # within the clamp: un-normalising is the exact inverse
    np.testing.assert_allclose(norm.unnormalize("action", y), x, rtol=1e-6, atol=1e-9)
    yt = norm.normalize("action", torch.tensor(x, dtype=torch.float32))
    assert yt.dtype == torch.float32
    # (z-score of the constant dimension divides float32 rounding of x by 1e-8: compare the live dimensions)
    live = slice(0, 3) if mode == "z_score" else slice(None)
    np.testing.assert_allclose(yt.numpy()[:, live], y[:, live], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(norm.unnormalize("action", yt).numpy(), x, rtol=1e-5, atol=1e-5)
    # The constant dimension maps to ~0 (min/max: shifted by its value, not scaled; z-score: (x - mean) / 1e-8 of a
    # mean that is x up to rounding) ...
    np.testing.assert_allclose(y[:, 3], 0, atol=1e-6)
    back = norm.unnormalize("action", np.ones((1, 4)))[0, 3]
    assert back == pytest.approx(0.7 + (0.0 if mode == "z_score" else 1.0))  # ... and back by the inverse shift


def test_ranges_and_clamp():
    d = _data()
    st = NormStats.compute(d)
    y = Normalizer(st, "min_max").normalize("state", d["state"])
    assert y.min() == pytest.approx(-1) and y.max() == pytest.approx(1)
    y = Normalizer(st, "q01_q99").normalize("state", d["state"])
    assert y.min() < -1 and y.max() > 1 and np.mean(np.abs(y) > 1) < 0.05  # tails beyond the quantiles
    z = Normalizer(st, "z_score").normalize("state", d["state"])
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-9)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-7)
    # Normalising clamps to [-5, 5]; un-normalising does not clamp (an output beyond the range maps beyond it).
    far = st["state"]["max"] + 100 * (st["state"]["max"] - st["state"]["min"])
    assert np.all(Normalizer(st, "min_max").normalize("state", far[None]) == 5.0)
    out = Normalizer(st, "min_max").unnormalize("state", np.full((1, 3), 3.0))
    np.testing.assert_allclose(out[0], st["state"]["max"] + (st["state"]["max"] - st["state"]["min"]))


def test_near_constant_dimension_rule():
    """A dimension whose min/max range is below 1e-4 is shifted by its minimum, not scaled (the official rule)."""
    st = NormStats({"a": {"min": [0.0, 2.0], "max": [1.0, 2.00005], "mean": [0.5, 2.0], "std": [0.1, 0.0],
                          "q01": [0.0, 2.0], "q99": [1.0, 2.0]}})
    y = Normalizer(st, "min_max").normalize("a", np.array([[0.25, 2.00002]]))
    np.testing.assert_allclose(y, [[-0.5, 2e-5]], rtol=1e-9, atol=1e-12)


def test_save_load_json(tmp_path):
    st = NormStats.compute(_data())
    st.save(tmp_path / "norm_stats.json")
    back = NormStats.load(tmp_path / "norm_stats.json")
    for key in st.keys():
        for s in ("min", "max", "mean", "std", "q01", "q99"):
            np.testing.assert_array_equal(back[key][s], st[key][s])
    x = _data(1)["action"]
    np.testing.assert_array_equal(Normalizer(back, "z_score").normalize("action", x),
                                  Normalizer(st, "z_score").normalize("action", x))


def test_errors():
    st = NormStats.compute(_data())
    with pytest.raises(ValueError, match="unknown normalizer"):
        Normalizer(st, "minmax")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dimension"):
        Normalizer(st).normalize("action", np.zeros((2, 3)))
    with pytest.raises(KeyError):
        Normalizer(st).normalize("velocity", np.zeros((2, 4)))
    with pytest.raises(ValueError, match="lack"):
        NormStats({"action": {"min": [0.0]}})
