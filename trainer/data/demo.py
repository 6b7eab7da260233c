"""`ltx-lora demo-data DIR`: a small synthetic dataset of real media files whose sound follows the motion.

Each clip is a coloured square sliding across a plain background, as H.264 + AAC mp4. Its soundtrack is a tone whose
pitch follows the square's horizontal position (two octaves from the left edge to the right), panned with it, and
whose loudness pulses when the square bounces off an edge. Captions say the same in plain words ("a red square slides
slowly to the right ..., its tone rising"), so caption, picture and sound carry one shared, learnable story. A few
still images with captions exercise the image path. Every sample has an IC-LoRA reference in `references/` (same
name): its mask, the shape in white on black, silent, as a segmentation control video would be.

The audio is stereo at 44.1 kHz, so preprocessing's resampling to 16 kHz runs as on real data. Content is a pure
function of the seed (container bytes may differ between encoder builds). Every file is written under a temporary
name and renamed, and `demo.json`, listing the files, is written last: a folder with it holds a complete dataset and
is left as it is.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from trainer.io import write_atomic

MARKER = "demo.json"
SAMPLE_RATE = 44100
AUDIO_BIT_RATE = 48000
LOW_PITCH_HZ = 220.0  # the tone at the left edge; two octaves higher (880 Hz) at the right edge
PITCH_OCTAVES = 2.0
BASE_LOUDNESS = 0.25
BOUNCE_LOUDNESS = 0.5  # added at a bounce, decaying with BOUNCE_DECAY_S
BOUNCE_DECAY_S = 0.06
REFERENCES = "references"
# The references: the shape in white on black.
CONTROL_BACKGROUND, CONTROL_SHAPE = (0, 0, 0), (255, 255, 255)

COLOURS = {
    "red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40),
    "white": (240, 240, 240), "orange": (245, 140, 20), "purple": (150, 50, 200), "cyan": (40, 220, 230),
}
BACKGROUNDS = {"grey": (90, 90, 90), "black": (12, 12, 12)}
# Fraction of the free track crossed per second.
SPEEDS = {"slowly": 0.6, "quickly": 1.6}


def write_demo_dataset(
    root: str | Path,
    num_clips: int = 6,
    num_images: int = 2,
    width: int = 192,
    height: int = 128,
    frames: int = 25,
    fps: float = 24.0,
    seed: int = 0,
) -> list[Path]:
    """Writes the dataset into `root` (created if needed) unless it already holds a complete one; returns the media
    files (clips, then images), each with its caption beside it (same stem, .txt)."""
    root = Path(root)
    marker = root / MARKER
    if marker.is_file():
        listed = json.loads(marker.read_text())
        media = [root / entry["file"] for entry in listed["clips"] + listed["images"]]
        if all(path.is_file() and path.with_suffix(".txt").is_file() and (root / REFERENCES / path.name).is_file()
               for path in media):
            return media
    if width % 2 or height % 2:
        raise ValueError(f"demo clips are H.264 in yuv420p, which needs an even width and height, not {width}x{height}")
    (root / REFERENCES).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = [str(name) for name in rng.permutation(list(COLOURS))]
    clips = []
    for index in range(num_clips):
        clip = _plan_clip(index, rng, colours[index % len(colours)], frames / fps)
        clip["file"] = f"clip_{index:03d}.mp4"
        _write_clip(root / clip["file"], clip, width, height, frames, fps)
        _write_clip(root / REFERENCES / clip["file"], clip, width, height, frames, fps, control=True)
        _write_caption(root / clip["file"], clip["caption"])
        clips.append(clip)
    images = []
    for index in range(num_images):
        image = _plan_image(index, rng, colours[(num_clips + index) % len(colours)])
        image["file"] = f"image_{index:03d}.png"
        _write_image(root / image["file"], image, width, height)
        _write_image(root / REFERENCES / image["file"], image, width, height, control=True)
        _write_caption(root / image["file"], image["caption"])
        images.append(image)
    listing = {"seed": seed, "width": width, "height": height, "frames": frames, "fps": fps,
               "sample_rate": SAMPLE_RATE, "clips": clips, "images": images}
    write_atomic(marker, lambda tmp: Path(tmp).write_text(json.dumps(listing, indent=2) + "\n"))
    return [root / entry["file"] for entry in clips + images]


# ---------------------------------------------------------------------------------------------------------------
# What each sample shows
# ---------------------------------------------------------------------------------------------------------------


def _square_position(x0: float, velocity: float, t: np.ndarray) -> np.ndarray:
    """Horizontal position in [0, 1] (0: touching the left edge, 1: the right) of a square moving at `velocity`
    (track lengths per second) from `x0`, reflected at the edges."""
    travelled = np.mod(x0 + velocity * t, 2.0)
    return np.where(travelled > 1.0, 2.0 - travelled, travelled)


def _bounce_times(x0: float, velocity: float, duration: float) -> list[float]:
    """When the square reaches an edge: the moving point x0 + v t crosses a whole number."""
    end = x0 + velocity * duration
    crossings = range(math.floor(min(x0, end)) + 1, math.ceil(max(x0, end)))
    return sorted((k - x0) / velocity for k in crossings)


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _band(y: float) -> str:
    return "along the top" if y < 1 / 3 else "through the middle" if y < 2 / 3 else "along the bottom"


def _plan_clip(index: int, rng: np.random.Generator, colour: str, duration: float) -> dict:
    """Directions alternate and speeds alternate in pairs, so every few clips cover each (direction, speed)."""
    direction = "right" if index % 2 == 0 else "left"
    speed = "slowly" if index // 2 % 2 == 0 else "quickly"
    background = str(rng.choice(list(BACKGROUNDS)))
    x0 = float(rng.uniform(0.0, 0.15)) if direction == "right" else float(rng.uniform(0.85, 1.0))
    velocity = SPEEDS[speed] * (1 if direction == "right" else -1)
    y = float(rng.uniform(0.1, 0.9))
    bounces = _bounce_times(x0, velocity, duration)
    towards = "rising" if direction == "right" else "falling"
    away = "falling" if direction == "right" else "rising"
    where = f"{_band(y)} of a {background} background"
    if not bounces:
        caption = f"{_a(colour)} square slides {speed} to the {direction} {where}, its tone {towards}"
    elif len(bounces) == 1:
        caption = (f"{_a(colour)} square moves {speed} to the {direction} {where}, bounces off the {direction} edge "
                   f"and comes back, its tone {towards} then {away}, with a beat at the bounce")
    else:
        caption = (f"{_a(colour)} square moves {speed} {where}, bouncing back and forth between the edges, its tone "
                   "rising and falling with it, with a beat at each bounce")
    return {"caption": caption, "colour": colour, "background": background, "direction": direction,
            "speed": speed, "x0": x0, "velocity": velocity, "y": y, "bounces": bounces}


def _plan_image(index: int, rng: np.random.Generator, colour: str) -> dict:
    shape = "circle" if index % 2 == 0 else "square"
    background = str(rng.choice(list(BACKGROUNDS)))
    vertical, horizontal = str(rng.choice(["top", "bottom"])), str(rng.choice(["left", "right"]))
    caption = (f"a still picture of {_a(colour)} {shape} in the {vertical} {horizontal} corner of a {background} "
               "background")
    return {"caption": caption, "colour": colour, "background": background, "shape": shape,
            "x": 0.15 if horizontal == "left" else 0.85, "y": 0.15 if vertical == "top" else 0.85}


# ---------------------------------------------------------------------------------------------------------------
# Rendering and writing
# ---------------------------------------------------------------------------------------------------------------


def _square_side(width: int, height: int) -> int:
    return min(width, height) // 4


def _draw(width: int, height: int, background: tuple, colour: tuple, x: float, y: float, shape: str = "square"):
    """RGB uint8 [height, width, 3]: the shape's box placed at (x, y) in [0, 1] of the free room on each axis."""
    side = _square_side(width, height)
    picture = np.empty((height, width, 3), np.uint8)
    picture[:] = background
    left, top = round(x * (width - side)), round(y * (height - side))
    box = picture[top : top + side, left : left + side]
    if shape == "circle":
        centre = (side - 1) / 2
        rows, cols = np.ogrid[:side, :side]
        box[(rows - centre) ** 2 + (cols - centre) ** 2 <= (side / 2) ** 2] = colour
    else:
        box[:] = colour
    return picture


