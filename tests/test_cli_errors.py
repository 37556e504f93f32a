"""Every command meets a bad argument, a missing file and a corrupt file with one `error: ...` line
and exit status 2, never a traceback (in-process calls of cli.main, so this stays fast)."""

from __future__ import annotations

import pytest

from ctfgen.app.cli import COMMANDS, main


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
    """Files that exist but are not what they claim to be."""
    d = tmp_path_factory.mktemp("corrupt")
    (d / "bad.yaml").write_text("train: [unclosed\n  - : :\n")
    (d / "bad.npz").write_bytes(b"not a zip file at all")
    (d / "bad.json").write_text("{ not json")
    for name in ("pipeline", "tokenizer", "codes", "run", "fmnist"):
        (d / name).mkdir()
    (d / "pipeline" / "pipeline.json").write_text("{ not json")
    (d / "tokenizer" / "config.json").write_text("{ not json")
    (d / "tokenizer" / "model.safetensors").write_bytes(b"\x00" * 16)
    (d / "codes" / "header.json").write_text("{ not json")
    for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
              "t10k-labels-idx1-ubyte.gz"):
        (d / "fmnist" / f).write_bytes(b"garbage")
    # a run directory whose resolved config is unreadable
    (d / "run" / "config.yaml").write_text("stage1: [unclosed\n")
    for f in ("runs/tokenizer/tokenizer/config.json", "codes/train/header.json", "codes/test/header.json",
              "codes/val/header.json", "ctf/pipeline.json", "baseline/pipeline.json"):
        (d / "run" / f).parent.mkdir(parents=True, exist_ok=True)
        (d / "run" / f).write_text("{}")
    return d


MISSING = "/nonexistent/ctfgen-test"

# command -> (bad argument, missing file, corrupt file); {c} is the corrupt-files folder, {t} a scratch folder.
CASES = {
    "sample": (["--n", "many"], ["--model", MISSING], ["--model", "{c}/pipeline", "--out", "{t}/x.png"]),
    "sample-many": (["--per-class", "x"], ["--model", MISSING, "--per-class", "1", "--out", "{t}/x.npz"],
                    ["--model", "{c}/pipeline", "--per-class", "1", "--out", "{t}/x.npz"]),
    "train-tokenizer": (["{c}/bad.yaml", "--out"], [MISSING + ".yaml", "--out", "{t}/o"],
                        ["{c}/bad.yaml", "--out", "{t}/o"]),
    "extract-codes": (["--augment", "zoom"], ["--tokenizer", MISSING, "--out", "{t}/o"],
                      ["--tokenizer", "{c}/tokenizer", "--out", "{t}/o"]),
    "cluster": (["--num-coarse", "x"], ["--tokenizer", MISSING, "--out", "{t}/m.safetensors"],
                ["--tokenizer", "{c}/tokenizer", "--out", "{t}/m.safetensors"]),
    "train": (["--stage", "stage3"], ["--stage", "baseline", "--codes", MISSING, "--out", "{t}/o", "train.steps=1"],
              ["--stage", "baseline", "--codes", "{c}/codes", "--out", "{t}/o", "train.steps=1"]),
    "pipeline": (["--bogus"], [MISSING + ".yaml", "--out", "{t}/o"], ["{c}/bad.yaml", "--out", "{t}/o"]),
    "eval": (["{c}/bad.npz", "--ref", "x", "--metric-set", "fid"], [MISSING + ".npz", "--ref", "test", "--metric-set", "fmnist"],
             ["{c}/bad.npz", "--ref", "test", "--metric-set", "fmnist"]),
    "compare": (["--bogus"], [MISSING], ["{c}/bad.json"]),
    "redundancy": (["--images", "x"], ["--tokenizer", MISSING], ["--tokenizer", "{c}/tokenizer"]),
    "reproduce": (["--bogus"], ["--run", MISSING], ["--run", "{c}/run"]),
    "study": (["--records"], [MISSING, "--records", "{t}/r"], ["{c}/run", "--records", "{t}/r"]),
    "bench": (["--batch-sizes", "x"], ["--models", MISSING], None),  # bench reads no file of its own
    "demo": (["--port", "x"], ["--model", MISSING], ["--model", "{c}/pipeline"]),
    "train-classifier": (["--epochs", "x"], ["--out", "{t}/o", "--data-root", MISSING],
                         ["--out", "{t}/o", "--data-root", "{c}/fmnist"]),
}


def test_every_command_is_covered():
    assert set(CASES) == set(COMMANDS)


