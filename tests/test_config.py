"""Config validation: every mistake names the file and the key."""

from __future__ import annotations

import textwrap
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


# Words that only make sense to someone who knows pydantic; no message may contain them.
PYDANTIC_WORDS = (
    "Input should",
    "Value error",
    "valid tuple",
    "Tuple",
    "Dictionary",
    "LabelSpec",
    "LabelSetConfig",
    "WatchConfig",
    "model_type",
    "union",
    "constrained-int",
    "literal[",
    "after validation",
)


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"watch": {"paths": ["p"], "setle_seconds": 1}}, "watch.setle_seconds: unknown key"),
        ({"colour": 1}, "colour: unknown key"),
        ({"watch": {}}, "watch.paths: required key is missing"),
        ({"watch": {"paths": "photos"}}, "watch.paths: must be a list of folders"),
        ({"watch": {"paths": []}}, "watch.paths: must not be empty"),
        ({"watch": {"paths": ["p"], "polling": "maybe"}}, "watch.polling: must be true or false"),
        (
            {"watch": ["photos"]},
            "watch: must be a mapping with paths (and optional extensions, exclude,",
        ),
        ({"label_sets": {}}, "label_sets: must not be empty"),
        ({"label_sets": ["scene"]}, "label_sets: must be a mapping of set names to label sets"),
        (
            {"label_sets": {"scene": {"labels": ["a", "b"], "threshold": 1.5}}},
            "label_sets.scene.threshold: must be at most 1",
        ),
        (
            {"label_sets": {"scene": {"labels": ["a", "b"], "threshold": "high"}}},
            "label_sets.scene.threshold: must be a number",
        ),
        (
            {"label_sets": {"scene": {"labels": ["a", "b"], "top_k": "two"}}},
            "label_sets.scene.top_k: must be a whole number",
        ),
        (
            {"label_sets": {"scene": {"labels": ["a", "b"], "mode": "several"}}},
            "label_sets.scene.mode: must be single or multi",
        ),
        (
            {"label_sets": {"scene": {"labels": ["a", "b"], "templates": ["a photo"]}}},
            "label_sets.scene.templates: template 'a photo' must contain {}",
        ),
        (
            {"label_sets": {"scene": {"labels": ["a", "b"], "templates": 5}}},
            "label_sets.scene.templates: must be a list of templates, or openai or simple",
        ),
        (
            {"label_sets": {"scene": {"labels": "a, b"}}},
            "label_sets.scene.labels: must be a list of labels",
        ),
        (
            {"label_sets": {"scene": {"labels": ["a", "b", ["c"]]}}},
            "label_sets.scene.labels.2: must be a label name or a mapping with name"
            " (and optional prompts, negative_prompts)",
        ),
        (
            {"label_sets": {"scene": {"labels": ["a", {"name": ""}]}}},
            "label_sets.scene.labels.1.name: must not be empty",
        ),
        (
            {"label_sets": {"scene": {"labels": ["beach"]}}},
            "label_sets.scene: a single-mode set needs at least two labels",
        ),
        (
            {"label_sets": {"scene": {"labels": ["a", "b", "a"]}}},
            "label_sets.scene: labels appear twice: a",
        ),
        ({"model": {"device": "gpu"}}, "model.device: must be auto, cpu, cuda"),
        ({"model": {"precision": "half"}}, "model.precision: must be auto, fp32, fp16 or bf16"),
        ({"worker": {"batch_size": 0}}, "worker.batch_size: must be at least 1"),
        ({"worker": {"stall_seconds": 0}}, "worker.stall_seconds: must be more than 0"),
        ({"log_level": "loud"}, "log_level: must be debug, info, warning or error"),
    ],
)
def test_invalid_values_name_the_file_and_key(
    tmp_path: Path, patch: dict[str, object], expected: str
) -> None:
    message = error_for(tmp_path, {**MINIMAL, **patch})
    assert message.startswith(f"{tmp_path / 'config.yaml'}: ")
    assert expected in message
    for word in PYDANTIC_WORDS:
        assert word not in message


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        (
            {"label_sets": {"scene": {"labels": ["a", "b", 1.5]}}},
            'label_sets.scene.labels.2: 1.5 is read as a number by YAML; quote it ("1.5")',
        ),
        (
            {"label_sets": {"scene": {"labels": ["a", ["b"]]}}},
            "label_sets.scene.labels.1: must be a label name or a mapping with name"
            " (and optional prompts, negative_prompts)",
        ),
        (
            {"worker": {"decode_threads": "many"}},
            "worker.decode_threads: must be a whole number or auto",
        ),
        ({"worker": {"torch_threads": 0}}, "worker.torch_threads: must be at least 1 or auto"),
        (
            {"label_sets": {"scene": {"labels": ["a", "b"], "templates": "fancy"}}},
            "label_sets.scene.templates: must be a list of templates, or openai or simple",
        ),
    ],
)
def test_one_line_per_mistake_in_a_union_field(
    tmp_path: Path, patch: dict[str, object], expected: str
) -> None:
    # Each member of `int | "auto"` or `str | {name: ...}` fails on its own; the user made one
    # mistake and gets one line.
    message = error_for(tmp_path, {**MINIMAL, **patch})
    assert message.splitlines() == [f"{tmp_path / 'config.yaml'}: {expected}"]


