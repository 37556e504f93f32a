"""The interactive demo (`ctfgen demo`, `make serve`): a local gradio app around a CTF pipeline.

    >>> app = build_app(ctfgen.pretrained("fashion-mnist"), ctfgen.pretrained("fashion-mnist-baseline"))
    >>> launch(app, host="127.0.0.1", port=7860)

It shows what stage 1 decided (the coarse preview), the final images, where stage 2 left the
representative codeword, the per-stage timings, and optionally the baseline for the same classes
and seed. The models are loaded once by the caller; the page only sends numbers and a class name,
and no path or file name from it is ever opened. Generation runs one request at a time behind a
bounded queue (`Limits.queue_size`); when it is full the page says "This application is currently busy.
Please try again." (gradio_client raises QueueError "Queue is full! Please try again."). Every number is
checked by `ctfgen.utils.options`, the same rules as the command line and the library: a bad one is answered
with a message in the page (gr.Error), never clamped, and never a traceback on the page or on the
server's console. Each request first clears the previous results, so an error leaves no stale ones.
Needs `pip install ctfgen[demo]`.
"""

from __future__ import annotations

import atexit
import io
import ipaddress
import os
import shutil
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ctfgen.app.figures import change_heat, heat_legend, heat_rgb, stage_figure, stage_rows
from ctfgen.data.fashion_mnist import CLASS_NAMES
from ctfgen.pipeline import CTFPipeline
from ctfgen.utils.errors import ConfigError, CtfgenError, WrongTypeError
from ctfgen.utils.fileio import atomic_write_bytes
from ctfgen.utils.images import to_uint8
from ctfgen.utils.options import COUNTS, SAMPLING, SEED, fmt

__all__ = ["Limits", "build_app", "launch", "is_loopback"]

DISPLAY_SIZE = 224  # 28x28 samples are enlarged (nearest) to this many pixels in the page
KEEP_DOWNLOADS = 64  # the newest download archives kept on disk; older ones are deleted


def is_loopback(host: str) -> bool:
    """A literal loopback address (127.0.0.0/8, ::1) or the name localhost. Any other name, even
    one spelt like an address ("127.example.com"), may resolve to an address others can reach."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, beyond the ranges every ctfgen caller shares (ctfgen.utils.options).
    Out-of-range values get a message, not a clamp, so the user knows what ran."""

    max_images: int = 16
    queue_size: int = 16


# The page's names for the options; the messages use them.
LABELS = {"cfg_scale": "Guidance", "temperature": "Stage-1 temperature", "temperature_fine": "Stage-2 temperature",
          "top_k_fine": "Stage-2 top-k", "seed": "Seed", "n": "Number of images"}


def _import_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls out of a local demo
    try:
        import gradio as gr
    except ImportError:
        raise ConfigError("the demo needs gradio: pip install 'ctfgen[demo]'") from None
    return gr


def _class_names(pipe) -> list[str]:
    names = getattr(pipe, "class_names", None)
    if names:
        return list(names)
    if pipe.num_classes == 10:
        return list(CLASS_NAMES)
    return [f"class {i}" for i in range(pipe.num_classes)]


def _enlarge(images: torch.Tensor) -> list[np.ndarray]:
    """(B, C, H, W) in [-1, 1] -> list of (S, S) or (S, S, 3) uint8 arrays, S = DISPLAY_SIZE."""
    out = []
    for a in to_uint8(images):
        img = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
        out.append(np.asarray(img.resize((DISPLAY_SIZE, DISPLAY_SIZE), Image.NEAREST)))
    return out


