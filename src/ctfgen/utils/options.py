"""Every number, device and output path a user gives ctfgen, checked in one place.

The command line, the web demo and the library's public calls (`pipe.sample`, `pipe.sample_tokens`,
`pipe(...)`, `ctfgen.generate`) check through here, so one value gets one answer everywhere:

    >>> check_sampling({"temperature": -1})
    ConfigError: temperature must be between 0 and 10 (0 = greedy: always the most likely token), got -1

A value outside its range is refused with its name and its range, never clamped. Callers name the
value as their user knows it (`--temperature` on the command line, "Stage-1 temperature" in the
demo). Bounds that depend on the model (top-k: its vocabulary; cfg_steps: its sequence length) are
given by the pipeline at check time.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ctfgen.utils.errors import ConfigError, MismatchError, WrongTypeError

__all__ = ["Option", "SAMPLING", "COUNTS", "SEED", "MAX_SAMPLE_IMAGES", "MAX_GRID_PIXELS", "check", "check_sampling",
           "check_seed", "fmt", "available_devices", "default_device", "check_device", "check_output_file",
           "check_output_dir", "image_suffixes", "cli_help", "integer_tokens", "tokens_below", "whole_numbers"]

# `ctfgen sample` keeps its grid in memory; larger sets stream to disk with `ctfgen sample-many`.
MAX_SAMPLE_IMAGES = 1024
MAX_GRID_PIXELS = 64 * 2**20   # the grid PNG, after --scale


def fmt(value) -> str:
    """A number as people read it: 4,294,967,295 and 0.05, not 4.29497e+09 and 0.05000000 (thousands
    separated from 100,000 on, so a port stays 65535)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return repr(value)
    if isinstance(value, numbers.Integral) or (math.isfinite(value) and value == int(value) and abs(value) >= 1e4):
        return f"{int(value):,}" if abs(value) >= 100_000 else str(int(value))
    return f"{float(value):g}"


@dataclass(frozen=True)
class Option:
    """A user-facing number: its range, and what its special values mean."""

    name: str                      # the library's keyword; the command line's flag is --name-with-dashes
    lo: float
    hi: float | None = math.inf    # None: the model gives the bound at check time
    integer: bool = False
    lo_open: bool = False          # `lo` itself is refused (top_p > 0)
    meaning: str = ""              # what special values mean, e.g. "0 = greedy"
    help: str = ""                 # what it does, for --help

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def range_text(self, hi: float | None = None) -> str:
        hi = self.hi if hi is None else hi
        if hi is None or hi == math.inf:
            text = f"greater than {fmt(self.lo)}" if self.lo_open else f"at least {fmt(self.lo)}"
        elif self.lo_open:
            text = f"greater than {fmt(self.lo)} and at most {fmt(hi)}"
        else:
            text = f"between {fmt(self.lo)} and {fmt(hi)}"
        return text + (f" ({self.meaning})" if self.meaning else "")

    def check(self, value, label: str | None = None, hi: float | None = None):
        """`value` as an int or float, or ConfigError naming `label` and the range."""
        label = label or self.name
        if isinstance(value, bool) or value is None:
            raise ConfigError(f"{label} must be a number, got {value!r}")
        hi = self.hi if hi is None else hi
        try:
            v = float(value)  # numbers, numpy scalars, 0-d tensors, and text from a web page
        except (TypeError, ValueError):
            raise ConfigError(f"{label} must be a number, got {value!r}") from None
        except OverflowError:  # an integer beyond float's range, e.g. a 400-digit seed: outside every range
            raise ConfigError(f"{label} must be {self.range_text(hi)}, got a number of over 300 digits") from None
        shown = fmt(int(v)) if math.isfinite(v) and v == int(v) else fmt(v)
        below = v <= self.lo if self.lo_open else v < self.lo
        if not math.isfinite(v) or below or (hi is not None and v > hi):
            raise ConfigError(f"{label} must be {self.range_text(hi)}, got {shown}")
        if self.integer:
            if v != int(v):
                raise ConfigError(f"{label} must be a whole number, got {shown}")
            return int(v)
        return v


GREEDY = "0 = greedy: always the most likely token"
SAMPLING = {o.name: o for o in (
    Option("cfg_scale", 0.0, 20.0, meaning="1 = no guidance, 0 = unconditional",
           help="classifier-free guidance of stage 1 (CTF) or of the baseline"),
    Option("cfg_steps", 0, None, integer=True, meaning="at most the number of tokens; unset = every token",
           help="guide only the first N tokens"),
    Option("temperature", 0.0, 10.0, meaning=GREEDY, help="stage-1 (CTF) or baseline temperature"),
    Option("top_k", 0, None, integer=True, meaning="0 = all, 1 = argmax; at most the vocabulary",
           help="stage-1 (CTF) or baseline top-k"),
    Option("top_p", 0.0, 1.0, lo_open=True, meaning="1 = all", help="stage-1 (CTF) or baseline nucleus (top-p) mass"),
    Option("temperature_fine", 0.0, 10.0, meaning=GREEDY, help="stage-2 temperature (CTF only)"),
    Option("top_k_fine", 0, None, integer=True,
           meaning="0 = all, 1 = argmax; at most a cluster's size when stage 2 samples within clusters",
           help="stage-2 top-k (CTF only)"),
    Option("cfg_scale_fine", 0.0, 20.0, meaning="1 = off, the default", help="stage-2 guidance (CTF only)"),
)}