def test_mistakes_inside_a_label_mapping_are_named_by_their_key(tmp_path: Path) -> None:
    data = {**MINIMAL, "label_sets": {"scene": {"labels": ["a", {"nam": "b"}]}}}
    lines = error_for(tmp_path, data).splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [
        "label_sets.scene.labels.1.name: required key is missing",
        "label_sets.scene.labels.1.nam: unknown key (check its spelling)",
    ]


def test_keys_are_named_as_written(tmp_path: Path) -> None:
    data = {
        **MINIMAL,
        "label_sets": {
            "Scene": {"labels": ["a", {"name": "b", "prompt": ["x"]}], "threshold": 2},
        },
    }
    message = error_for(tmp_path, data)
    assert "label_sets.Scene.threshold: must be at most 1" in message
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


def test_a_key_given_twice_is_an_error(tmp_path: Path) -> None:
    # yaml.safe_load keeps the last of two keys silently: the first set would just vanish.
    text = textwrap.dedent("""\
        watch:
          paths: [photos]
        label_sets:
          scene:
            labels: [beach, mountain]
            threshold: 0.2
            threshold: 0.3
          scene:
            labels: [cat, dog]
        """)
    message = error_for(tmp_path, text)
    assert message.splitlines() == [
        f"{tmp_path / 'config.yaml'}: line 7: label_sets.scene.threshold is given twice",
        f"{tmp_path / 'config.yaml'}: line 8: label_sets.scene is given twice",
    ]


def test_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    # `<<: *base` then a key of its own is YAML's way to override, not a mistake.
    text = textwrap.dedent("""\
        watch: {paths: [photos]}
        label_sets:
          scene: &base {labels: [beach, mountain], threshold: 0.2}
          other:
            <<: *base
            threshold: 0.4
        """)
    assert load_config(write(tmp_path, text)).label_sets["other"].threshold == 0.4


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (
            "[yes, no]",
            [
                'labels.0: yes is read as true by YAML; quote it ("yes")',
                'labels.1: no is read as false by YAML; quote it ("no")',
            ],
        ),
        (
            "[On, off]",
            [
                'labels.0: On is read as true by YAML; quote it ("On")',
                'labels.1: off is read as false by YAML; quote it ("off")',
            ],
        ),
        (
            "[1984, 2024.0]",
            [
                'labels.0: 1984 is read as a number by YAML; quote it ("1984")',
                'labels.1: 2024.0 is read as a number by YAML; quote it ("2024.0")',
            ],
        ),
        ("[null, cat]", ['labels.0: null is read as null (no value) by YAML; quote it ("null")']),
        ("[~, cat]", ['labels.0: ~ is read as null (no value) by YAML; quote it ("~")']),
        ("\n      -\n      - cat", ["labels.0: must not be empty"]),
        (
            "[cat, {name: yes, prompts: [a nod]}]",
            ['labels.1.name: yes is read as true by YAML; quote it ("yes")'],
        ),
    ],
)
def test_labels_that_yaml_reads_as_other_types_say_to_quote_them(
    tmp_path: Path, labels: str, expected: list[str]
) -> None:
    text = f"watch: {{paths: [photos]}}\nlabel_sets:\n  answers:\n    labels: {labels}\n"
    message = error_for(tmp_path, text)
    prefix = f"{tmp_path / 'config.yaml'}: label_sets.answers."
    assert message.splitlines() == [prefix + line for line in expected]


def test_quoted_yaml_words_are_labels(tmp_path: Path) -> None:
    text = 'watch: {paths: [photos]}\nlabel_sets:\n  answers: {labels: ["yes", "no", "1984"]}\n'
    answers = load_config(write(tmp_path, text)).label_sets["answers"]
    assert answers.label_names == ("yes", "no", "1984")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"watch: {paths: [caf\xe9]}\n")
    with pytest.raises(ConfigError, match="config.yaml: not UTF-8 text"):
        load_config(path)


def test_a_set_name_that_yaml_reads_as_a_bool_says_to_quote_it(tmp_path: Path) -> None:
    text = "watch: {paths: [photos]}\nlabel_sets:\n  yes: {labels: [a, b]}\n"
    message = error_for(tmp_path, text)
    assert message.endswith(': label_sets.True: yes is read as true by YAML; quote it ("yes")')
