"""The web demo as a person and as a crowd use it: a real server on a free loopback port, driven by
headless Chromium, then 50 concurrent API requests. Skips with the reason when gradio, Playwright or
a browser is missing (`make test` installs them)."""

import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gradio", reason="the demo needs gradio: pip install 'ctfgen[demo]' (make install does)")

from _tiny_ctf import tiny_baseline, tiny_ctf  # noqa: E402

from ctfgen.app.demo import DISPLAY_SIZE, DemoBackend, Limits, is_loopback  # noqa: E402
from ctfgen.pipeline import ARPipeline, CTFPipeline  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The machines here have no network: without these flags Chromium waits on updates and sync.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
MAX_IMAGES = 8
QUEUE_SIZE = 8
START_TIMEOUT = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _get(url: str, timeout: float = 5.0) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`ctfgen demo` with the shipped models on a free 127.0.0.1 port; stopped at the end."""
    port = _free_port()
    tmp = tmp_path_factory.mktemp("demo")
    env = dict(os.environ, OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(tmp / "cache"),
               TMPDIR=str(tmp))
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "ctfgen.app.cli", "demo", "--port", str(port), "--device", "cpu",
                             "--max-images", str(MAX_IMAGES), "--queue-size", str(QUEUE_SIZE)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the demo exited with {proc.returncode}:\n{(tmp / 'server.log').read_text()}")
            try:
                if _get(url) == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the demo did not answer within {START_TIMEOUT} s:\n{(tmp / 'server.log').read_text()}")
            time.sleep(0.5)
        yield url, proc, tmp
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        log.close()


def _browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine: `apt-get install chromium` (make test does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed: pip install playwright (make install does)")
    return sync_playwright


def test_browser_generates_images_and_shows_errors(server):
    sync_playwright = _browser()
    url, proc, tmp = server
    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        ctx = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                                                   viewport={"width": 1400, "height": 1100}, timeout=60_000)
        try:
            page = ctx.new_page()
            page.set_default_timeout(90_000)
            page.goto(url)
            page.wait_for_selector("#generate")
            page.locator("#class input").click()
            page.get_by_role("option", name="Ankle boot").click()
            page.locator("#n_images input").fill("6")
            page.locator("#seed input").fill("5")
            page.locator("#generate").click()

            for gallery in ("#final", "#coarse", "#heat", "#baseline"):
                page.wait_for_function(f"document.querySelectorAll('{gallery} img').length == 6 && "
                                       f"[...document.querySelectorAll('{gallery} img')].every(i => i.complete && i.naturalWidth > 0)")
                sources = page.eval_on_selector_all(f"{gallery} img", "imgs => imgs.map(i => i.src)")
                assert len(sources) == 6
                from PIL import Image

                for src in sources:
                    img = Image.open(io.BytesIO(page.request.get(src).body()))
                    img.load()
                    assert img.size == (DISPLAY_SIZE, DISPLAY_SIZE)
                    assert len(np.unique(np.asarray(img.convert("L")))) > 2, "a blank image"
            page.wait_for_selector("#timings table")
            timing_text = page.locator("#timings").inner_text()
            assert "stage 1" in timing_text and "stage 2" in timing_text and "baseline" in timing_text
            assert "–" in timing_text  # the baseline's stage 2: it has none
            assert page.locator("#heat_scale img").count() == 1, "the heat map has no colour scale"
            assert page.locator("#download a").count() >= 1, "no download link"
            shot = tmp / "demo_app.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("CTFGEN_UPDATE_SCREENSHOT"):  # refresh the README's picture
                shutil.copy(shot, REPO / "docs" / "demo_app.png")

            page.locator("#n_images input").fill("99")
            page.locator("#generate").click()
            message = page.get_by_text(f"Number of images must be between 1 and {MAX_IMAGES}, got 99")
            message.first.wait_for(state="visible", timeout=30_000)
            assert "Traceback" not in page.content()
            # the error cleared the previous results: no stale images or timings stay on the page
            for gallery in ("#final", "#coarse", "#heat", "#baseline"):
                assert page.locator(f"{gallery} img").count() == 0, gallery
            assert page.locator("#timings table").count() == 0

            # a typed guidance of 50 is refused with the shared range, not moved to the edge of a slider
            page.locator("#n_images input").fill("2")
            page.locator("#cfg_scale input").fill("50")
            page.locator("#generate").click()
            page.get_by_text("Guidance must be between 0 and 20").first.wait_for(state="visible", timeout=30_000)
            assert page.locator("#cfg_scale input").input_value() == "50"
        finally:
            ctx.close()
    assert proc.poll() is None
    log = (tmp / "server.log").read_text()
    assert "Traceback" not in log, log  # users' mistakes are not the server's errors


def test_fifty_concurrent_requests(server):
    """Every request succeeds or is told the app is busy; the server stays healthy and gives its memory back."""
    from gradio_client import Client
    from gradio_client.utils import QueueError

    url, proc, _ = server
    client = Client(url, verbose=False, download_files=False, max_workers=50)
    args = ("Sneaker", 0, 2.0, 1.1, 1.1, 0, 2, True)
    for _ in range(3):  # warm up: first calls allocate caches, load gradio's lazily imported parts
        client.predict(*args, api_name="/generate")
    rss_before = _rss_bytes(proc.pid)

    def one(i):
        job = client.submit("Sneaker", i, 2.0, 1.1, 1.1, 0, 2, True, api_name="/generate")
        try:
            result = job.result(timeout=240)
            return "ok" if len(result[1]) == 2 else f"wrong count {len(result[1])}"
        except QueueError as e:
            return "busy" if "try again" in str(e).lower() else f"queue error {e}"
        except Exception as e:  # noqa: BLE001 - any other outcome fails the test below, with its text
            return f"{type(e).__name__}: {e}"

    t0 = time.monotonic()
    with ThreadPoolExecutor(50) as pool:
        outcomes = list(pool.map(one, range(50)))
    burst_s = time.monotonic() - t0
    counts = {k: outcomes.count(k) for k in set(outcomes)}
    print(f"50 concurrent requests in {burst_s:.1f} s: {counts}")
    assert set(counts) <= {"ok", "busy"}, counts
    assert counts.get("ok", 0) >= QUEUE_SIZE  # the queue took work, it did not turn everyone away

    assert proc.poll() is None and _get(url) == 200
    assert len(client.predict(*args, api_name="/generate")[1]) == 2
    deadline = time.monotonic() + 30
    while (rss := _rss_bytes(proc.pid)) > 1.2 * rss_before and time.monotonic() < deadline:
        time.sleep(1)
    print(f"server RSS {rss_before / 2**20:.0f} MiB before, {rss / 2**20:.0f} MiB after")
    assert rss <= 1.2 * rss_before, (rss_before, rss)
    client.close()


def test_rejected_input_is_a_message_and_no_traceback_on_the_console(server):
    """Out-of-range values through the API (no browser needed): the caller gets the shared rule's
    message, the server's console stays free of tracebacks."""
    from gradio_client import Client

    url, proc, tmp = server
    client = Client(url, verbose=False, download_files=False)
    for args, message in ((("Sneaker", 0, 50, 1.1, 1.1, 0, 2, True), "Guidance must be between 0 and 20"),
                          (("Sneaker", -1, 2.0, 1.1, 1.1, 0, 2, True), "Seed must be between 0 and 4,294,967,295"),
                          (("Sneaker", 0, 2.0, 1.1, 1.1, 0, 99, True), f"Number of images must be between 1 and {MAX_IMAGES}")):
        with pytest.raises(Exception, match=message):
            client.predict(*args, api_name="/generate")
    client.close()
    assert proc.poll() is None
    log = (tmp / "server.log").read_text()
    assert "Traceback" not in log, log


