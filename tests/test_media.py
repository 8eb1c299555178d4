"""Videos, RAW files and Live Photos through the real daemon: videos tagged from a few
frames, queried by kind, a bad video failed with its reason while the rest goes on; a phone
backup and a camera card, pairs and all, fully tagged."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from tests import tinyclip
from tests.helpers import (
    ConfigFactory,
    Daemon,
    all_done,
    cliptagd,
    labels_of,
    rows,
    save_picture,
    statuses,
    wait_for,
)
from tests.media import write_dng, write_sound, write_video


@pytest.mark.slow  # a daemon start: seconds
def test_videos_are_tagged_from_their_frames_and_queried_by_kind(
    make_config: ConfigFactory, photo_dir: Path, tmp_path: Path, rng: random.Random
) -> None:
    config = make_config()
    db = tmp_path / "tags.db"
    save_picture(photo_dir, "still.jpg", "red", rng)
    write_video(photo_dir / "red.mp4", ["red"] * 30)
    write_video(photo_dir / "clip.MOV", ["green"] * 30)
    write_video(photo_dir / "web.webm", ["yellow"] * 20)
    # A quarter red, then blue: its frames are mostly blue, and so is their mean.
    write_video(photo_dir / "mostly-blue.mp4", ["red"] * 10 + ["blue"] * 30)
    write_sound(photo_dir / "voice.mp4")
    (photo_dir / "garbage.mkv").write_bytes(os.urandom(4000))

    with Daemon(config) as daemon:
        wait_for(lambda: all_done(db, 7), 120, "every file")
        found = statuses(db)
        assert found[str(photo_dir / "voice.mp4")] == ("failed", "no video stream (sound only?)")
        assert found[str(photo_dir / "garbage.mkv")][0] == "failed"
        assert "FFmpeg" in str(found[str(photo_dir / "garbage.mkv")][1])
        # The daemon goes on: a video that arrives now is tagged too.
        write_video(photo_dir / "late.mp4", ["blue"] * 20)
        wait_for(lambda: all_done(db, 8), 60, "the late video")
        assert daemon.stop() == 0

    tags = {Path(path).name: labels for path, labels in labels_of(db).items()}
    assert tags == {
        "still.jpg": ["red"], "red.mp4": ["red"], "clip.MOV": ["green"], "web.webm": ["yellow"],
        "mostly-blue.mp4": ["blue"], "late.mp4": ["blue"],
    }  # fmt: skip

    def names(*options: str) -> list[str]:
        out = cliptagd("query", "-c", config, "--any-tag", "red", "--any-tag", "blue", *options,
                       "--format", "json").stdout  # fmt: skip
        return sorted({Path(row["path"]).name for row in json.loads(out)})

    assert names("--kind", "video") == ["late.mp4", "mostly-blue.mp4", "red.mp4"]
    assert names("--kind", "photo") == ["still.jpg"]
    # Tags come only from what is stored: a re-tag of every set gives the same.
    cliptagd("retag", "-c", config, "--all", "--no-progress")
    assert {Path(p).name: labels for p, labels in labels_of(db).items()} == tags


@pytest.mark.slow  # a daemon start: seconds
def test_a_phone_backup_and_a_camera_card_are_fully_tagged(
    make_config: ConfigFactory, photo_dir: Path, tmp_path: Path, rng: random.Random
) -> None:
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    phone, card = photo_dir / "phone", photo_dir / "card"
    phone.mkdir()
    card.mkdir()
    config = make_config(xmp={"write": True, "naming": "replace"})
    db = tmp_path / "tags.db"

    # A Live Photo whose video shows something else: the pair is tagged from its still.
    tinyclip.picture("red", rng, (96, 80)).save(phone / "IMG_0001.HEIC")
    write_video(phone / "IMG_0001.MOV", ["blue"] * 15)
    save_picture(phone, "IMG_0002.jpg", "green", rng)
    write_video(phone / "VID_0003.mp4", ["yellow"] * 20)
    tinyclip.picture("blue", rng, (96, 80)).save(phone / "IMG_0004.avif")
    # A motion photo: a JPEG with its video (another colour) appended, tagged as the photo.
    still = phone / "PXL_0008.MP.jpg"
    save_picture(phone, still.name, "green", rng)
    clip = write_video(tmp_path / "inside.mp4", ["red"] * 15).read_bytes()
    still.write_bytes(still.read_bytes() + clip)
    # RAW+JPEG: the RAW file (blue throughout) takes the JPEG's tags, encoded once.
    save_picture(card, "DSC_0005.JPG", "yellow", rng)
    write_dng(
        card / "DSC_0005.DNG",
        tinyclip.picture("blue", rng, (300, 240)),
        preview=tinyclip.picture("blue", rng, (640, 480)),
    )
    # A RAW file alone, by its preview; one with no preview, by its sensor data.
    write_dng(
        card / "DSC_0006.DNG",
        tinyclip.picture("blue", rng, (300, 240)),
        preview=tinyclip.picture("green", rng, (640, 480)),
        orientation=6,
    )
    write_dng(card / "DSC_0007.NEF", tinyclip.picture("red", rng, (320, 256)))

    with Daemon(config) as daemon:
        wait_for(lambda: all_done(db, 10), 120, "every file")
        assert daemon.stop() == 0

    tags = {str(Path(p).relative_to(photo_dir)): labels for p, labels in labels_of(db).items()}
    assert tags == {
        "phone/IMG_0001.HEIC": ["red"], "phone/IMG_0001.MOV": ["red"],
        "phone/IMG_0002.jpg": ["green"], "phone/VID_0003.mp4": ["yellow"],
        "phone/IMG_0004.avif": ["blue"], "phone/PXL_0008.MP.jpg": ["green"],
        "card/DSC_0005.JPG": ["yellow"], "card/DSC_0005.DNG": ["yellow"],
        "card/DSC_0006.DNG": ["green"], "card/DSC_0007.NEF": ["red"],
    }  # fmt: skip
    # Encoded once: each pair's files hold the same embedding, byte for byte.
    vectors = dict(
        rows(db, "SELECT path, vector FROM embeddings JOIN photos ON photos.id = photo_id")
    )
    assert vectors[str(card / "DSC_0005.DNG")] == vectors[str(card / "DSC_0005.JPG")]
    assert vectors[str(phone / "IMG_0001.MOV")] == vectors[str(phone / "IMG_0001.HEIC")]
    # With `replace` naming, one sidecar for the pair.
    assert sorted(p.name for p in card.glob("*.xmp")) == [
        "DSC_0005.xmp", "DSC_0006.xmp", "DSC_0007.xmp"
    ]  # fmt: skip
    assert "yellow" in (card / "DSC_0005.xmp").read_text()

    def names(*options: str) -> list[str]:
        out = cliptagd("query", "-c", config, *options, "--format", "json").stdout
        return sorted(Path(row["path"]).name for row in json.loads(out))

    assert names("--tag", "red", "--kind", "video") == ["IMG_0001.MOV"]
    assert names("--tag", "yellow") == ["DSC_0005.DNG", "DSC_0005.JPG", "VID_0003.mp4"]
