import json

import pytest

from fastwam.config import PRESETS, Config, get_preset


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_through_json(name):
    cfg = get_preset(name)
    again = Config.from_dict(json.loads(cfg.to_json()))
    assert again == cfg


def test_unknown_fields_and_presets_are_errors():
    d = get_preset("tiny").to_dict()
    d["model"]["hidden"] = 3
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        Config.from_dict(d)
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("huge")


def test_mot_requires_shared_heads():
    m = get_preset("libero_2cam224").model
    assert (m.num_heads, m.head_dim, m.num_layers) == (24, 128, 30)
    assert m.video_dim == 3072 and m.action_hidden_dim == 1024