# ------------------------------------------------------------------ the app's logic without a server
@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    ar, aux, cmap, vq = tiny_ctf(vocab=8, num_coarse=3, num_classes=10)
    gpt, _ = tiny_baseline(vocab=8, num_classes=10, vq=vq)
    return DemoBackend(CTFPipeline(ar, aux, cmap, vq), ARPipeline(gpt, vq), Limits(max_images=4),
                     download_dir=tmp_path_factory.mktemp("downloads"))


def test_backend_checks_every_option_with_the_shared_rules(backend):
    """The page's numbers go through ctfgen.utils.options, as the command line's do: same ranges, same words,
    numbers written for people, nothing moved into range."""
    from ctfgen.app.cli import main

    ok = ("Sneaker", 0, 2.0, 1.0, 1.0, 0, 2)
    assert backend.check(*ok)["label"] == 7
    assert backend.check("Sneaker", 0, 2.0, 0.0, 3.5, 0, 2)["temperature"] == 0.0  # 0 = greedy, 3.5 allowed: no own range
    bad = {0: ("Spaceship", "unknown class"), 1: (-1, "Seed must be between 0 and 4,294,967,295, got -1"),
           2: (50, r"Guidance must be between 0 and 20 \(1 = no guidance, 0 = unconditional\), got 50"),
           3: (-0.5, "Stage-1 temperature must be between 0 and 10"), 4: (float("nan"), "Stage-2 temperature"),
           5: (99, f"Stage-2 top-k must be between 0 and {backend.max_top_k} "), 6: (5, "Number of images must be between 1 and 4, got 5"),
           }
    for i, (value, message) in bad.items():
        args = list(ok)
        args[i] = value
        with pytest.raises(ValueError, match=message):
            backend.check(*args)
    with pytest.raises(ValueError, match="whole number"):
        backend.check("Sneaker", 0.5, 2.0, 1.0, 1.0, 0, 2)
    with pytest.raises(ValueError, match="Guidance must be a number, got nothing"):
        backend.check("Sneaker", 0, None, 1.0, 1.0, 0, 2)
    # an integer too large for a float (JSON from the page may hold one): the rule's message, not an OverflowError
    for i, message in ((1, "Seed must be between 0 and 4,294,967,295"),
                       (6, "Number of images must be between 1 and 4")):
        args = list(ok)
        args[i] = 10**400
        with pytest.raises(ValueError, match=message + ", got a number of over 300 digits"):
            backend.check(*args)
    assert main(["sample", "--seed", "9" * 400, "--out", "never-written.png"]) == 2
    # the command line answers the same values with the same rule, named by its flag
    for flag, value, message in (("--cfg-scale", "50", "--cfg-scale must be between 0 and 20"),
                                 ("--temperature", "-0.5", "--temperature must be between 0 and 10"),
                                 ("--seed", "-1", "--seed must be between 0 and 4,294,967,295")):
        assert main(["sample", flag, value, "--out", "never-written.png"]) == 2
    assert not Path("never-written.png").exists()


