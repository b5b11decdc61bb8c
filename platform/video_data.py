"""A procedural video source: class-labelled clips rendered on the fly, no download, any size.

A clip is one shape (disc, square, triangle, ring; its fill striped in the shape's own frame, so
that a spinning disc visibly spins) that moves by one kind of motion (translate: a straight line,
bouncing off the edges; orbit: a circle; spin: rotation in place; zoom: a pulsing scale) while its
colour changes, over a textured background (three gratings) that drifts as a whole, as a camera
pan would. The label is shape kind x motion kind, `label = shape * len(MOTIONS) + motion`.

What a video DiT's attention learns is in the data by construction: local windows (edges, texture,
the shape spans a few tokens), the same position across frames (the background drifts slowly, so a
token is best predicted from the same place in the neighbouring frames) and global stripes (one
shape and one palette per clip: every token depends on the shape's few tokens, wherever they are).

Motion is per second and frame f is at time f / fps, so `fps` changes how the motion is sampled, not
the motion: at 4 fps a clip is every other frame of the same clip at 8 fps.

Determinism: a clip's parameters come from NumPy's PCG64 stream seeded by (seed, index), drawn in an
order that neither the label nor the clip size changes. The pixels are float32 additions,
multiplications, divisions, square roots, abs, floor and min/max, which IEEE 754 rounds exactly, so
neither the CPU's vector units nor the thread count change a bit; the only trigonometry is per frame,
in float64 rounded to float32. Training sample i is clip i, an unbounded stream with no epochs; the
validation set is clips VAL_OFFSET .. VAL_OFFSET + data.val_clips - 1, which training never reaches.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

PROCEDURAL_VIDEO = "procedural_video"  # its name as `data.corpus`
SHAPES = ("disc", "square", "triangle", "ring")
MOTIONS = ("translate", "orbit", "spin", "zoom")
NUM_CLASSES = len(SHAPES) * len(MOTIONS)
VAL_OFFSET = 1 << 62  # the validation clips' first index
MAX_ZOOM = 1.45       # the zoom motion's largest scale (the shapes' margin from the edges allows for it)


@dataclass
class VideoDataConfig:
    frames: int = 8
    height: int = 32
    width: int = 32
    channels: int = 3
    fps: float = 8.0        # frames per second: motion is per second, fps only samples it
    seed: int = 0           # with the index, the only input of a clip
    val_clips: int = 64     # the fixed validation set

    def __post_init__(self):
        for key in ("frames", "height", "width", "channels", "val_clips"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"data.{key}={value!r}: expected a positive int")
        if isinstance(self.fps, bool) or not isinstance(self.fps, (int, float)) or not 0 < self.fps < math.inf:
            raise ValueError(f"data.fps={self.fps!r}: expected a positive number")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"data.seed={self.seed!r}: expected an int >= 0")

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES


class ProceduralVideo:
    """`clip(index) -> (video float32 [C, T, H, W] in [-1, 1], label)`, a pure function of (seed, index).

    Coordinates are in frame heights: y in [0, 1] down the rows, x in [0, width / height] along them.
    """

    def __init__(self, cfg: VideoDataConfig):
        self.cfg = cfg
        self.aspect = cfg.width / cfg.height
        self.y = ((torch.arange(cfg.height) + 0.5) / cfg.height)[None, :, None]  # [1, H, 1]
        self.x = ((torch.arange(cfg.width) + 0.5) / cfg.height)[None, None, :]   # [1, 1, W]
        self.times = np.arange(cfg.frames) / cfg.fps                             # seconds, float64

    def clip(self, index: int, label: int | None = None) -> tuple[torch.Tensor, int]:
        """Clip `index`; `label` renders that class instead of the drawn one, every other draw unchanged."""
        if not isinstance(index, int) or index < 0:
            raise ValueError(f"index: expected an int >= 0, got {index!r}")
        rng = np.random.default_rng([self.cfg.seed, index])
        drawn = int(rng.integers(NUM_CLASSES))  # first, so that a forced label leaves the rest as drawn
        label = drawn if label is None else label
        if not isinstance(label, int) or not 0 <= label < NUM_CLASSES:
            raise ValueError(f"label: expected an int in [0, {NUM_CLASSES}), got {label!r}")
        shape, motion = divmod(label, len(MOTIONS))
        background = self._background(rng)
        alpha, fill = self._shape(rng, SHAPES[shape], MOTIONS[motion])
        return (background + alpha * (fill - background)).clamp(-1.0, 1.0), label

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Videos [B, C, T, H, W] and labels [B] (int64) of the clips `indices`."""
        clips = [self.clip(index) for index in indices]
        return torch.stack([video for video, _ in clips]), torch.tensor([label for _, label in clips])

    def _background(self, rng: np.random.Generator) -> torch.Tensor:
        """A base colour plus three coloured triangle-wave gratings, all panning at one velocity."""
        channels = self.cfg.channels
        base = rng.uniform(-0.25, 0.25, channels)
        pan = _direction(rng.uniform(0, 2 * math.pi)) * rng.uniform(0.05, 0.2)  # heights per second
        video = _f32(base)[:, None, None, None].expand(-1, len(self.times), self.cfg.height, self.cfg.width)
        for _ in range(3):
            frequency = _direction(rng.uniform(0, 2 * math.pi)) * rng.uniform(1.5, 5.0)  # cycles per height
            phase, amplitude, colour = rng.uniform(), rng.uniform(0.05, 0.15), rng.uniform(-1, 1, channels)
            offset = phase - (frequency @ pan) * self.times  # per frame: the pan moves the grating
            fx, fy = float(np.float32(frequency[0])), float(np.float32(frequency[1]))
            grating = _triangle(self.x * fx + self.y * fy + _f32(offset)[:, None, None])  # [T, H, W]
            video = video + _f32(amplitude * colour)[:, None, None, None] * grating
        return video

    def _shape(self, rng: np.random.Generator, shape: str, motion: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The shape's coverage alpha [T, H, W] (a one-pixel ramp at the edge) and its fill [C, T, H, W]."""
        cfg, t = self.cfg, self.times
        radius, angle = rng.uniform(0.12, 0.2), rng.uniform(0, 2 * math.pi)  # frame heights; radians
        start, velocity = rng.uniform(size=2), _direction(rng.uniform(0, 2 * math.pi)) * rng.uniform(0.2, 0.4)
        orbit, turn = rng.uniform(0.1, 0.2), rng.choice([-1.0, 1.0]) * rng.uniform(1.5, 3.0)  # radius; rad/s
        zoom_period, zoom_phase = rng.uniform(0.8, 1.6), rng.uniform()
        colours, colour_period = _signed(rng, cfg.channels), rng.uniform(1.0, 2.5)
        colour_to, colour_phase, stripes = _signed(rng, cfg.channels), rng.uniform(), rng.uniform(0.4, 0.7)

        # Centre (x, y), rotation and scale per frame, float64 [T]; the margin keeps the shape inside.
        margin = 1.25 * MAX_ZOOM * radius + (orbit if motion == "orbit" else 0.0)
        low = np.minimum(margin, np.array([self.aspect, 1.0]) / 2)
        span = np.array([self.aspect, 1.0]) - 2 * low
        centre = np.broadcast_to(low + start * span, (len(t), 2))
        rotation, scale = np.full(len(t), angle), np.ones(len(t))
        if motion == "translate":
            centre = low + _bounce(start * span + velocity * t[:, None], span)
        elif motion == "orbit":
            centre = centre + orbit * np.stack([np.cos(turn * t + angle), np.sin(turn * t + angle)], axis=1)
        elif motion == "spin":
            rotation = angle + turn * t
        else:  # zoom
            scale = 1 + (MAX_ZOOM - 1) * _triangle(t / zoom_period + zoom_phase)

        # Pixel offsets in the shape's own frame, in units of its radius.
        cx, cy, cos, sin = (_f32(v)[:, None, None] for v in (centre[:, 0], centre[:, 1], np.cos(rotation), np.sin(rotation)))
        size = _f32(radius * scale)[:, None, None]
        dx, dy = self.x - cx, self.y - cy
        u, v = (cos * dx + sin * dy) / size, (cos * dy - sin * dx) / size
        if shape == "disc":
            distance = (u * u + v * v).sqrt() - 1
        elif shape == "square":
            distance = torch.maximum(u.abs(), v.abs()) - 0.85
        elif shape == "triangle":  # equilateral, inradius 0.6: the largest of its three edge distances
            h = float(np.float32(math.sqrt(3) / 2))
            distance = torch.maximum(torch.maximum(v, -h * u - 0.5 * v), h * u - 0.5 * v) - 0.6
        else:  # ring
            distance = ((u * u + v * v).sqrt() - 0.8).abs() - 0.25
        alpha = (0.5 - distance * size * cfg.height).clamp(0.0, 1.0)  # distance in pixels

        mix = (1 - np.cos(2 * math.pi * (t / colour_period + colour_phase))) / 2  # per frame, 0..1
        colour = _f32(colours[:, None] + (colour_to - colours)[:, None] * mix)[:, :, None, None]  # [C, T, 1, 1]
        return alpha, colour * (0.75 + 0.25 * _triangle(u / float(np.float32(stripes))))


class VideoBatches:
    """Rank-sharded micro-batches of clips, with `data.TokenBatches`' API: `get(micro_batch_index)` ->
    (videos float32 [micro_batch_size, C, T, H, W], labels int64 [micro_batch_size]), a pure function
    of its argument.

    Sample i of the run (counted over all ranks and micro-steps) is training clip i; rank r takes its
    own slice of each global micro-batch, so ranks never see the same clip in a step. split="val":
    the fixed validation set (data.val_clips clips), cycled, the same at every evaluation.
    """

    def __init__(self, cfg: VideoDataConfig, micro_batch_size: int, rank: int, world_size: int, split: str = "train"):
        if split not in ("train", "val"):
            raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
        if split == "val" and cfg.val_clips < micro_batch_size * world_size:
            raise ValueError(f"data.val_clips={cfg.val_clips}: too few for one global micro-batch of {micro_batch_size} x "
                             f"{world_size} clips (deepspeed.micro_batch_size x workers)")
        self.source, self.split = ProceduralVideo(cfg), split
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size

    @property
    def num_batches(self) -> int | None:
        """Global micro-batches in the validation set; None for the unbounded training stream."""
        if self.split == "train":
            return None
        return self.source.cfg.val_clips // (self.micro_batch_size * self.world_size)

    def get(self, micro_batch_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = (micro_batch_index * self.world_size + self.rank) * self.micro_batch_size
        samples = range(first, first + self.micro_batch_size)
        if self.split == "val":
            samples = [VAL_OFFSET + sample % self.source.cfg.val_clips for sample in samples]
        return self.source.batch(list(samples))


def _direction(angle: float) -> np.ndarray:
    return np.array([math.cos(angle), math.sin(angle)])


def _signed(rng: np.random.Generator, channels: int) -> np.ndarray:
    """A saturated colour: every channel +-0.6..1, so that the shape stands out of the background."""
    return rng.choice([-1.0, 1.0], channels) * rng.uniform(0.6, 1.0, channels)


def _triangle(z):
    """Triangle wave of period 1 in [-1, 1] (torch or NumPy): a grating with no transcendental function."""
    floor = torch.floor if isinstance(z, torch.Tensor) else np.floor
    return 4 * abs(z - floor(z) - 0.5) - 1


def _bounce(z: np.ndarray, span: np.ndarray) -> np.ndarray:
    """z folded into [0, span] as a ball bouncing between 0 and span (span 0: stays at 0)."""
    period = np.maximum(2 * span, 1e-12)
    return span - np.abs(span - np.mod(z, period))


def _f32(values) -> torch.Tensor:
    return torch.from_numpy(np.asarray(values, dtype=np.float32))
