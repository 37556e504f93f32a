"""Strict, safetensors-only save/load shared by every ctfgen model."""

import pytest
import torch

from ctfgen.hub import StateDictMismatch, load_state_dict_strict
from ctfgen.models.transformer import GPT, GPTConfig


def test_missing_local_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        GPT.from_pretrained(str(tmp_path / "nope" / "model"))


def test_directory_without_weights_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
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


def test_saved_weights_that_do_not_fit_are_refused(tmp_path):
    small = GPT(GPTConfig(vocab_size=8, image_tokens=4, num_classes=2, dim=16, n_layer=1, n_head=2, multiple_of=16))
    small.save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text().replace('"vocab_size": 8', '"vocab_size": 9')
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(StateDictMismatch, match="tok_embeddings.weight"):
        GPT.from_pretrained(str(tmp_path))
