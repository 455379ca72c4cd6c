"""``config/options.py``: a group's options, an option loaded on its schema, and a conf/model option
resolved by name or id; a name that is not an option fails, naming the choices."""

from __future__ import annotations

import pytest

from sage_vllm_batch.config.options import choices, group_options, load_option, model_option
from sage_vllm_batch.errors import ConfigError
from sage_vllm_batch.paths import CONF_DIR


def test_group_options_are_the_groups_yaml_files():
    assert group_options("data") == tuple(sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml")))
    assert "jsonl" in choices("data") and not [c for c in choices("model") if c.startswith("base_")]


def test_an_option_loads_on_its_schema():
    engine = load_option("engine", "cpu")
    assert "max_num_seqs" in engine and "defaults" not in engine  # the schema's keys, the file's values


@pytest.mark.parametrize("group, name", [("engine", "gpu-fast"), ("sampling", "nope"), ("model", "smolm2")])
def test_a_name_that_is_not_an_option_fails_naming_the_choices(group, name):
    with pytest.raises(ConfigError, match=rf"{group}={name}: no such option") as e:
        load_option(group, name) if group != "model" else model_option(name)
    assert all(c in str(e.value) for c in choices(group))


def test_a_model_resolves_by_option_name_or_id_and_a_hub_id_passes_through():
    by_name = model_option("minilm-l6-v2")
    assert model_option(by_name.id) == by_name and by_name.type == "embedding"
    hub = model_option("org/some-model", type="text")
    assert (hub.id, hub.source, hub.type) == ("org/some-model", "hub", "text")
