"""Strict, safetensors-only save/load shared by every ctfgen model."""

import pytest
import torch

from ctfgen.utils.hub import StateDictMismatch, load_state_dict_strict
from ctfgen.models.transformer import GPT, GPTConfig


def test_missing_local_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        GPT.from_pretrained(str(tmp_path / "nope" / "model"))


def test_directory_without_weights_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        GPT.from_pretrained(str(tmp_path))


def test_a_config_that_is_not_a_json_object_is_a_clear_error(tmp_path):
    """config.json holding a list, a string or null: CorruptFileError naming it, not an AttributeError."""
    from ctfgen.utils.errors import CorruptFileError

    GPT(GPTConfig(vocab_size=8, image_tokens=4, num_classes=2, dim=16, n_layer=1, n_head=2, multiple_of=16)
        ).save_pretrained(tmp_path)
    for text in ("[]", '"gpt"', "null"):
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(CorruptFileError, match=r"config\.json holds .* JSON, not an object; save the GPT again"):
            GPT.from_pretrained(str(tmp_path))


def test_strict_load_names_every_problem():
    model = GPT(GPTConfig(vocab_size=8, image_tokens=4, num_classes=2, dim=16, n_layer=1, n_head=2, multiple_of=16))
    sd = dict(model.state_dict())
    sd["output.weight"] = torch.zeros(9, 16)
    sd["extra.weight"] = torch.zeros(1)
    del sd["norm.weight"]
    with pytest.raises(StateDictMismatch) as err:
        load_state_dict_strict(model, sd)
    msg = str(err.value)
    assert "norm.weight" in msg and "extra.weight" in msg and "(9, 16)" in msg and "(8, 16)" in msg


def test_ignored_names_are_not_checked_for_shape_either():
    """`ignore` skips a name in every check: LlamaGen's 65536-slot usage window loads into a VQ whose
    own window is another size (load_llamagen_vq replaces it), as the loader's docstring promises."""
    from _tiny_ctf import tiny_vq

    from ctfgen.tokenizer.llamagen import load_llamagen_vq

    model = GPT(GPTConfig(vocab_size=8, image_tokens=4, num_classes=2, dim=16, n_layer=1, n_head=2, multiple_of=16))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["norm.weight"] = torch.zeros(3)
    before = model.norm.weight.detach().clone()
    load_state_dict_strict(model, sd, ignore=("norm.weight",))
    assert torch.equal(model.norm.weight, before)
    checkpoint = tiny_vq().llamagen_state_dict()  # its usage window: LlamaGen's 65536 floats
    vq = load_llamagen_vq({"model": checkpoint}, norm_groups=4, usage_window=1024)
    assert vq.quantize.codebook_used.shape == (1024,)


def test_saved_weights_that_do_not_fit_are_refused(tmp_path):
    small = GPT(GPTConfig(vocab_size=8, image_tokens=4, num_classes=2, dim=16, n_layer=1, n_head=2, multiple_of=16))
    small.save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text().replace('"vocab_size": 8', '"vocab_size": 9')
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(StateDictMismatch, match="tok_embeddings.weight"):
        GPT.from_pretrained(str(tmp_path))


def test_saved_weights_of_an_unsupported_dtype_are_refused(tmp_path):
    """16-bit floats load into float32 parameters; an int8 weight or a float index buffer is refused, by name."""
    from safetensors.torch import load_file, save_file

    from ctfgen.models.transformer import AuxConfig, AuxModel

    aux = AuxModel(AuxConfig(vocab_size=4, num_coarse=2, image_tokens=4, num_classes=2, dim=16, n_layer=1, n_head=2,
                             multiple_of=16))
    aux.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["norm.weight"] = sd["norm.weight"].to(torch.int8)
    sd["fine_to_coarse"] = sd["fine_to_coarse"].double()
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(StateDictMismatch) as err:
        AuxModel.from_pretrained(str(tmp_path))
    msg = str(err.value)
    assert "unsupported dtype" in msg and "norm.weight: " in msg and "stores int8, model expects float32" in msg
    assert "fine_to_coarse: " in msg and "stores float64, model expects int64" in msg and "Traceback" not in msg


# --- pipelines by Hub repo id, from a local Hub cache (no network) ----------------------------------