def test_backend_output_and_download(backend):
    import zipfile

    r = backend("Bag", 3, 2.0, 1.0, 1.0, 0, 3, True)
    assert len(r["coarse"]) == len(r["final"]) == len(r["heat"]) == len(r["baseline"]) == 3
    assert r["heat"][0].shape == (DISPLAY_SIZE, DISPLAY_SIZE, 3)
    assert r["final"][0].shape[:2] == (DISPLAY_SIZE, DISPLAY_SIZE)
    assert set(r["timings"]) == {"CTF", "baseline"} and "coarse_preview" in r["timings"]["CTF"]
    names = zipfile.ZipFile(r["download"]).namelist()
    assert "stages.png" in names and "ctf/02.png" in names and "coarse_preview/00.png" in names
    assert "baseline/00.png" in names
    # same seed, same pictures: the page is reproducible
    again = backend("Bag", 3, 2.0, 1.0, 1.0, 0, 3, False)
    assert again["baseline"] is None and all((a == b).all() for a, b in zip(r["final"], again["final"]))


def test_a_backend_reusing_a_download_folder_writes_its_downloads(tmp_path):
    """A second backend on the same download folder (a restarted demo) met the first one's 000001/ with a
    FileExistsError."""
    ar, aux, cmap, vq = tiny_ctf(vocab=8, num_coarse=3, num_classes=10)
    for _ in range(2):
        r = DemoBackend(CTFPipeline(ar, aux, cmap, vq), None, Limits(max_images=4), download_dir=tmp_path)(
            "Bag", 3, 2.0, 1.0, 1.0, 0, 1, False)
        assert Path(r["download"]).is_file()