@pytest.mark.parametrize("kind", ["bad argument", "missing file", "corrupt file"])
@pytest.mark.parametrize("command", sorted(CASES))
def test_user_mistakes_give_one_error_line_and_status_2(command, kind, corrupt, tmp_path, capsys):
    args = CASES[command][["bad argument", "missing file", "corrupt file"].index(kind)]
    if args is None:
        pytest.skip(f"{command} reads no file of its own")
    argv = [command] + [a.format(c=corrupt, t=tmp_path) for a in args]
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    assert "Traceback" not in err


# --- the bad values users met (issue table rows), each one `error:` line and exit 2 before any work ---------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A run's root as `ctfgen pipeline` leaves it: RUN/ctf, RUN/baseline, RUN itself loadable."""
    from _tiny_ctf import tiny_baseline, tiny_ctf
    from ctfgen.experiments.run import _link_top_level
    from ctfgen.pipeline import ARPipeline, CTFPipeline

    run = tmp_path_factory.mktemp("run")
    ar, aux, cmap, vq = tiny_ctf(vocab=8, num_coarse=3, num_classes=10)
    CTFPipeline(ar, aux, cmap, vq).save_pretrained(run / "ctf")
    gpt, _ = tiny_baseline(vocab=8, num_classes=10, vq=vq)
    ARPipeline(gpt, vq).save_pretrained(run / "baseline")
    _link_top_level(run, "ctf")
    (run / "pictures.png").mkdir()  # a directory where a picture is asked for
    return run


CUDA_BUILD = __import__("torch").cuda.is_available()