CLASS_ID = Option("class", 0, integer=True, help="class id")
SEED = Option("seed", 0, 2**32 - 1, integer=True, help="random seed: the same seed gives the same images")

COUNTS = {o.name: o for o in (
    Option("n", 1, MAX_SAMPLE_IMAGES, integer=True,
           meaning="larger sets: `ctfgen sample-many`, which streams to disk", help="number of images"),
    Option("per_class", 1, integer=True, help="images per class"),
    Option("batch_size", 1, integer=True, help="images sampled at once"),
    Option("nrow", 1, integer=True, help="images per row of the grid"),
    Option("scale", 1, 64, integer=True, help="enlarge the grid by this factor (nearest)"),
    Option("images", 1, integer=True, help="number of images"),
    Option("max_images", 1, integer=True, help="images per request at most"),
    Option("queue_size", 1, integer=True, help="requests waiting at most"),
    Option("port", 1, 65535, integer=True, help="TCP port"),
    # the other numbers commands take, by the name of their flag (--num-coarse: num_coarse)
    Option("num_coarse", 1, integer=True, help="number of coarse labels K"),
    Option("n_init", 1, integer=True, help="k-means restarts"),
    Option("repeats", 1, integer=True, help="timed runs per setting"),
    Option("image_tokens", 1, integer=True, help="tokens per image"),
    Option("image_size", 1, integer=True, help="image side in pixels"),
    Option("crop_range", 1.0, help="ten-crop's centre crop, as a multiple of the image size"),
    Option("limit", 1, integer=True, help="the first N images only"),
    Option("num_workers", 0, integer=True, meaning="0 = load in the main process", help="data-loading processes"),
    Option("k", 1, integer=True, help="nearest neighbour for the precision/recall radii"),
    Option("splits", 1, integer=True, help="splits of the Inception Score"),
    Option("epoch", 0, integer=True, help="training epoch of the evaluated model"),
    Option("epochs", 1, integer=True, help="passes over the training images"),
    Option("lr", 0.0, lo_open=True, help="learning rate"),
    Option("validation_images", 0, integer=True, meaning="0 = none held out", help="training images held out"),
    Option("grid_columns", 1, integer=True, help="images shown in the grid"),
    Option("tokenizer_images", 1, integer=True, help="test images for codebook usage and PSNR"),
)}


def check(name: str, value, label: str | None = None, hi: float | None = None):
    """Check one named value (a sampling option, a count, or "seed")."""
    option = SEED if name == "seed" else SAMPLING.get(name) or COUNTS.get(name)
    if option is None:
        raise ConfigError(f"no option named {name!r}")
    return option.check(value, label, hi)


def check_seed(seed, label: str = "seed") -> int:
    return SEED.check(seed, label)


def check_sampling(options: dict, limits: dict | None = None, labels: dict | None = None) -> dict:
    """Sampling options (None = unset, kept) checked against their ranges; `limits` gives the
    model's bounds (top_k, top_k_fine, cfg_steps), `labels` the names to use in messages."""
    limits, labels = limits or {}, labels or {}
    out = {}
    for name, value in options.items():
        option = SAMPLING.get(name)
        if option is None or value is None:
            out[name] = value
            continue
        hi = limits.get(name)
        if option.hi is None and hi is None:
            hi = math.inf  # no model at hand: only the lower bound applies
        out[name] = option.check(value, labels.get(name, name), hi)
    return out


def cli_help(option: Option) -> str:
    """--help text: what the option does and its range."""
    return f"{option.help}; {option.range_text()}" if option.help else option.range_text()


# --- devices ---------------------------------------------------------------------------------------