REPO = "ctfgen-test/tiny-ctf"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face Hub cache holding REPO, laid out as huggingface_hub lays it out, in offline mode."""
    from huggingface_hub import constants

    from _tiny_ctf import tiny_ctf
    from ctfgen.pipeline import CTFPipeline

    cache = tmp_path / "hub"
    repo = cache / f"models--{REPO.replace('/', '--')}"
    pipe = CTFPipeline(*tiny_ctf(vocab=8, num_coarse=3, num_classes=10))
    pipe.save_pretrained(repo / "snapshots" / COMMIT, training_config={"train": {"steps": 3}}, metrics={"ar": {"steps": 3}})
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache, pipe


def test_pipelines_load_by_hub_id_through_the_cache(hub_cache):
    import ctfgen
    from ctfgen.utils.errors import ConfigError
    from ctfgen.pipeline import CTFPipeline, load_pipeline

    cache, pipe = hub_cache
    expected = pipe.sample_tokens([1, 2], generator=5)
    for loaded in (load_pipeline(REPO), CTFPipeline.from_pretrained(REPO), ctfgen.pretrained(REPO)):
        assert isinstance(loaded, CTFPipeline)
        assert torch.equal(loaded.sample_tokens([1, 2], generator=5), expected)
    with pytest.raises(ConfigError, match=r"not in the cache .* HF_HUB_OFFLINE is set"):
        load_pipeline("ctfgen-test/absent")
    with pytest.raises(ConfigError, match="neither a shipped model"):
        ctfgen.pretrained("no-such-model")


def test_cli_takes_a_hub_id_and_honours_the_environment(hub_cache, tmp_path):
    """A separate process, so huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE as a user's shell sets them."""
    import os
    import subprocess
    import sys

    cache, _ = hub_cache
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    run = lambda *args: subprocess.run([sys.executable, "-m", "ctfgen.app.cli", *args], env=env, capture_output=True,  # noqa: E731
                                       text=True, timeout=120)
    ok = run("sample", "--model", REPO, "--n", "2", "--no-singles", "--no-progress", "--out", str(tmp_path / "x.png"))
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "x.png").is_file()
    missing = run("sample", "--model", "ctfgen-test/absent", "--out", str(tmp_path / "y.png"))
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and missing.stderr.count("\n") == 1
    assert "HF_HUB_OFFLINE" in missing.stderr and not (tmp_path / "y.png").exists()


def test_save_pretrained_writes_a_model_card(hub_cache):
    from huggingface_hub import ModelCard

    cache, _ = hub_cache
    card = ModelCard.load(cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT / "README.md")
    assert card.data.library_name == "ctfgen"
    assert {"ctfgen", "coarse-to-fine", "arxiv:2503.16194"} <= set(card.data.tags)
    recorded = card.data.to_dict()["ctfgen"]
    assert recorded["pipeline"] == "ctf" and recorded["paper"] == "https://arxiv.org/abs/2503.16194"
    assert recorded["training_config"] == {"train": {"steps": 3}} and recorded["metrics"] == {"ar": {"steps": 3}}
    assert "coarse-to-fine token prediction" in card.text and "| ar.steps | 3 |" in card.text
    assert "steps: 3" in card.text  # the training config, in the card's body too
    # a loaded pipeline saved again keeps what its card recorded
    from ctfgen.pipeline import load_pipeline

    again = load_pipeline(REPO).save_pretrained(cache.parent / "again")
    assert ModelCard.load(again / "README.md").data.to_dict()["ctfgen"]["metrics"] == {"ar": {"steps": 3}}


# --- LlamaGen's checkpoints: both loaders, one message -----------------------------------------------

def test_llamagen_loaders_give_one_message_for_a_missing_or_wrong_file(tmp_path):
    import re

    from ctfgen.utils.errors import ConfigError
    from ctfgen.models.llamagen import load_llamagen_gpt
    from ctfgen.tokenizer.llamagen import load_llamagen_vq

    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    gpt_file = tmp_path / "gpt.pt"
    torch.save({"model": GPT(GPTConfig(vocab_size=8, image_tokens=4, num_classes=2, dim=16, n_layer=1, n_head=2,
                                       multiple_of=16)).state_dict()}, gpt_file)
    loaders = {"GPT": lambda p: load_llamagen_gpt(p, "GPT-tiny", image_tokens=4, num_classes=2),
               "VQ": lambda p: load_llamagen_vq(p)}
    messages = {}
    for kind, load in loaders.items():
        for case, path in (("missing", tmp_path / "absent.pt"), ("wrong", text)):
            with pytest.raises(ConfigError) as err:
                load(path)
            messages[kind, case] = str(err.value)
    for case in ("missing", "wrong"):
        gpt, vq = messages["GPT", case], messages["VQ", case]
        assert "FoundationVision/LlamaGen" in gpt and "c2i_B_256.pt" in gpt and "vq_ds16_c2i.pt" in vq
        # the same sentence, only the kind and the example file differ
        assert re.sub(r"GPT|c2i_B_256\.pt", "X", gpt) == re.sub(r"VQ|vq_ds16_c2i\.pt", "X", vq)
    assert "absent.pt does not exist" in messages["GPT", "missing"]
    assert "notes.pt is not a LlamaGen VQ checkpoint (torch.load failed" in messages["VQ", "wrong"]
    with pytest.raises(ConfigError, match="is not a LlamaGen VQ checkpoint .*looks like a GPT"):
        load_llamagen_vq(gpt_file)


