"""The models that ship with the package load, agree with each other, and sample."""

import pytest
import torch

import ctfgen
from ctfgen.pipeline import ARPipeline, CTFPipeline
from ctfgen.shipped import ASSETS, SHIPPED_CTF


def test_unknown_name_lists_the_shipped_models():
    with pytest.raises(ValueError, match="fashion-mnist-baseline"):
        ctfgen.pretrained("imagenet")


def test_a_revision_is_refused_where_it_would_be_ignored(tmp_path):
    """revision picks a version of a Hub repo; for a shipped name or a local directory it was dropped without a
    word, so the caller got a model other than the version asked for."""
    with pytest.raises(ValueError, match="'fashion-mnist' is a shipped model"):
        ctfgen.pretrained("fashion-mnist", revision="v2")
    with pytest.raises(ValueError, match="is a local path"):
        ctfgen.pretrained(str(ASSETS / SHIPPED_CTF), revision="v2")


def test_shipped_models_sample_and_share_one_tokenizer():
    ctf = ctfgen.pretrained("fashion-mnist")
    base = ctfgen.pretrained("fashion-mnist-baseline")
    assert isinstance(ctf, CTFPipeline) and isinstance(base, ARPipeline)
    assert ctf.tokenizer.fingerprint == base.tokenizer.fingerprint == ctf.coarse_map.codebook_fingerprint
    # Stage 1 and the baseline have the same size: only the vocabulary differs.
    a, b = ctf.ar.config, base.gpt.config
    assert (a.dim, a.n_layer, a.n_head) == (b.dim, b.n_layer, b.n_head) and a.vocab_size < b.vocab_size
    labels = torch.tensor([7, 7, 1])
    for pipe in (ctf, base):
        images = pipe.sample(labels, generator=0)
        assert images.shape == (3, 1, 28, 28) and images.min() >= -1 and images.max() <= 1
    tokens = ctf.sample_tokens(labels, generator=1)
    assert torch.equal(tokens, ctf.sample_tokens(labels, generator=1))
    assert ctf.log_prob_is_exact and torch.isfinite(ctf.log_prob(tokens, labels)).all()


def test_shipped_weights_are_small():
    total = sum(p.stat().st_size for p in (ASSETS / "fashion_mnist").rglob("*") if p.is_file())
    assert total < 40e6, f"shipped models take {total / 1e6:.1f} MB, over the package's 40 MB budget"
    assert not (ASSETS / "fashion_mnist" / "baseline" / "tokenizer").exists()
    assert (ASSETS / SHIPPED_CTF / "tokenizer" / "model.safetensors").is_file()


def test_ship_replaces_the_assets_with_a_runs_models(tmp_path):
    """`make ship`: a finished run's ctf/ and baseline/ become the assets, the baseline without its tokenizer."""
    import json
    import shutil

    from ctfgen.pipeline import load_pipeline
    from ctfgen.shipped import SHIPPED_BASELINE, ship

    run = tmp_path / "run"
    shutil.copytree(ASSETS / SHIPPED_CTF, run / "ctf")
    ctf = load_pipeline(run / "ctf")
    ARPipeline(ctfgen.pretrained("fashion-mnist-baseline").gpt, ctf.tokenizer).save_pretrained(run / "baseline")
    (tmp_path / "assets" / SHIPPED_BASELINE).mkdir(parents=True)
    (tmp_path / "assets" / SHIPPED_BASELINE / "stale.txt").write_text("from an earlier ship")
    sizes = ship(run, assets=tmp_path / "assets")
    assert set(sizes) == {"ctf", "baseline"} and all(v > 0 for v in sizes.values())
    shipped = tmp_path / "assets" / SHIPPED_BASELINE
    assert not (shipped / "tokenizer").exists() and not (shipped / "stale.txt").exists()
    assert json.loads((shipped / "pipeline.json").read_text())["has_tokenizer"] is False
    assert isinstance(load_pipeline(tmp_path / "assets" / SHIPPED_CTF), CTFPipeline)
    before = sorted((p.relative_to(tmp_path), p.read_bytes()) for p in (tmp_path / "assets").rglob("*") if p.is_file())
    (run / "baseline" / "pipeline.json").write_text('{"type": "baseline"')  # cut short
    from ctfgen.utils.errors import CorruptFileError

    with pytest.raises(CorruptFileError, match=r"baseline/pipeline\.json is not valid JSON"):
        ship(run, assets=tmp_path / "assets")
    after = sorted((p.relative_to(tmp_path), p.read_bytes()) for p in (tmp_path / "assets").rglob("*") if p.is_file())
    assert after == before  # neither model of the shipped pair was replaced


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished run's two pipelines, tiny and random (ctf/ and baseline/, one tokenizer)."""
    from _tiny_ctf import tiny_baseline, tiny_ctf

    run = tmp_path_factory.mktemp("run")
    ar, aux, cmap, vq = tiny_ctf(vocab=8, num_coarse=4)
    gpt, _ = tiny_baseline(vocab=8, vq=vq)
    CTFPipeline(ar, aux, cmap, vq).save_pretrained(run / "ctf")
    ARPipeline(gpt, vq).save_pretrained(run / "baseline")
    return run


