"""Videos through the real daemon: tagged from a few frames, queried by kind, and a bad
video failed with its reason while the rest goes on."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from tests.helpers import (
    ConfigFactory,
    Daemon,
    all_done,
    cliptagd,
    labels_of,
    save_picture,
    statuses,
    wait_for,
)
from tests.media import write_sound, write_video


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