# (argv after the command, what the one line must say); {m} is the tiny run, {t} a scratch folder
BAD_VALUES = {
    "sample": [
        (["--n", "0"], "--n must be between 1 and 1024"),
        (["--n", "100000"], "--n must be between 1 and 1024 (larger sets: `ctfgen sample-many`"),
        (["--n", "1024", "--scale", "64"], "megapixels"),
        (["--out", "{t}/noext"], "--out '{t}/noext' needs an image extension"),
        (["--out", "{m}/pictures.png"], "is a directory"),
        (["--temperature", "-1"], "--temperature must be between 0 and 10"),
        (["--temperature-fine", "11"], "--temperature-fine must be between 0 and 10"),
        (["--cfg-scale", "-1"], "--cfg-scale must be between 0 and 20"),
        (["--cfg-scale-fine", "50"], "--cfg-scale-fine must be between 0 and 20"),
        (["--top-k-fine", "999"], "--top-k-fine must be between 0 and 3"),
        (["--top-k", "999"], "--top-k must be between 0 and 3"),
        (["--top-k", "-1"], "--top-k must be at least 0"),
        (["--top-p", "0"], "--top-p must be greater than 0 and at most 1"),
        (["--cfg-steps", "99"], "--cfg-steps must be between 0 and 4"),
        (["--seed", "-1"], "--seed must be between 0 and 4,294,967,295"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--nrow", "0"], "--nrow must be at least 1"),
        (["--device", "cuda:7" if CUDA_BUILD else "cuda"], "available here: cpu"),
        (["--device", "tpu"], "is not a device name; available here: cpu"),
        (["--model", "{m}/baseline", "--top-k-fine", "1"], "only apply to a CTF pipeline"),
    ],
    "sample-many": [
        (["--per-class", "0", "--out", "{t}/x.npz"], "--per-class must be at least 1"),
        (["--per-class", "-2", "--out", "{t}/x.npz"], "--per-class must be at least 1"),
        (["--per-class", "1", "--out", "{t}/x.png"], "--out '{t}/x.png' must end in .npz"),
        (["--per-class", "1", "--batch-size", "0", "--out", "{t}/x.npz"], "--batch-size must be at least 1"),
        (["--per-class", "1", "--out", "{t}/x.npz", "--temperature", "-1"], "--temperature must be between 0 and 10"),
        (["--per-class", "1", "--out", "{t}/x.npz", "--top-k-fine", "999"], "--top-k-fine must be between 0 and 3"),
        (["--per-class", "1", "--out", "{t}/x.npz", "--device", "cuda:7" if CUDA_BUILD else "cuda"], "available here"),
        (["--per-class", "1", "--out", "{t}/x.npz", "--classes", "12"], "out of range"),
        (["--per-class", "1", "--out", "{t}/x.npz", "--classes", "3", "1", "3"], "[3] are given more than once"),
    ],
    "demo": [
        (["--device", "cuda:7" if CUDA_BUILD else "cuda"], "available here"),
        (["--max-images", "0"], "--max-images must be at least 1"),
        (["--port", "70000"], "--port must be between 1 and 65535"),
    ],
    "bench": [
        (["--device", "cuda:7" if CUDA_BUILD else "cuda"], "available here"),
        (["--cfg-scale", "-1"], "--cfg-scale must be between 0 and 20"),
        (["--batch-sizes", "0"], "--batch-sizes must be at least 1"),
        (["--llamagen", "--llamagen-steps", "0"], "--llamagen-steps must be at least 1"),
    ],
    "eval": [(["x.npz", "--ref", "test", "--device", "cuda:7" if CUDA_BUILD else "cuda"], "available here")],
    "extract-codes": [(["--tokenizer", "x", "--out", "{t}/o", "--device", "nope"], "not a device name")],
    "train-tokenizer": [(["x.yaml", "--out", "{t}/o", "--device", "nope"], "not a device name")],
    "redundancy": [(["--tokenizer", "x", "--device", "nope"], "not a device name"),
                   (["--tokenizer", "x", "--out", "{t}/grid"], "needs an image extension")],
    "cluster": [(["--tokenizer", "x", "--out", "{t}/m.pt"], "must end in .safetensors")],
    "study": [(["--records", "{t}/r", "--guidance", "-1"], "--guidance must be between 0 and 20"),
              (["--records", "{t}/r", "--seeds", "-3"], "--seeds must be between 0 and 4,294,967,295"),
              (["--records", "{t}/r", "--test-per-class", "0"], "--test-per-class must be at least 1")],
}


@pytest.mark.parametrize("command,args,message", [(c, a, m) for c, rows in BAD_VALUES.items() for a, m in rows])
def test_bad_values_give_one_error_line_before_any_work(command, args, message, tiny, tmp_path, capsys, monkeypatch):
    from ctfgen.pipeline import ARPipeline, CTFPipeline

    def no_work(*a, **k):
        raise AssertionError("sampling started before the arguments were checked")

    monkeypatch.setattr(CTFPipeline, "sample_tokens", no_work)
    monkeypatch.setattr(ARPipeline, "sample_tokens", no_work)
    fill = lambda a: a.format(m=tiny, t=tmp_path)  # noqa: E731
    argv = [command] + ([] if "--model" in args or command not in ("sample", "sample-many") else ["--model", str(tiny)])
    argv += [fill(a) for a in args]
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert fill(message) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "something was written"


# The commands that write into a directory, with {o} for it.
OUTPUT_DIRECTORIES = {
    "train-tokenizer": ["x.yaml", "--out", "{o}"],
    "extract-codes": ["--tokenizer", "x", "--out", "{o}"],
    "train": ["--stage", "ar", "--codes", "x", "--out", "{o}"],
    "pipeline": ["x.yaml", "--out", "{o}"],
    "train-classifier": ["--out", "{o}"],
    "compare": ["x.json", "--out", "{o}"],
    "study": ["x", "--records", "{o}"],
}


@pytest.mark.parametrize("inside", [False, True])
@pytest.mark.parametrize("command", sorted(OUTPUT_DIRECTORIES))
def test_an_output_directory_where_a_file_is_is_refused(command, inside, tmp_path, capsys):
    """A file where the output directory (or one of its parents) would be ended in a FileExistsError
    traceback from deep inside the work."""
    taken = tmp_path / "taken"
    taken.write_text("kept")
    out = taken / "sub" if inside else taken
    assert main([command] + [a.format(o=out) for a in OUTPUT_DIRECTORIES[command]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert (f"{taken} is a file, so no directory can be made there" if inside else f"{taken} is a file, not a "
            "directory") in err, err
    assert taken.read_text() == "kept"


def test_temperature_zero_is_greedy_as_documented(tiny, tmp_path):
    """Temperature 0 is accepted and means argmax: two seeds give the same images."""
    from PIL import Image

    for seed in (0, 1):
        assert main(["sample", "--model", str(tiny), "--n", "3", "--temperature", "0", "--temperature-fine", "0",
                     "--seed", str(seed), "--no-singles", "--no-progress", "--out", str(tmp_path / f"{seed}.png")]) == 0
    assert Image.open(tmp_path / "0.png").tobytes() == Image.open(tmp_path / "1.png").tobytes()


def test_the_library_checks_with_the_same_rules(tiny):
    import ctfgen
    from ctfgen.utils.errors import ConfigError

    pipe = ctfgen.load_pipeline(tiny)
    for kwargs, message in ((dict(temperature=-1), "temperature must be between 0 and 10"),
                            (dict(cfg_scale=-1), "cfg_scale must be between 0 and 20"),
                            (dict(top_k_fine=999), "top_k_fine must be between 0 and 3"),
                            (dict(generator=-5), "seed must be between 0 and 4,294,967,295")):
        with pytest.raises(ConfigError, match=message):
            pipe.sample([1], **kwargs)
    with pytest.raises(ConfigError, match="top_k must be between 0 and 3"):
        ctfgen.generate(pipe.ar, [1], top_k=999)
    with pytest.raises(ConfigError, match="device 'cuda:7'|device 'cuda'"):
        ctfgen.pretrained("fashion-mnist", device="cuda:7" if CUDA_BUILD else "cuda")


def test_a_run_root_works_wherever_a_model_is_taken(tiny, tmp_path, capsys):
    """--model RUN finds RUN/baseline for --compare-baseline; so does --model RUN/ctf, beside it."""
    for model in (tiny, tiny / "ctf"):
        out = tmp_path / f"{model.name}.png"
        assert main(["sample", "--model", str(model), "--compare-baseline", "--n", "2", "--no-singles", "--no-progress",
                     "--out", str(out)]) == 0, capsys.readouterr().err
        assert out.is_file()
    assert main(["sample-many", "--model", str(tiny), "--per-class", "1", "--classes", "3", "--no-progress",
                 "--out", str(tmp_path / "set.npz")]) == 0
    assert main(["redundancy", "--model", str(tiny), "--images", "2", "--data", "nowhere"]) == 2  # the model loads; data does not
    assert "nowhere" in capsys.readouterr().err


def test_every_option_has_help_and_no_issue_numbers():
    import argparse
    import re

    from ctfgen.app.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in sub.choices.items() for a in p._actions
               if not a.help and not isinstance(a, argparse._HelpAction)]
    assert missing == []
    texts = [parser.format_help()] + [p.format_help() for p in sub.choices.values()]
    assert not [t for t in texts if re.search(r"\bissue\s*\d+", t, re.I)]


def test_version(capsys):
    import ctfgen

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"ctfgen {ctfgen.__version__}"


# --- every numeric option of every command, at 0 and below -----------------------------------------

# Arguments that get each command past argparse and then fail cleanly on a missing file, so a number
# that passes its checks ends in that error, and one that does not ends in its own (never in work).
PAST_ARGPARSE = {
    "sample": ["--model", MISSING, "--out", "{t}/x.png"],
    "sample-many": ["--model", MISSING, "--per-class", "1", "--out", "{t}/x.npz"],
    "train-tokenizer": [MISSING + ".yaml", "--out", "{t}/o"],
    "extract-codes": ["--tokenizer", MISSING, "--out", "{t}/o"],
    "cluster": ["--tokenizer", MISSING, "--out", "{t}/m.safetensors"],
    "train": ["--stage", "baseline", "--codes", MISSING, "--out", "{t}/o", "train.steps=1"],
    "pipeline": [MISSING + ".yaml", "--out", "{t}/o"],
    "eval": [MISSING + ".npz", "--ref", "test", "--metric-set", "fmnist"],
    "compare": [MISSING],
    "redundancy": ["--tokenizer", MISSING],
    "reproduce": ["--run", MISSING],
    "study": [MISSING, "--records", "{t}/r"],
    "bench": ["--models", MISSING],
    "demo": ["--model", MISSING],
    "train-classifier": ["--out", "{t}/o", "--data-root", MISSING],
}
# Options whose range starts at 0 (0 is a value with a meaning; below 0 is refused).
ZERO_ALLOWED = {"--seed", "--select-seed", "--diagnosis-seed", "--epoch-seed", "--temperature", "--temperature-fine",
                "--cfg-scale", "--cfg-scale-fine", "--top-k", "--top-k-fine", "--cfg-steps", "--guidance", "--temperatures", "--seeds",
                "--num-workers", "--epoch", "--classes", "--validation-images", "--warmup",
                "bench --per-class"}


def numeric_options():
    from ctfgen.app.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for command, parser in sorted(sub.choices.items()):
        for action in parser._actions:
            if action.type in (int, float) and action.option_strings:
                yield command, action.option_strings[-1]


def test_every_numeric_option_is_covered():
    assert {c for c, _ in numeric_options()} <= set(PAST_ARGPARSE)
    assert set(PAST_ARGPARSE) == set(COMMANDS)


@pytest.mark.parametrize("value", ["0", "-1"])
@pytest.mark.parametrize("command,flag", sorted(numeric_options()))
def test_every_numeric_option_at_zero_and_below(command, flag, value, tmp_path, capsys):
    argv = [command] + [a.format(t=tmp_path) for a in PAST_ARGPARSE[command]] + [flag, value]
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    if value == "-1" or not {flag, f"{command} {flag}"} & ZERO_ALLOWED:
        assert flag in err, f"{argv}: the bad value was not named, it met: {err}"
    assert list(tmp_path.iterdir()) == [], "something was written"