def test_timings_table_is_for_people():
    from ctfgen.app.demo import _timings_markdown

    table = _timings_markdown({"CTF": {"stage1": 1.234, "stage2": 0.05, "decode": 0.01, "total": 1.294, "coarse_preview": 0.01},
                               "baseline": {"stage1": 12.5, "decode": 0.01, "total": 12.51}}, 8, 0.25)
    stage2 = next(line for line in table.splitlines() if line.startswith("| stage 2"))
    assert stage2.endswith("| 50 ms | – |")  # the baseline has no stage 2: a dash, not 0
    assert "| 1,234 ms |" in table and "| 12.5 s |" in table and "**25%**" in table


def test_loopback_hosts():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    # names are not addresses: these may resolve anywhere, so they get the warning
    assert not is_loopback("127.example.com") and not is_loopback("127.0.0.1.nip.io")
    assert not is_loopback("localhost.example.com") and not is_loopback("::2")
    assert is_loopback("127.0.1.1") and is_loopback("LocalHost")


def test_demo_warns_for_a_public_host(monkeypatch, capsys):
    import gradio as gr

    from ctfgen.app import demo as app_module

    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.update(kw))
    app_module.launch(gr.Blocks(), host="0.0.0.0", port=1)
    assert "WARNING" in capsys.readouterr().err and launched["server_name"] == "0.0.0.0"
    app_module.launch(gr.Blocks(), host="127.0.0.1", port=1)
    assert capsys.readouterr().err == ""


def test_a_port_in_use_is_one_error_line():
    """A second demo on the same port: `error: ...` and status 2, not gradio's OSError traceback."""
    import gradio as gr

    from ctfgen.app import demo as app_module
    from ctfgen.utils.errors import ConfigError

    with gr.Blocks() as app:
        gr.Markdown("nothing to serve")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot serve on 127.0.0.1:{port}: the port is in use .*--port"):
            app_module.launch(app, host="127.0.0.1", port=port, block=False)


def test_demo_command_finds_the_baseline_and_refuses_a_baseline_model(tmp_path, monkeypatch, capsys):
    from ctfgen.app.cli import main
    from ctfgen.app.commands import sample as demo_command  # where run_demo finds `launch`

    ar, aux, cmap, vq = tiny_ctf(vocab=8, num_coarse=3, num_classes=10)
    CTFPipeline(ar, aux, cmap, vq).save_pretrained(tmp_path / "run" / "ctf")
    gpt, _ = tiny_baseline(vocab=8, num_classes=10, vq=vq)
    ARPipeline(gpt, None).save_pretrained(tmp_path / "run" / "baseline")
    served = []
    monkeypatch.setattr(demo_command, "launch", lambda app, host, port: served.append((app, host, port)))
    assert main(["demo", "--model", str(tmp_path / "run" / "ctf"), "--port", "1234"]) == 0
    (app, host, port), = served
    assert (host, port) == ("127.0.0.1", 1234)
    assert any(getattr(b, "elem_id", None) == "baseline" and b.visible for b in app.blocks.values())
    assert main(["demo", "--model", str(tmp_path / "run" / "baseline")]) == 2
    assert "is a baseline" in capsys.readouterr().err
    assert main(["demo", "--model", str(tmp_path / "run" / "ctf"), "--port", "0"]) == 2
    assert "--port must be" in capsys.readouterr().err