class DemoBackend:
    """The page's one action, kept apart from gradio so it can be called and tested directly."""

    def __init__(self, ctf, baseline=None, limits: Limits = Limits(), download_dir: str | Path | None = None):
        if not isinstance(ctf, CTFPipeline):
            raise WrongTypeError(f"the demo shows a CTF pipeline's stages; got {type(ctf).__name__}")
        if ctf.tokenizer is None or (baseline is not None and baseline.tokenizer is None):
            raise ConfigError("the demo's pipelines need tokenizers to decode images")
        self.ctf, self.baseline, self.limits = ctf, baseline, limits
        self.class_names = _class_names(ctf)
        self.max_top_k = int(ctf.sampling_limits["top_k_fine"])
        if download_dir is None:
            download_dir = tempfile.mkdtemp(prefix="ctfgen-demo-")
            atexit.register(shutil.rmtree, download_dir, ignore_errors=True)
        self.download_dir = Path(download_dir)
        self.download_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one generation at a time, whatever the queue's settings
        self._count = 0
        _ = ctf.representatives  # computed once at start, not on the first request

    def check(self, class_name, seed, cfg_scale, temperature, temperature_fine, top_k_fine, n_images) -> dict:
        """The request's options, or ConfigError (a ValueError) saying what is out of range: the
        ranges of ctfgen.utils.options, the model's own bounds, and `Limits.max_images`."""
        if class_name not in self.class_names:
            raise ConfigError(f"unknown class {class_name!r}; choose one of: {', '.join(self.class_names)}")
        n = COUNTS["images"].check(n_images, LABELS["n"], hi=self.limits.max_images)
        seed = SEED.check(seed, LABELS["seed"])
        given = dict(cfg_scale=cfg_scale, temperature=temperature, temperature_fine=temperature_fine, top_k_fine=top_k_fine)
        for name, value in given.items():
            if value is None:  # an emptied field is not "the default"
                raise ConfigError(f"{LABELS[name]} must be a number, got nothing")
        sampling = self.ctf.resolve_sampling(given, labels=LABELS)
        return dict(label=self.class_names.index(class_name), n=n, seed=seed,
                    **{k: sampling[k] for k in ("cfg_scale", "temperature", "temperature_fine", "top_k_fine")})

    @torch.inference_mode()
    def __call__(self, class_name, seed, cfg_scale, temperature, temperature_fine, top_k_fine, n_images,
                 compare: bool) -> dict:
        o = self.check(class_name, seed, cfg_scale, temperature, temperature_fine, top_k_fine, n_images)
        if compare and self.baseline is None:
            raise ConfigError("no baseline model is loaded: start the demo with --baseline DIR to compare")
        labels = torch.full((o["n"],), o["label"], dtype=torch.long, device=self.ctf.device)
        stage1 = dict(cfg_scale=o["cfg_scale"], temperature=o["temperature"])
        with self._lock:
            out = self.ctf(labels, generator=o["seed"], temperature_fine=o["temperature_fine"],
                           top_k_fine=o["top_k_fine"], **stage1)
            base = self.baseline(labels, generator=o["seed"], **stage1) if compare else None
        heat = change_heat(self.ctf, out)  # computed here, outside the lock
        result = dict(
            coarse=_enlarge(out.coarse_preview), final=_enlarge(out.images),
            heat=list(heat_rgb(heat, (DISPLAY_SIZE, DISPLAY_SIZE))),
            changed_fraction=float((heat > 0).float().mean()),
            baseline=None if base is None else _enlarge(base.images),
            timings={"CTF": out.timings, **({"baseline": base.timings} if base is not None else {})},
            options=o,
        )
        result["download"] = self._archive(o, out, base)
        return result

    def _archive(self, o: dict, out, base) -> Path:
        """A zip of the images as PNGs (28x28, as sampled) and the stage figure, under our own
        temporary directory; only the newest KEEP_DOWNLOADS archives are kept."""
        stem = f"ctfgen_{self.class_names[o['label']]}_seed{o['seed']}".replace("/", "-").replace(" ", "-")
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            def png(name, array):
                b = io.BytesIO()
                Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(b, format="PNG")
                zf.writestr(name, b.getvalue())

            rows = stage_rows(self.ctf, out)
            for i, (c, f) in enumerate(zip(to_uint8(out.coarse_preview), to_uint8(out.images))):
                png(f"ctf/{i:02d}.png", f)
                png(f"coarse_preview/{i:02d}.png", c)
            if base is not None:
                for i, b in enumerate(to_uint8(base.images)):
                    png(f"baseline/{i:02d}.png", b)
            fig = io.BytesIO()
            stage_figure(rows, nrow=8, scale=4).save(fig, format="PNG")
            zf.writestr("stages.png", fig.getvalue())
        with self._lock:
            self._count += 1
            path = self.download_dir / f"{self._count:06d}" / f"{stem}.zip"
        atomic_write_bytes(path, buf.getvalue())  # its folder is made; one left by an earlier backend is reused
        old = sorted(p for p in self.download_dir.iterdir() if p.is_dir())[:-KEEP_DOWNLOADS]
        for d in old:
            for f in d.iterdir():
                f.unlink(missing_ok=True)
            d.rmdir()
        return path


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def _timings_markdown(timings: dict, n: int, changed: float) -> str:
    """Per-stage times, one column per model; a stage a model does not have (the baseline's stage 2)
    is "–", not 0."""
    stages = [("stage1", "stage 1 (coarse, autoregressive)"), ("stage2", "stage 2 (fine, one pass)"),
              ("decode", "decode"), ("total", "total"), ("coarse_preview", "coarse preview decode (not in the total)")]
    cols = list(timings)
    lines = ["| | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for key, name in stages:
        if any(key in t for t in timings.values()):
            lines.append(f"| {name} | " + " | ".join(
                _duration(timings[c][key]) if key in timings[c] else "–" for c in cols) + " |")
    lines.append("| images/s | " + " | ".join(f"{n / max(timings[c]['total'], 1e-9):,.1f}" for c in cols) + " |")
    return ("\n".join(lines) + f"\n\nStage 2 chose a codeword other than its cluster's representative at "
            f"**{changed:.0%}** of positions.")


def _label(name: str, hi=None) -> str:
    """A field's label with its range, from the shared options: "Guidance (0 to 20; 1 = no guidance)"."""
    option = SAMPLING.get(name) or (SEED if name == "seed" else COUNTS["images"])
    hi = option.hi if hi is None else hi
    meaning = f"; {option.meaning}" if option.meaning and option is not COUNTS["images"] else ""
    return f"{LABELS.get(name, name)} ({fmt(option.lo)} to {fmt(hi)}{meaning})"


def build_app(ctf, baseline=None, limits: Limits = Limits(), title: str = "ctfgen: coarse-to-fine generation"):
    """A gradio Blocks app around loaded pipelines (CTF, and optionally the baseline)."""
    gr = _import_gradio()
    gen = DemoBackend(ctf, baseline, limits)
    names = gen.class_names
    default = ctf.sampling_defaults

    def generate(class_name, seed, cfg_scale, temperature, temperature_fine, top_k_fine, n_images, compare):
        try:
            r = gen(class_name, seed, cfg_scale, temperature, temperature_fine, top_k_fine, n_images, bool(compare))
        except (CtfgenError, ValueError) as e:  # the user's mistake: a message in the page, no traceback anywhere
            raise gr.Error(str(e), title="Cannot generate", print_exception=False) from None
        return (r["coarse"], r["final"], r["heat"], gr.update(value=r["baseline"], visible=r["baseline"] is not None),
                _timings_markdown(r["timings"], r["options"]["n"], r["changed_fraction"]), str(r["download"]))

    def clear():
        return [], [], [], gr.update(value=[]), "", None

    with gr.Blocks(title=title, delete_cache=(600, 1800)) as app:
        gr.Markdown(f"# {title}\nStage 1 samples a grid of *coarse labels* (clusters of codewords) "
                    "autoregressively; stage 2 picks every fine codeword in one pass. The **coarse preview** decodes "
                    "each coarse label through its cluster's representative codeword (the member nearest the "
                    "k-means centroid): it is what stage 1 alone decided.")
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                class_name = gr.Dropdown(names, value=names[7] if len(names) > 7 else names[0], label="Class",
                                         elem_id="class")
                # Plain number fields, not sliders: a slider moves a typed value into its range without a
                # word; here every value reaches the one check and an out-of-range one gets a message.
                n_images = gr.Number(min(8, limits.max_images), label=_label("n", limits.max_images), elem_id="n_images")
                seed = gr.Number(0, label=_label("seed"), elem_id="seed")
                cfg_scale = gr.Number(default["cfg_scale"], label=_label("cfg_scale"), step=0.1, elem_id="cfg_scale")
                temperature = gr.Number(default["temperature"], step=0.05, elem_id="temperature",
                                        label=_label("temperature") + "; also the baseline's")
                temperature_fine = gr.Number(default["temperature_fine"], step=0.05, elem_id="temperature_fine",
                                             label=_label("temperature_fine"))
                top_k_fine = gr.Number(default["top_k_fine"], elem_id="top_k_fine",
                                       label=f"{LABELS['top_k_fine']} (0 to {fmt(gen.max_top_k)}; 0 = all, 1 = argmax)")
                compare = gr.Checkbox(baseline is not None, label="Baseline side by side", elem_id="compare",
                                      interactive=baseline is not None)
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=3):
                # one row per stage, images in the same columns, as in `ctfgen sample --stages`
                gallery = dict(interactive=False, columns=8, fit_columns=False, height=250, format="png", preview=False, allow_preview=False)
                coarse = gr.Gallery(label="Coarse preview: what stage 1 decided", elem_id="coarse", **gallery)
                final = gr.Gallery(label="CTF: final images after stage 2", elem_id="final", **gallery)
                heat = gr.Gallery(label="Where stage 2 left the representative codeword (colour scale below)",
                                  elem_id="heat", **gallery)
                gr.Image(np.asarray(heat_legend(width=720, font_size=14)), label="Colour scale of the map above",
                         elem_id="heat_scale", interactive=False, show_label=False, container=False, buttons=[],
                         height=60)
                base = gr.Gallery(label="Baseline: same class and seed", elem_id="baseline",
                                  visible=baseline is not None, **gallery)
                with gr.Row():
                    timings = gr.Markdown(elem_id="timings")
                    download = gr.File(label="Download: PNGs and the stage figure (zip)", elem_id="download",
                                       interactive=False)
        outputs = [coarse, final, heat, base, timings, download]
        button.click(clear, None, outputs, queue=False, api_visibility="private").then(
            generate, [class_name, seed, cfg_scale, temperature, temperature_fine, top_k_fine, n_images, compare],
            outputs, api_name="generate", concurrency_limit=1)
    app.queue(max_size=limits.queue_size, default_concurrency_limit=1)
    return app


def launch(app, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve `app`; a host other than loopback prints a warning, since anyone who can reach it can use it.
    A port that is taken (or a host that is not this machine's) is a ConfigError, not gradio's OSError."""
    if not is_loopback(host):
        print(f"WARNING: serving on {host}: anyone who can reach this address can use the demo and its CPU/GPU. "
              "Use the default 127.0.0.1 unless you mean to share it.", file=sys.stderr)
    gr = _import_gradio()
    try:
        return app.launch(server_name=host, server_port=port, share=False, ssr_mode=False, show_error=False,
                          prevent_thread_lock=not block, quiet=False, theme=gr.themes.Default(font=["sans-serif"],
                          font_mono=["monospace"]), allowed_paths=[], favicon_path=None)
    except OSError as e:  # gradio's words name its own environment variable, not our options
        detail = str(e).split(". ")[0]
        raise ConfigError(f"cannot serve on {host}:{port}: the port is in use (another demo?) or {host} is not an "
                          f"address of this machine; choose another --port or --host ({detail})") from None
