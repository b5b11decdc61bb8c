"""The procedural video source (platform/video_data.py): deterministic clips that move, labels that
change them, frame rate as sampling, rank-sharded batches and a fixed validation set."""

import pytest
import torch

from sparta.platform.video_data import (
    MOTIONS,
    NUM_CLASSES,
    SHAPES,
    VAL_OFFSET,
    ProceduralVideo,
    VideoBatches,
    VideoDataConfig,
)

SMALL = VideoDataConfig(frames=6, height=16, width=24, seed=3, val_clips=8)


def test_a_clip_is_a_pure_function_of_seed_and_index():
    video, label = ProceduralVideo(SMALL).clip(5)
    again, label_again = ProceduralVideo(VideoDataConfig(**vars(SMALL))).clip(5)
    assert video.shape == (3, 6, 16, 24) and video.dtype == torch.float32
    assert torch.equal(video, again) and label == label_again
    assert -1.0 <= video.min() and video.max() <= 1.0
    assert not torch.equal(video, ProceduralVideo(SMALL).clip(6)[0])
    assert not torch.equal(video, ProceduralVideo(VideoDataConfig(**{**vars(SMALL), "seed": 4})).clip(5)[0])


def test_every_class_moves_and_the_label_changes_the_content():
    source = ProceduralVideo(SMALL)
    clips = [source.clip(11, label=label)[0] for label in range(NUM_CLASSES)]
    for label, video in enumerate(clips):
        motion = (video[:, 1:] - video[:, :-1]).abs().mean(dim=(0, 2, 3))
        assert (motion > 1e-3).all(), f"{SHAPES[label // len(MOTIONS)]} {MOTIONS[label % len(MOTIONS)]} does not move"
    for a in range(NUM_CLASSES):
        for b in range(a + 1, NUM_CLASSES):
            assert (clips[a] - clips[b]).abs().max() > 0.2, (a, b)
    # A forced label changes only the shape: the background (every other draw) stays as drawn.
    assert all(torch.equal(video[:, :, 0, 0], clips[0][:, :, 0, 0]) for video in clips)  # a corner: background


def test_labels_cover_every_shape_and_motion():
    source = ProceduralVideo(VideoDataConfig(frames=1, height=4, width=4))
    labels = {source.clip(index)[1] for index in range(200)}
    assert labels == set(range(NUM_CLASSES)) and VideoDataConfig().num_classes == len(SHAPES) * len(MOTIONS)


def test_fps_samples_the_same_motion_in_time():
    """At 4 fps, frame k is at k / 4 s: frame 2k of the same clip at 8 fps, to the bit."""
    fast, _ = ProceduralVideo(VideoDataConfig(frames=8, height=16, width=16, fps=8.0)).clip(2)
    slow, _ = ProceduralVideo(VideoDataConfig(frames=4, height=16, width=16, fps=4.0)).clip(2)
    assert torch.equal(slow, fast[:, ::2])


def test_channels_follow_the_config():
    video, _ = ProceduralVideo(VideoDataConfig(frames=2, height=8, width=8, channels=1)).clip(0)
    assert video.shape == (1, 2, 8, 8)


def test_ranks_share_each_global_micro_batch_without_overlap():
    whole_videos, whole_labels = VideoBatches(SMALL, 4, rank=0, world_size=1).get(3)
    parts = [VideoBatches(SMALL, 2, rank=rank, world_size=2).get(3) for rank in range(2)]
    assert whole_videos.shape == (4, 3, 6, 16, 24) and whole_labels.dtype == torch.int64
    assert torch.equal(whole_videos, torch.cat([videos for videos, _ in parts]))
    assert torch.equal(whole_labels, torch.cat([labels for _, labels in parts]))
    assert not torch.equal(parts[0][0], parts[1][0])
    source = ProceduralVideo(SMALL)
    assert torch.equal(parts[1][0][1], source.clip((3 * 2 + 1) * 2 + 1)[0])  # (batch * world + rank) * size + 1
    assert VideoBatches(SMALL, 2, rank=0, world_size=2).num_batches is None  # an unbounded stream


def test_the_validation_set_is_fixed_and_apart_from_training():
    val = VideoBatches(SMALL, 2, rank=1, world_size=2, split="val")
    assert val.num_batches == 2
    first, labels = val.get(0)
    assert torch.equal(first, val.get(0)[0]) and torch.equal(first, val.get(val.num_batches)[0])  # cycled
    source = ProceduralVideo(SMALL)
    assert torch.equal(first[0], source.clip(VAL_OFFSET + 2)[0]) and labels[0] == source.clip(VAL_OFFSET + 2)[1]
    train, _ = VideoBatches(SMALL, 2, rank=1, world_size=2).get(0)
    assert not torch.equal(first, train)


@pytest.mark.parametrize("overrides, message", [
    ({"frames": 0}, "data.frames=0: expected a positive int"),
    ({"height": 2.5}, "data.height=2.5"),
    ({"fps": 0}, "data.fps=0: expected a positive number"),
    ({"fps": float("nan")}, "data.fps=nan"),
    ({"seed": -1}, "data.seed=-1: expected an int >= 0"),
])
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        VideoDataConfig(**overrides)


def test_bad_requests_name_what_was_expected():
    with pytest.raises(ValueError, match=r"data\.val_clips=8: too few for one global micro-batch of 4 x 4 clips"):
        VideoBatches(SMALL, 4, rank=0, world_size=4, split="val")
    with pytest.raises(ValueError, match="split: expected 'train' or 'val'"):
        VideoBatches(SMALL, 4, rank=0, world_size=1, split="test")
    with pytest.raises(ValueError, match=r"label: expected an int in \[0, 16\), got 16"):
        ProceduralVideo(SMALL).clip(0, label=16)
    with pytest.raises(ValueError, match="index: expected an int >= 0"):
        ProceduralVideo(SMALL).clip(-1)