def _tensor_bytes(path) -> int:
    """The bytes of a safetensors file's tensor data (after its 8-byte length and JSON header)."""
    header = int.from_bytes(path.read_bytes()[:8], "little")
    return path.stat().st_size - 8 - header


@pytest.mark.parametrize("weights_dtype", ["float16", "bfloat16"])
def test_ship_stores_parameters_in_16_bits(tiny_run, tmp_path, weights_dtype):
    """16-bit parameters take half the bytes, load back as float32 equal to the originals rounded to
    that dtype, sample, and pipeline.json and the model card say how they are stored."""
    import filecmp
    import json

    from ctfgen.pipeline import load_pipeline
    from ctfgen.shipped import SHIPPED_BASELINE, ship

    dtype = getattr(torch, weights_dtype)
    ship(tiny_run, assets=tmp_path / "f32")
    ship(tiny_run, assets=tmp_path / "half", weights_dtype=weights_dtype)
    ctf = load_pipeline(tmp_path / "half" / SHIPPED_CTF)
    base = load_pipeline(tmp_path / "half" / SHIPPED_BASELINE)
    base = ARPipeline(base.gpt, ctf.tokenizer)  # borrows the float32 tokenizer: its fingerprint still matches
    for sub, pipe, names in ((SHIPPED_CTF, ctf, ("ar", "aux")), (SHIPPED_BASELINE, base, ("gpt",))):
        assert json.loads((tmp_path / "f32" / sub / "pipeline.json").read_text())["weights_dtype"] == "float32"
        assert json.loads((tmp_path / "half" / sub / "pipeline.json").read_text())["weights_dtype"] == weights_dtype
        assert f"| parameters stored as | {weights_dtype} |" in (tmp_path / "half" / sub / "README.md").read_text()
        original = load_pipeline(tiny_run / sub.split("/")[-1])
        for name in names:
            model, before = getattr(pipe, name), getattr(original, name)
            params = dict(before.named_parameters())
            n_params = sum(p.numel() for p in params.values())
            full = _tensor_bytes(tmp_path / "f32" / sub / name / "model.safetensors")
            assert _tensor_bytes(tmp_path / "half" / sub / name / "model.safetensors") == full - 2 * n_params
            for key, value in model.state_dict().items():
                expected = before.state_dict()[key]
                if key in params:
                    assert value.dtype == torch.float32 and torch.equal(value, expected.to(dtype).float()), key
                    assert not torch.equal(value, expected), f"{key} was not rounded"
                else:  # buffers (the aux model's int64 cluster table) as they were
                    assert value.dtype == expected.dtype and torch.equal(value, expected), key
        images = pipe.sample([0, 2], generator=0)
        assert images.shape == (2, 1, 4, 4) and torch.isfinite(images).all()
    tokenizer = SHIPPED_CTF + "/tokenizer/model.safetensors"
    assert filecmp.cmp(tmp_path / "half" / tokenizer, tiny_run / "ctf" / "tokenizer" / "model.safetensors", shallow=False)


