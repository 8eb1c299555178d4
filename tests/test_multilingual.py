"""Label sets in Chinese with a model whose text tower and tokenizer come from Hugging Face, as in
xlm-roberta-base-ViT-B-32 and nllb-clip-base-siglip.

The model is built here: a tiny BERT text tower, a WordPiece tokenizer trained in a second on a
few sentences, the tiny vision tower of tests/tinyclip.py, trained to tell colours apart from
Chinese prompts. It is saved by `cliptagd fetch-model --to` (the real saving code), the folder
it was built in is deleted, and the saved copy must tag and be queried with the network off.
"""

from __future__ import annotations

import csv
import io
import json
import random
import shutil
from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch
import yaml

from cliptagd.config import LabelSetConfig
from tests import tinyclip
from tests.helpers import cliptagd, labels_of, make_tagger, pictures

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# The four colours of tests/tinyclip.py, in Chinese, in the same order.
CHINESE = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色"}
TEMPLATE = "一张{}的照片"  # "a photo of {}"
CONTEXT = 16  # tokens: the prompts are a handful of characters


def train_tokenizer(folder: Path) -> Any:
    """A WordPiece tokenizer trained on a few sentences, saved as Hugging Face saves one."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    # BERT's normaliser puts spaces around CJK characters: each character is a token.
    tok.normalizer = normalizers.BertNormalizer(handle_chinese_chars=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    sentences = [TEMPLATE.format(word) for word in CHINESE.values()] + [
        "红色的花和绿色的叶子", "蓝色的天空", "黄色的香蕉", "a photo of a red object",
    ]  # fmt: skip
    tok.train_from_iterator(sentences, trainers.WordPieceTrainer(special_tokens=special))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=CONTEXT,
    )
    fast.save_pretrained(str(folder))
    return fast


def build(folder: Path, *, steps: int, seed: int = 0) -> Path:
    """Create, train and save the tiny multilingual model as a local-dir: folder."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(folder)
    text_dir = folder / "bert"
    transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=CONTEXT,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(text_dir)
    text_cfg = {
        "hf_model_name": str(text_dir),
        "hf_tokenizer_name": str(folder),
        "hf_proj_type": "linear",
        "hf_pooler_type": "mean_pooler",
        "context_length": CONTEXT,
    }
    model_cfg = {
        "embed_dim": 64,
        "vision_cfg": tinyclip.MODEL_CFG["vision_cfg"],
        "text_cfg": text_cfg,
    }
    model = open_clip.CustomTextCLIP(
        embed_dim=64,
        vision_cfg=model_cfg["vision_cfg"],
        text_cfg={**text_cfg, "hf_model_pretrained": False},  # random weights, no download
    )
    config = {"model_cfg": model_cfg, "preprocess_cfg": tinyclip.PREPROCESS_CFG}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    _, _, preprocess = open_clip.create_model_and_transforms(
        "local-dir:" + str(folder), pretrained_text=False
    )
    prompts = open_clip.get_tokenizer("local-dir:" + str(folder))(
        [TEMPLATE.format(word) for word in CHINESE.values()]
    )
    # The same recipe as the colour model's, on the Chinese prompts.
    tinyclip.train(model, preprocess, prompts, list(CHINESE), rng, steps=steps, per_class=96)
    from safetensors.torch import save_model

    save_model(model, str(folder / "open_clip_model.safetensors"))
    return folder


def config_for(folder: Path, model: Path, photos: Path) -> Path:
    config = {
        "watch": {"paths": [str(photos)], "settle_seconds": 0.5},
        "model": {"name": f"local-dir:{model}", "device": "cpu"},
        "database": {"url": f"sqlite:///{folder / 'tags.db'}"},
        "worker": {"batch_size": 8},
        "cache_dir": str(folder / "cache"),
        "label_sets": {"颜色": {"templates": [TEMPLATE], "labels": list(CHINESE.values())}},
    }
    path = folder / "config.yaml"
    # allow_unicode: the file a person would write, in UTF-8, not \u escapes.
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return path


def chinese_set() -> LabelSetConfig:
    return LabelSetConfig.model_validate(
        {"templates": [TEMPLATE], "labels": list(CHINESE.values())}
    )


def test_saved_folder_carries_the_tokenizer_and_text_tower(tmp_path: Path) -> None:
    """Quick: an untrained model saved by the real saving code, its first folder deleted and
    the copy moved, embeds Chinese text exactly as the original did, with no network."""
    built = build(tmp_path / "built", steps=0)
    original = make_tagger(built, tmp_path / "cache1", 颜色=chinese_set())
    saved = original.save_local_dir(tmp_path / "saved")
    assert (saved / "hf_text" / "config.json").is_file()
    assert (saved / "tokenizer.json").is_file()
    shutil.rmtree(built)
    moved = saved.rename(tmp_path / "moved")
    copy = make_tagger(moved, tmp_path / "cache2", 颜色=chinese_set())
    for text in ["红色", "一张蓝色的照片", "green"]:
        assert copy.encode_text(text) == original.encode_text(text)
    assert torch.equal(copy.sets[0].weights, original.sets[0].weights)


@pytest.mark.slow
def test_chinese_labels_with_a_saved_hugging_face_text_tower(
    tmp_path: Path, rng: random.Random
) -> None:
    built = build(tmp_path / "built", steps=100)
    trained_ids = open_clip.get_tokenizer(f"local-dir:{built}")(["一张红色的照片"])
    photos = tmp_path / "photos"
    photos.mkdir()
    fetched = tmp_path / "fetch"
    fetched.mkdir()
    saved = tmp_path / "saved"
    cliptagd("fetch-model", "-c", config_for(fetched, built, photos), "--to", saved)
    shutil.rmtree(built)  # the saved folder must stand alone

    saved_cfg = json.loads((saved / "open_clip_config.json").read_text())["model_cfg"]
    assert saved_cfg["text_cfg"]["hf_model_name"] == str(saved / "hf_text")
    assert saved_cfg["text_cfg"]["hf_tokenizer_name"] == str(saved)
    assert torch.equal(
        open_clip.get_tokenizer(f"local-dir:{saved}")(["一张红色的照片"]), trained_ids
    )

    # Moved after saving, as a folder copied to an offline machine is: the paths written in
    # its config are stale, and the daemon must find the tower and tokenizer beside it.
    moved = saved.rename(tmp_path / "moved")
    truth = pictures(photos, 12, rng)
    work = tmp_path / "work"
    work.mkdir()
    config = config_for(work, moved, photos)
    cliptagd("scan", "-c", config)
    got = labels_of(work / "tags.db")
    want = {str(path): [CHINESE[colour]] for path, colour in truth.items()}
    assert got == want

    reds = sorted(str(p) for p, colour in truth.items() if colour == "red")
    table = cliptagd("query", "-c", config, "--tag", "红色").stdout
    assert "红色" in table and "\\u" not in table
    assert all(path in table for path in reds)
    rows = json.loads(cliptagd("query", "-c", config, "--tag", "红色", "--format", "json").stdout)
    assert sorted(row["path"] for row in rows) == reds
    assert "红色" in json.dumps(rows, ensure_ascii=False)
    text = cliptagd("query", "-c", config, "--tag", "红色", "--format", "csv").stdout
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert sorted(row["path"] for row in parsed) == reds
    assert "红色" in text
