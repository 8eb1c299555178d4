"""Config validation: every mistake names the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cliptagd.config import ConfigError, Mode, find_config, load_config

MINIMAL = {
    "watch": {"paths": ["photos"]},
    "label_sets": {"scene": {"labels": ["beach", "mountain"]}},
}


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def error_for(tmp_path: Path, data: object) -> str:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return str(caught.value)


def test_minimal_config_gets_defaults_and_resolves_paths(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, {**MINIMAL, "database": {"url": "sqlite:///t.db"}}))
    assert config.watch.paths == (tmp_path / "photos",)
    assert config.database.url == f"sqlite:///{tmp_path / 't.db'}"
    scene = config.label_sets["scene"]
    assert scene.mode is Mode.SINGLE
    assert scene.effective_threshold == 0.0
    assert scene.effective_top_k == 1
    assert config.model.name == "ViT-B-32"


def test_multi_defaults(tmp_path: Path) -> None:
    data = {**MINIMAL, "label_sets": {"things": {"mode": "multi", "labels": ["cup"]}}}
    things = load_config(write(tmp_path, data)).label_sets["things"]
    assert things.effective_threshold == 0.5
    assert things.effective_top_k == 1


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"watch": {"paths": ["p"], "setle_seconds": 1}}, "watch.setle_seconds: unknown key"),
        ({"colour": 1}, "colour: unknown key"),
        ({"watch": {}}, "watch.paths: required key is missing"),
        ({"label_sets": {}}, "label_sets: Dictionary should have at least 1 item"),
        (
            {"label_sets": {"scene": {"labels": ["a", "b"], "threshold": 1.5}}},
            "label_sets.scene.threshold: Input should be less than or equal to 1",
        ),
        (
            {"label_sets": {"scene": {"labels": ["a", "b"], "mode": "several"}}},
            "label_sets.scene.mode: Input should be 'single' or 'multi'",
        ),
        (
            {"label_sets": {"scene": {"labels": ["a", "b"], "templates": ["a photo"]}}},
            "label_sets.scene.templates: Value error, template 'a photo' must contain {}",
        ),
        (
            {"label_sets": {"scene": {"labels": ["beach"]}}},
            "label_sets.scene: Value error, a single-mode set needs at least two labels",
        ),
        (
            {"label_sets": {"scene": {"labels": ["a", "b", "a"]}}},
            "label_sets.scene: Value error, labels appear twice: a",
        ),
        ({"model": {"device": "gpu"}}, "model.device: Value error, must be auto, cpu, cuda"),
        ({"worker": {"batch_size": 0}}, "worker.batch_size: Input should be greater than or"),
    ],
)
def test_invalid_values_name_the_file_and_key(
    tmp_path: Path, patch: dict[str, object], expected: str
) -> None:
    message = error_for(tmp_path, {**MINIMAL, **patch})
    assert message.startswith(f"{tmp_path / 'config.yaml'}: ")
    assert expected in message


def test_keys_are_named_as_written(tmp_path: Path) -> None:
    data = {
        **MINIMAL,
        "label_sets": {
            "Scene": {"labels": ["a", {"name": "b", "prompt": ["x"]}], "threshold": 2},
        },
    }
    message = error_for(tmp_path, data)
    assert "label_sets.Scene.threshold: Input should be less than or equal to 1" in message
    assert "label_sets.Scene.labels.1.prompt: unknown key" in message


def test_label_with_own_prompts(tmp_path: Path) -> None:
    data = {
        **MINIMAL,
        "label_sets": {
            "scene": {"labels": ["beach", {"name": "city", "prompts": ["a street at night"]}]}
        },
    }
    scene = load_config(write(tmp_path, data)).label_sets["scene"]
    assert scene.label_names == ("beach", "city")


def test_yaml_syntax_error(tmp_path: Path) -> None:
    message = error_for(tmp_path, "watch: [unclosed\n")
    assert message.startswith(f"{tmp_path / 'config.yaml'}: not valid YAML")


def test_not_a_mapping(tmp_path: Path) -> None:
    assert "must be a mapping" in error_for(tmp_path, "- a\n- b\n")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_find_config_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPTAGD_CONFIG", str(tmp_path / "from-env.yaml"))
    assert find_config(tmp_path / "given.yaml") == tmp_path / "given.yaml"
    assert find_config(None) == tmp_path / "from-env.yaml"
    monkeypatch.delenv("CLIPTAGD_CONFIG")
    monkeypatch.setenv("HOME", str(tmp_path))
    user = tmp_path / ".config" / "cliptagd" / "config.yaml"
    user.parent.mkdir(parents=True)
    user.write_text("")
    assert find_config(None) == user


def test_config_example_is_valid() -> None:
    example = Path(__file__).parent.parent / "config.example.yaml"
    config = load_config(example)
    assert config.label_sets