def test_ship_command_takes_a_weights_dtype_and_refuses_others(tiny_run, tmp_path, capsys, monkeypatch):
    """`python -m ctfgen.shipped RUN --weights-dtype D` (`make ship WEIGHTS_DTYPE=D`)."""
    import json

    from ctfgen.shipped import main, ship
    from ctfgen.utils.errors import ConfigError

    monkeypatch.setattr("ctfgen.shipped.ASSETS", tmp_path / "assets")  # `python -m ctfgen.shipped` never touches the real ones

    with pytest.raises(ConfigError, match="weights_dtype must be one of float32, float16, bfloat16, got 'int8'"):
        ship(tiny_run, assets=tmp_path / "assets", weights_dtype="int8")
    assert main([str(tiny_run), "--weights-dtype", "float64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: weights_dtype must be one of") and "Traceback" not in err
    assert not (tmp_path / "assets").exists()
    assert main([str(tiny_run), "--weights-dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "assets" / SHIPPED_CTF / "pipeline.json").read_text())["weights_dtype"] == "bfloat16"


def test_ship_takes_the_sampling_setting_the_study_chose_for_that_very_run(tiny_run, tmp_path):
    """`--sampling-from RECORDS`: each shipped pipeline samples by default at the setting
    select-<method>.json chose, and records of another run's models are refused, nothing shipped."""
    import json

    from ctfgen.pipeline import load_pipeline
    from ctfgen.shipped import SHIPPED_BASELINE, ship
    from ctfgen.utils.errors import CorruptFileError, MismatchError, MissingFileError
    from ctfgen.utils.fingerprint import directory_fingerprint

    records = tmp_path / "records"
    records.mkdir()
    chosen = {"ctf": {"cfg_scale": 1.5, "temperature": 0.9}, "baseline": {"cfg_scale": 3.0, "temperature": 1.0}}

    def write(method, fingerprint):
        (records / f"select-{method}.json").write_text(json.dumps(
            {"name": f"select-{method}", "inputs": {"models": {method: fingerprint}}, "chosen": chosen[method]}))

    write("ctf", directory_fingerprint(tiny_run / "ctf"))
    with pytest.raises(MissingFileError, match="select-baseline.json is missing"):
        ship(tiny_run, assets=tmp_path / "assets", sampling_from=records)
    (records / "select-baseline.json").write_text('{"name": "select-baseline", "inp')
    with pytest.raises(CorruptFileError, match="select-baseline.json is not valid JSON"):
        ship(tiny_run, assets=tmp_path / "assets", sampling_from=records)
    (records / "select-baseline.json").write_text('{"name": "select-baseline"}')
    with pytest.raises(CorruptFileError, match="select-baseline.json is not a selection record"):
        ship(tiny_run, assets=tmp_path / "assets", sampling_from=records)
    write("baseline", "0123456789abcdef")
    with pytest.raises(MismatchError, match="fingerprint 0123456789abcdef"):
        ship(tiny_run, assets=tmp_path / "assets", sampling_from=records)
    assert not (tmp_path / "assets").exists()

    write("baseline", directory_fingerprint(tiny_run / "baseline"))
    ship(tiny_run, assets=tmp_path / "assets", sampling_from=records)
    for method, sub in (("ctf", SHIPPED_CTF), ("baseline", SHIPPED_BASELINE)):
        before = load_pipeline(tiny_run / method).sampling_defaults
        after = load_pipeline(tmp_path / "assets" / sub).sampling_defaults
        assert after == {**before, **chosen[method]} and after != before
        # the model card says what pipeline.json says: the chosen defaults, and no tokenizer in the baseline
        card = (tmp_path / "assets" / sub / "README.md").read_text()
        assert "Sampling defaults: " + ", ".join(f"`{k}={v}`" for k, v in after.items()) in card
        assert f"| tokenizer included | {method == 'ctf'} |" in card


def test_ship_refuses_a_chosen_sampling_setting_the_pipeline_would_refuse(tiny_run, tmp_path):
    """select-<method>.json's `chosen` was merged into the shipped defaults unchecked: a list was a TypeError,
    a bad value shipped a pair that failed only when loaded."""
    import json

    from ctfgen.shipped import ship
    from ctfgen.utils.errors import CorruptFileError
    from ctfgen.utils.fingerprint import directory_fingerprint

    records = tmp_path / "records"
    records.mkdir()

    def write(method, chosen):
        (records / f"select-{method}.json").write_text(json.dumps(
            {"name": f"select-{method}", "inputs": {"models": {method: directory_fingerprint(tiny_run / method)}},
             "chosen": chosen}))

    write("ctf", {"cfg_scale": 1.5, "temperature": 0.9})
    for chosen, message in (([1.5, 0.9], r"has chosen \[1\.5, 0\.9\], not an object of sampling options"),
                            ({"cfg_scale": 3.0, "temperature": -1}, r"temperature must be"),
                            ({"cfg_scale": "x"}, r"cfg_scale must be a number"),
                            ({"cfg_scale": 3.0, "tempreature": 1.0}, r"unknown options \['tempreature'\]")):
        write("baseline", chosen)
        with pytest.raises(CorruptFileError, match=r"select-baseline\.json .*" + message):
            ship(tiny_run, assets=tmp_path / "assets", sampling_from=records)
    assert not (tmp_path / "assets").exists()
