"""Every command meets a bad argument, a missing file and a corrupt file with one `error: ...` line
and exit status 2, never a traceback (in-process calls of cli.main, so this stays fast)."""

from __future__ import annotations

import pytest

from ctfgen.cli import COMMANDS, main


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