def available_devices() -> list[str]:
    """The devices this torch build and machine have: cpu, and cuda / cuda:N, mps, xpu where present."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        out += ["xpu"] + [f"xpu:{i}" for i in range(xpu.device_count())]
    return out


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device, label: str = "device") -> str | None:
    """`device` (a name or torch.device; "auto": cuda when available, else cpu; None stays None, for
    callers that choose later) if this machine has it, else one ConfigError line that lists the
    devices it has."""
    if device is None:
        return None
    text = str(device).strip()
    if text == "auto":
        return default_device()
    available = available_devices()
    hint = f"available here: {', '.join(available)}"
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{label} {text!r} is not a device name; {hint}") from None
    kind = parsed.type
    if kind == "cpu":
        return text
    if kind == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ConfigError(f"{label} {text!r} is not available: {why}; {hint}")
    if kind not in available:
        raise ConfigError(f"{label} {text!r} is not available on this machine; {hint}")
    if parsed.index is not None and f"{kind}:{parsed.index}" not in available:
        raise ConfigError(f"{label} {text!r} is not available: there is no {kind} device {parsed.index}; {hint}")
    return text


# --- output paths ----------------------------------------------------------------------------------

# Formats for pictures of samples; Pillow writes more, but these are the ones people view.
COMMON_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@functools.lru_cache(maxsize=None)
def image_suffixes() -> tuple[str, ...]:
    """The common image extensions this Pillow can write."""
    Image.init()
    writable = {ext for ext, format in Image.registered_extensions().items() if format in Image.SAVE}
    return tuple(s for s in COMMON_IMAGE_SUFFIXES if s in writable)


def _writable(path: Path, label: str, place: Path) -> None:
    """`place`, or the nearest of its parents that exists (the rest is made), is a directory this user writes in."""
    while not place.exists() and place != place.parent:
        place = place.parent
    if not place.is_dir():
        raise ConfigError(f"{label} {path}: {place} is a file, so no directory can be made there")
    if not os.access(place, os.W_OK | os.X_OK):
        raise ConfigError(f"{label} {path}: cannot write in {place} (permission denied)")


def check_output_file(path, suffixes: tuple[str, ...] | str | None = None, label: str = "--out") -> Path:
    """An output file that can be written: the right extension, not a directory, a writable place.
    `suffixes="image"` means any image format Pillow writes. Checked before any work starts."""
    path = Path(path)
    if suffixes == "image":
        if path.suffix.lower() not in image_suffixes():
            raise ConfigError(f"{label} {str(path)!r} needs an image extension: {', '.join(image_suffixes())} "
                              f"(got {path.suffix or 'none'})")
    elif suffixes:
        suffixes = (suffixes,) if isinstance(suffixes, str) else tuple(suffixes)
        if path.suffix.lower() not in suffixes:
            raise ConfigError(f"{label} {str(path)!r} must end in {' or '.join(suffixes)} (got {path.suffix or 'none'})")
    if path.is_dir():
        raise ConfigError(f"{label} {path} is a directory; give a file name inside it")
    _writable(path, label, path.parent)
    return path


def check_output_dir(path, label: str = "--out") -> Path:
    """An output directory that exists as one or can be made, and can be written in."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{label} {path} is a file, not a directory")
    _writable(path, label, path)
    return path


# --- token and label tensors ------------------------------------------------------------------------

def integer_tokens(tokens, what: str = "tokens") -> torch.Tensor:
    """`tokens` as a tensor of integers; floats are refused, since a cast to int64 would truncate them, and
    bools, which it would take for tokens 0 and 1 (a mask passed by mistake)."""
    try:
        tokens = torch.as_tensor(tokens)
    except (TypeError, ValueError, RuntimeError) as e:  # ragged lists, strings, None
        raise WrongTypeError(f"{what} must be an integer tensor or a nested list of integers with rows of one "
                             f"length; torch could not read the {type(tokens).__name__} given: {e}") from None
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise WrongTypeError(f"{what} must be an integer tensor, got {tokens.dtype}")
    return tokens


def tokens_below(tokens, n: int, what: str = "tokens", hint: str = "", error: type = MismatchError) -> torch.Tensor:
    """`tokens` (integer_tokens) as int64, each in [0, n); otherwise `error` naming their range, and `hint`
    (what a stray one suggests). Past `n` they would index beyond an embedding or a table: an IndexError,
    a device assert on CUDA."""
    tokens = integer_tokens(tokens, what).long()  # int64 before min/max, which torch lacks for uint16..uint64
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= n):
        raise error(f"{what} must be in [0, {n}), got range [{int(tokens.min())}, {int(tokens.max())}]"
                    + (f"; {hint}" if hint else ""))
    return tokens


def whole_numbers(values, refusal: str, error: type = ConfigError) -> torch.Tensor:
    """`values` as an int64 tensor, refused (`error`, its message opening with `refusal`) where a cast would
    change them: a cast to int64 alone truncates 2.5 to 2 and takes True for 1. Whole floats (2.0) are taken."""
    try:
        raw = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError):
        raise error(f"{refusal}, got {values!r}") from None
    if raw.dtype == torch.bool or raw.is_complex():
        raise error(f"{refusal}, got a {raw.dtype} tensor")
    if raw.is_floating_point() and not bool((raw == raw.round()).all()):
        flat = raw.reshape(-1)
        raise error(f"{refusal}, got {flat[flat != flat.round()][0].item()}")
    return raw.to(torch.long)