def test_model_card_names_a_corrupt_pipeline_file(tmp_path):
    from ctfgen.utils.errors import CorruptFileError
    from ctfgen.utils.hub import write_model_card

    (tmp_path / "pipeline.json").write_text('{"type": "ctf"')  # cut short
    with pytest.raises(CorruptFileError, match=r"pipeline\.json is not valid JSON.*save the pipeline again"):
        write_model_card(tmp_path)
    assert not (tmp_path / "README.md").exists()


def test_model_card_with_dashes_in_a_value_reads_back(tmp_path):
    """The front matter was split at the first `---` anywhere: a config value holding one made the card read as
    empty, so a pipeline saved again silently dropped its recorded config and metrics."""
    from ctfgen.utils.hub import read_model_card, write_model_card

    (tmp_path / "pipeline.json").write_text('{"type": "ctf"}')
    recorded = {"training_config": {"name": "fmnist---long", "data": {"root": "/data/a---b\n---\nc"}},
                "metrics": {"ar": {"steps": 3}}}
    write_model_card(tmp_path, **recorded)
    assert read_model_card(tmp_path) == recorded


def test_models_load_by_hub_id(tmp_path, monkeypatch):
    """`os.sep in path` took every `org/name` for a missing local path: GPT.from_pretrained("org/name") never
    reached the Hub. A path that is no repo id is still a MissingFileError."""
    from ctfgen.utils import hub
    from ctfgen.utils.errors import MissingFileError

    model = GPT(GPTConfig(vocab_size=8, image_tokens=4, num_classes=2, dim=16, n_layer=1, n_head=2, multiple_of=16))
    model.save_pretrained(tmp_path / "snapshot")
    asked = []
    monkeypatch.setattr(hub, "download_snapshot",
                        lambda repo_id, revision=None: asked.append(repo_id) or tmp_path / "snapshot")
    loaded = GPT.from_pretrained("ctfgen-test/tiny-gpt")
    assert asked == ["ctfgen-test/tiny-gpt"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    for local in (tmp_path / "nope" / "model", "./nope", "a/b/c", tmp_path / "snapshot" / "config.json"):
        with pytest.raises(MissingFileError, match="is not a directory"):
            GPT.from_pretrained(str(local))
    assert asked == ["ctfgen-test/tiny-gpt"]


def test_models_by_hub_id_download_with_the_options_given(tmp_path, monkeypatch):
    """from_pretrained("org/name", ...) dropped every download option but the revision: a token for a private
    repo, a cache_dir and local_files_only (no network) were ignored without a word."""
    from ctfgen.utils import hub

    model = GPT(GPTConfig(vocab_size=8, image_tokens=4, num_classes=2, dim=16, n_layer=1, n_head=2, multiple_of=16))
    model.save_pretrained(tmp_path / "snapshot")
    asked = []
    monkeypatch.setattr(hub, "snapshot_download", lambda repo_id, **k: asked.append(k) or str(tmp_path / "snapshot"))
    GPT.from_pretrained("ctfgen-test/tiny-gpt", revision="v1", token="hf_x", cache_dir=str(tmp_path / "cache"),
                        local_files_only=True)
    assert asked[0]["revision"] == "v1" and asked[0]["token"] == "hf_x" and asked[0]["local_files_only"] is True
    assert asked[0]["cache_dir"] == str(tmp_path / "cache")


def test_save_weights_writes_through_fileio(tmp_path, monkeypatch):
    """save_weights wrote with safetensors' save_file in place; the same bytes now appear whole or not at all."""
    from safetensors.torch import save_file

    from ctfgen.utils import fileio
    from ctfgen.utils.hub import save_weights

    model = GPT(GPTConfig(vocab_size=8, image_tokens=4, num_classes=2, dim=16, n_layer=1, n_head=2, multiple_of=16))
    save_weights(model, tmp_path / "w.safetensors", torch.bfloat16)
    state = {k: (v.bfloat16() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "library.safetensors")
    before = (tmp_path / "w.safetensors").read_bytes()
    assert before == (tmp_path / "library.safetensors").read_bytes()

    def killed(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(fileio, "fsync_file", killed)
    with pytest.raises(KeyboardInterrupt):
        save_weights(model, tmp_path / "w.safetensors")
    assert (tmp_path / "w.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["library.safetensors", "w.safetensors"]