def _soundtrack(clip: dict, duration: float) -> np.ndarray:
    """Stereo float32 [2, samples]: the tone's pitch and pan follow the square, a decaying beat marks each bounce."""
    t = np.arange(round(duration * SAMPLE_RATE)) / SAMPLE_RATE
    x = _square_position(clip["x0"], clip["velocity"], t)
    pitch = LOW_PITCH_HZ * 2.0 ** (PITCH_OCTAVES * x)
    tone = np.sin(2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE)
    loudness = np.full_like(t, BASE_LOUDNESS)
    for bounce in clip["bounces"]:
        after = t >= bounce
        loudness[after] += BOUNCE_LOUDNESS * np.exp(-(t[after] - bounce) / BOUNCE_DECAY_S)
    pan = x * np.pi / 2  # equal-power: left at x = 0, right at x = 1
    return np.stack([np.cos(pan), np.sin(pan)]).astype(np.float32) * (loudness * tone).astype(np.float32)


def _colours(sample: dict, control: bool) -> tuple[tuple, tuple]:
    """(background, shape) RGB: the sample's, or the reference's white on black."""
    if control:
        return CONTROL_BACKGROUND, CONTROL_SHAPE
    return BACKGROUNDS[sample["background"]], COLOURS[sample["colour"]]


