"""Recipe plumbing: overrides, unknown keys, and secrets kept out of what we write."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from rlhf.config import ConfigError, build_dataclass, load_yaml, parse_override, redact_argv, redact_secrets, set_path


@dataclass
class Inner:
    rate: float = 0.1

    def __post_init__(self):
        if self.rate <= 0:
            raise ValueError(f"rate: must be > 0, got {self.rate}")


@dataclass
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)


def test_override_values_are_parsed_as_yaml():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("flag=true") == (["flag"], True)
    assert parse_override("xs=[1, 2]") == (["xs"], [1, 2])
    assert parse_override("path=out/x") == (["path"], "out/x")
    # YAML 1.1 (PyYAML) reads 3e-2 as a string; recipes follow YAML 1.2 here
    assert parse_override("lr=3e-2") == (["lr"], 0.03) and parse_override("lr=1E4") == (["lr"], 10000.0)
    assert parse_override("v=1.5") == (["v"], 1.5) and parse_override("name=e5") == (["name"], "e5")
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("novalue")


def test_set_path_walks_dicts_and_lists():
    data = {"steps": [{"type": "a"}, {"type": "b", "x": 1}], "output": {}}
    set_path(data, ["steps", "1", "x"], 5)
    set_path(data, ["output", "dir"], "o")
    assert data["steps"][1]["x"] == 5 and data["output"]["dir"] == "o"
    with pytest.raises(ConfigError, match="out of range"):
        set_path(data, ["steps", "7", "x"], 1)


def test_unknown_keys_are_listed_with_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) nmae; known keys: inner, name, tags"):
        build_dataclass(Outer, {"nmae": "x"}, "r.yaml")
    with pytest.raises(ConfigError, match=r"r.yaml.inner: unknown key\(s\) rte"):
        build_dataclass(Outer, {"name": "x", "inner": {"rte": 1}}, "r.yaml")
    with pytest.raises(ConfigError, match="missing required key.*name"):
        build_dataclass(Outer, {}, "r.yaml")


def test_validation_errors_name_the_section():
    with pytest.raises(ConfigError, match=r"r.yaml.inner: rate: must be > 0"):
        build_dataclass(Outer, {"name": "x", "inner": {"rate": -1}}, "r.yaml")
    built = build_dataclass(Outer, {"name": "x", "inner": {"rate": 2.0}}, "r.yaml")
    assert built.inner == Inner(2.0)


def test_invalid_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsteps:\n  - type: a\n   oops: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_yaml(bad)
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_yaml(tmp_path / "list.yaml")


def test_secrets_never_survive_redaction():
    data = {"output": {"push_to_hub": "org/ds", "hub_token": "hf_abc"}, "api_key": "s3cret", "password": None,
            "steps": [{"type": "x", "ARGILLA_API_KEY": "k"}]}
    red = redact_secrets(data)
    assert "hf_abc" not in str(red) and "s3cret" not in str(red) and "'k'" not in str(red)
    assert red["output"]["push_to_hub"] == "org/ds" and red["password"] is None
    argv = ["rlhf", "curate", "r.yaml", "--set", "output.hub_token=hf_abc", "--api-key", "s3cret", "--set", "seed=1"]
    shown = redact_argv(argv)
    assert "hf_abc" not in " ".join(shown) and "s3cret" not in " ".join(shown)
    assert shown[-1] == "seed=1"


@pytest.mark.parametrize("key", ["token", "hf_token", "hub-token", "access_token", "api_key", "ARGILLA_API_KEY",
                                 "apikey", "client_secret", "password", "auth", "credentials"])
def test_secret_keys_are_hidden(key):
    assert redact_secrets({key: "x"}) == {key: "<redacted>"}


@pytest.mark.parametrize("key", ["max_new_tokens", "tokenizer", "pad_token", "eos_token", "add_special_tokens",
                                 "author", "tokens_per_second"])
def test_ordinary_settings_stay_visible(key):
    """Hiding these would blank them in run records and drop them from run fingerprints."""
    assert redact_secrets({key: 64}) == {key: 64}


def test_scientific_notation_in_recipe_files(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  learning_rate: 3e-4\n  version: 1.10\n  tag: 2e\n")
    assert load_yaml(path) == {"train": {"learning_rate": 3e-4, "version": 1.1, "tag": "2e"}}


def test_load_config_applies_overrides_and_names_the_file(tmp_path):
    from dataclasses import dataclass

    from rlhf.config import ConfigError, load_config

    @dataclass
    class Cfg:
        name: str
        k: int = 2

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: a\nk: 3\n")
    assert load_config(Cfg, recipe, ["k=5"]) == Cfg(name="a", k=5)
    with pytest.raises(ConfigError, match=r"r\.yaml.*kk"):
        load_config(Cfg, recipe, ["kk=1"])
