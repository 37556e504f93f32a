"""The measurements behind docs/performance.md, at tiny sizes: they run, they add up, they clean up."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from _tiny_ctf import tiny_baseline, tiny_ctf
from ctfgen.app import bench
from ctfgen.utils import precision, threads
from ctfgen.app.cli import main
from ctfgen.models import transformer
from ctfgen.pipeline import ARPipeline, CTFPipeline


def test_profile_decode_parts_add_up_and_the_library_is_restored(tmp_path, capsys):
    originals = (transformer.apply_rotary_emb, transformer.cached_attention, torch.nn.Linear.forward,
                 transformer.RMSNorm.forward)
    out = tmp_path / "profile.json"
    assert main(["bench", "--profile", "--models", "GPT-tiny", "--batch-sizes", "2", "--image-tokens", "16",
                 "--dtype", "float32", "int8-fbgemm", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"float32", "int8-fbgemm"}
    for r in results.values():
        ms = r["ms_per_step"]
        for part in ("linear", "head", "attention", "norms", "rope", "guidance", "sampling"):
            assert ms[part] > 0, part
        parts = sum(ms[k] for k in (*bench.PARTS, "other"))  # disjoint scopes within the window
        assert parts <= ms["profiled"] and ms["python"] == pytest.approx(ms["profiled"] - parts)
        assert r["linear_gflops"] > 0 and r["tokens_per_s"] > 0 and ms["step"] > 0
    table = capsys.readouterr().out
    assert "| ms per decode step | float32 | int8-fbgemm |" in table and "| RoPE |" in table
    assert (transformer.apply_rotary_emb, transformer.cached_attention, torch.nn.Linear.forward,
            transformer.RMSNorm.forward) == originals


@pytest.mark.parametrize("mode", ["--profile", "--speedups"])
@pytest.mark.parametrize("image_tokens", ["1", "4"])
def test_decode_profiles_refuse_a_grid_too_small_for_their_windows(mode, image_tokens, capsys):
    # --image-tokens 1 and 4 passed the option's check (at least 1), then generate ended before its warm-up
    # window's last step and the profile was a KeyError traceback
    args = ["bench", mode, "--models", "GPT-tiny", "--batch-sizes", "1", "--image-tokens", image_tokens,
            "--dtype", "float32"]
    assert main(args) == 2
    assert f"--image-tokens must be at least 5 (--profile and --speedups warm up on decode steps 1 to 4; " \
           f"9 = 3x3 is the smallest square grid they take), got {image_tokens}" in capsys.readouterr().err
    assert main(args[:-3] + ["9", "--dtype", "float32"]) == 0


@pytest.fixture(scope="module")
def tiny_pipes():
    ar, aux, cmap, vq = tiny_ctf(vocab=8, num_coarse=3, num_classes=10)
    gpt, vq = tiny_baseline(vocab=8, num_classes=10, vq=vq)
    return ARPipeline(gpt, vq), CTFPipeline(ar, aux, cmap, vq)


def test_bench_reports_median_min_max_and_llamagen_beside_the_baseline(tiny_pipes, monkeypatch, capsys):
    monkeypatch.setattr(bench, "paper_shape_pipelines", lambda *a, **k: tiny_pipes)
    results = bench.run_bench(["GPT-B"], [2], repeats=5, dtypes=("float32", "int8-fbgemm"), llamagen=True, warmup=0,
                              llamagen_steps=2)
    assert results[0]["tokens_timed"] == 3  # LlamaGen timed over its first 3 tokens of 4, scaled to the image
    methods = [(r["dtype"], r["method"]) for r in results]
    # LlamaGen has no int8: its sampler runs beside the float baseline only
    assert methods == [("float32", "llamagen"), ("float32", "baseline"), ("float32", "ctf"),
                       ("int8-fbgemm", "baseline"), ("int8-fbgemm", "ctf")]
    for r in results:
        assert r["repeats"] == len(r["runs"]) == 5
        assert r["images_per_s_min"] <= r["images_per_s"] <= r["images_per_s_max"]
        assert r["tokens_per_s"] == pytest.approx(2 * 4 / r["stage1"])
    printed = capsys.readouterr().out
    base_row = next(line for line in printed.splitlines() if "| float32 | baseline |" in line)
    assert base_row.rstrip(" |").endswith("x")  # baseline tokens/s over LlamaGen's
    only = bench.run_bench(["GPT-B"], [2], repeats=1, dtypes=("float32",), warmup=0, methods=("ctf",))
    assert [r["method"] for r in only] == ["ctf"]


def test_llamagen_is_warmed_up_and_its_setup_is_not_scaled(tiny_pipes, monkeypatch):
    # A fake clock: setting up the caches and mask takes 10 s once, each token 1 s, the first run 100 s
    # more (cold). The baseline times its own cache set-up once per image; LlamaGen's must not be
    # multiplied by image_tokens / tokens_timed.
    from ctfgen.models.llamagen import llamagen_generate

    clock, calls = [0.0], []

    def fake(gpt, labels, decode_steps=None, timings=None, **kwargs):
        tokens = llamagen_generate(gpt, labels, decode_steps=decode_steps, timings=timings, **kwargs)
        assert timings is not None and timings["setup"] >= 0
        clock[0] += 10.0
        timings["setup"] = 10.0
        clock[0] += tokens.shape[1] + (100.0 if not calls else 0.0)
        calls.append(tokens.shape[1])
        return tokens

    monkeypatch.setattr(bench, "llamagen_generate", fake)
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    gpt = tiny_pipes[0].gpt  # 4 image tokens
    t = bench.time_llamagen(gpt, 2, repeats=3, cfg_scale=2.0, device="cpu", decode_steps=1, warmup=1)
    assert calls == [2, 2, 2, 2]  # one warm-up run, three timed
    assert t["tokens_timed"] == 2 and [r["total"] for r in t["runs"]] == [10.0 + 2 * 4 / 2] * 3


def test_bench_times_auto_and_what_it_resolves_to_once(tiny_pipes, monkeypatch):
    monkeypatch.setattr(bench, "paper_shape_pipelines", lambda *a, **k: tiny_pipes)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)  # auto = float32 here
    results = bench.run_bench(["GPT-B"], [2], repeats=1, dtypes=("auto", "float32"), warmup=0, methods=("baseline",))
    assert [r["dtype"] for r in results] == ["float32"]


def test_matmul_rates_time_auto_and_what_it_resolves_to_once(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)  # auto = float32 here
    cast = []
    monkeypatch.setattr(bench, "cast_weights", lambda model, dtype: cast.append((id(model), dtype)) or model)
    rates = bench.matmul_rates(("auto", "float32"), rows=(4,), in_features=32, out_features=64, repeats=1,
                               preset="GPT-tiny")
    assert list(rates) == ["float32"] and len(cast) == len(set(cast)), cast


def test_bench_refuses_llamagen_at_a_scale_it_ignores(monkeypatch, capsys):
    # below 1 ctfgen's baseline guides (2B rows a step) and LlamaGen does not (B rows): different work
    def no_work(*a, **k):
        raise AssertionError("pipelines built before the arguments were checked")

    monkeypatch.setattr(bench, "paper_shape_pipelines", no_work)
    assert main(["bench", "--models", "GPT-B", "--llamagen", "--cfg-scale", "0.5"]) == 2
    assert "--llamagen needs --cfg-scale 1 or above, got 0.5" in capsys.readouterr().err


def test_matmul_rates_cover_every_precision(capsys):
    rates = bench.matmul_rates(("float32", "bfloat16", "int8-fbgemm"), rows=(4,), in_features=32, out_features=64,
                               repeats=2, preset="GPT-tiny")
    assert set(rates) == {"float32", "bfloat16", "int8-fbgemm"}
    assert all(v > 0 for r in rates.values() for v in r.values())
    assert "GPT-tiny block linears in turn, 16 rows" in rates["float32"]
    assert "| same, w1 and w3 fused |" in capsys.readouterr().out


def test_busy_machine_starts_and_stops_its_busy_loop(monkeypatch, capsys):
    started = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(bench.subprocess, "Popen", popen)
    results = bench.busy_machine(workloads=("GPT-tiny",), settings=(("one thread", 1, {"GOMP_SPINCOUNT": "7"}),), dtype="float32",
                                 steps=2, warmup_steps=1, timeout=120)
    assert [r["busy"] for r in results] == [False, True]
    assert all(r["seconds"] > 0 and r["threads"] == 1 for r in results), results
    assert all(r["waiting"] == "GOMP_SPINCOUNT=7" for r in results), results  # the setting reached the worker
    spinners = [p for p in started if p.args[-1] == bench._SPIN]
    assert len(spinners) == 1 and spinners[0].poll() is not None  # the busy loop was stopped
    assert "| GPT-tiny | one thread | 1 / 1 |" in capsys.readouterr().out


def test_busy_worker_applies_ctfgens_thread_choice(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # `make test` sets it, and an explicit setting wins
    before = torch.get_num_threads()
    try:
        out = bench._busy_worker(dict(workload="GPT-tiny", threads="auto", dtype="float32", steps=1,
                                      warmup_steps=0, repeats=1))
        assert out["threads"] == 1 and out["seconds"] > 0  # a small model samples on one thread
    finally:
        torch.set_num_threads(before)


def test_quality_per_precision(monkeypatch):
    pytest.importorskip("scipy")
    try:
        from ctfgen.data.fashion_mnist import find_fashion_mnist

        find_fashion_mnist()
    except Exception:
        pytest.skip("Fashion-MNIST is not installed (make data)")
    results = bench.sampling_quality(models=("fashion-mnist",), dtypes=("float32", "int8-fbgemm"), seeds=(0, 1),
                                     per_class=2, batch_size=20, test_images=20)
    assert [(r["dtype"], r["seed"]) for r in results] == [("float32", 0), ("float32", 1), ("int8-fbgemm", 0),
                                                          ("int8-fbgemm", 1)]
    assert all(r["images"] == 20 and r["fd"] > 0 and 0 <= r["class_consistency"] <= 1 for r in results)
    assert results[0]["bits_per_token"] == results[1]["bits_per_token"] != results[2]["bits_per_token"]
    assert "| fashion-mnist | int8-fbgemm |" in bench.format_quality(results)
    only_bits = bench.sampling_quality(models=("fashion-mnist",), dtypes=("float32", "int8-fbgemm"), per_class=2,
                                       seeds=(0,), sample_dtypes=("float32",), batch_size=20, test_images=20)
    assert [(r["dtype"], r["seed"]) for r in only_bits] == [("float32", 0), ("int8-fbgemm", None)]
    assert [r["bits_per_token"] for r in only_bits] == [results[0]["bits_per_token"], results[2]["bits_per_token"]]
    assert "| fashion-mnist | int8-fbgemm | – | – |" in bench.format_quality(only_bits)


# ---- thread choice ----


def test_sampling_threads_rule():
    small, large = threads.SMALL_MODEL_PARAMETERS - 1, threads.SMALL_MODEL_PARAMETERS
    assert threads.sampling_threads(small, busy=0.0, cores=8) == 1
    assert threads.sampling_threads(large, busy=0.0, cores=2) == 2
    assert threads.sampling_threads(large, busy=0.3, cores=2) == 2
    assert threads.sampling_threads(large, busy=0.7, cores=2) == 1  # a core mostly taken by another process
    assert threads.sampling_threads(large, busy=1.0, cores=2) == 1
    assert threads.sampling_threads(large, busy=5.0, cores=2) == 1  # never fewer than one
    assert threads.sampling_threads(large, busy=1.2, cores=4) == 3


def test_explicit_threads_and_short_spin(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.explicit_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    assert threads.explicit_threads() is None
    monkeypatch.setenv("OMP_NUM_THREADS", "4,2")  # per nesting level: the outer level's count wins
    assert threads.explicit_threads() == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "0,2")
    assert threads.explicit_threads() is None
    env = {}
    threads.prefer_short_spin(env)
    assert env == {"GOMP_SPINCOUNT": threads.SHORT_SPIN}
    for chosen in ({"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "0"}):
        env = dict(chosen)
        threads.prefer_short_spin(env)  # the user's choice stays, and no spin count is added to a policy
        assert env == chosen
    assert threads.busy_cores(0.01) >= 0.0


def test_busy_cores_counts_only_the_cores_this_process_may_use(monkeypatch):
    # 4 CPUs, this process pinned to 0 and 1; over the interval cpu1, cpu2 and cpu3 are fully busy,
    # cpu0 idle: one of its own cores is taken, not three (cpu2 and cpu3 are not its to use).
    import io

    def snapshot(busy, elapsed=100):  # jiffies since boot: `elapsed` per CPU, `busy[c]` of them used
        rows = [[busy[c], 0, 0, elapsed - busy[c], 0, 0, 0, 0] for c in range(4)]
        lines = [f"cpu{c} " + " ".join(map(str, row)) for c, row in enumerate(rows)]
        return "cpu " + " ".join(str(sum(col)) for col in zip(*rows)) + "\n" + "\n".join(lines) + "\nintr 0\n"

    stat = [snapshot([0, 0, 0, 0])]
    real_open = open

    def fake_open(path, *args, **kwargs):
        return io.StringIO(stat[0]) if str(path) == "/proc/stat" else real_open(path, *args, **kwargs)

    monkeypatch.setattr(threads, "open", fake_open, raising=False)
    monkeypatch.setattr(threads.time, "sleep", lambda s: stat.__setitem__(0, snapshot([0, 100, 100, 100], 200)))
    monkeypatch.setattr(threads, "_own_cpu_seconds", lambda: 0.0)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 4)
    assert threads.busy_cores() == pytest.approx(1.0)
    stat[0] = snapshot([0, 0, 0, 0])
    assert threads.sampling_threads(threads.SMALL_MODEL_PARAMETERS) == 1
    stat[0] = snapshot([0, 0, 0, 0])
    monkeypatch.setattr(threads.time, "sleep", lambda s: stat.__setitem__(0, snapshot([0, 0, 100, 100], 200)))
    assert threads.sampling_threads(threads.SMALL_MODEL_PARAMETERS) == 2  # both its cores are free


def test_use_sampling_threads_on_a_pipeline(tiny_pipes, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        assert threads.use_sampling_threads(tiny_pipes[1]) == 1 == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert threads.use_sampling_threads(tiny_pipes[1]) == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_busy_worker_samples_the_shipped_model_in_float32_as_the_docs_say(monkeypatch):
    # labelled `make demo`'s sampling, it sampled in the weights' float32 while `make demo` samples at
    # --dtype auto (bf16 on CPUs with native bf16); docs/performance.md's numbers are float32 ones
    calls = []

    class Pipe:
        def sample(self, labels, generator=None, **kwargs):
            calls.append((list(labels), kwargs))

    monkeypatch.setattr(bench, "pretrained", lambda name: Pipe())
    out = bench._busy_worker(dict(workload="fashion-mnist", threads=None, dtype="bfloat16", steps=1,
                                  warmup_steps=0, repeats=1))
    assert out["seconds"] >= 0 and calls == [([7] * 16, {"dtype": "float32"})] * 2
    assert "in float32 (`make demo` itself samples with `--dtype auto`" in \
        (Path(__file__).parents[1] / "docs" / "performance.md").read_text().replace("\n", " ")