def _write_clip(path: Path, clip: dict, width: int, height: int, frames: int, fps: float, control: bool = False) -> None:
    """The clip as H.264 + AAC mp4, or its silent reference (`control`)."""
    rate = Fraction(fps).limit_denominator(1001)
    background, colour = _colours(clip, control)
    duration = frames / fps
    times = np.arange(frames) / fps
    xs = _square_position(clip["x0"], clip["velocity"], times)

    def write(tmp: str) -> None:
        with av.open(tmp, "w", format="mp4") as container:
            video = container.add_stream("libx264", rate=rate)
            video.width, video.height, video.pix_fmt = width, height, "yuv420p"
            # Lossless: whatever x264 decides from run to run, the decoded pixels are the drawn ones.
            video.options = {"crf": "0", "preset": "ultrafast"}
            if not control:  # every stream is added before the first packet is written
                audio = container.add_stream("aac", rate=SAMPLE_RATE, layout="stereo")
                audio.bit_rate = AUDIO_BIT_RATE
            for index, x in enumerate(xs):
                frame = av.VideoFrame.from_ndarray(
                    _draw(width, height, background, colour, float(x), clip["y"]), format="rgb24"
                )
                frame.pts, frame.time_base = index, 1 / rate
                container.mux(video.encode(frame))
            container.mux(video.encode())
            if control:
                return
            sound = av.AudioFrame.from_ndarray(_soundtrack(clip, duration), format="fltp", layout="stereo")
            sound.sample_rate, sound.pts, sound.time_base = SAMPLE_RATE, 0, Fraction(1, SAMPLE_RATE)
            container.mux(audio.encode(sound))
            container.mux(audio.encode())

    write_atomic(path, write)


def _write_image(path: Path, image: dict, width: int, height: int, control: bool = False) -> None:
    picture = _draw(width, height, *_colours(image, control), image["x"], image["y"], image["shape"])
    write_atomic(path, lambda tmp: Image.fromarray(picture).save(tmp, format="PNG"))


def _write_caption(media: Path, caption: str) -> None:
    write_atomic(media.with_suffix(".txt"), lambda tmp: Path(tmp).write_text(caption + "\n", encoding="utf-8"))
