"""VQModel: shapes, quantizer maths, LlamaGen checkpoint names/shapes, strict loading, save/load."""

import argparse
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ctfgen.utils.errors import ConfigError, WrongTypeError
from ctfgen.utils.fingerprint import codebook_fingerprint
from ctfgen.utils.hub import StateDictMismatch, check_state_dict
from ctfgen.tokenizer import VQConfig, VQModel, load_llamagen_vq
from ctfgen.tokenizer.llamagen import infer_vq_config
from ctfgen.tokenizer.vq import AttnBlock, Downsample

from conftest import LLAMAGEN_MANIFESTS as MANIFESTS


def fmnist_config(**kw):
    cfg = dict(in_channels=1, base_ch=32, num_res_blocks=1, encoder_ch_mult=(1, 2, 2), decoder_ch_mult=(1, 2, 2),
               z_channels=32, codebook_size=64)
    cfg.update(kw)
    return VQConfig(**cfg)


@pytest.fixture(scope="module")
def vq():
    torch.manual_seed(0)
    return VQModel(fmnist_config()).eval()


def test_grayscale_28x28_gives_7x7_grid(vq):
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    codes = vq.encode(x)
    assert codes.shape == (3, 7, 7) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < 64
    assert vq.decode(codes).shape == (3, 1, 28, 28)
    assert vq.downsample == 4 and vq.grid_size(28) == 7
    with pytest.raises(ValueError, match="not divisible"):
        vq.grid_size(30)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        vq.encode(torch.zeros(1, 3, 28, 28))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        vq.decode(torch.full((1, 7, 7), 64))


def test_encode_refuses_integer_images(vq):
    """uint8 pixels were torch's RuntimeError "Input type (unsigned char) and bias type (float) should be the same"."""
    pixels = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    for images in (pixels, pixels.long(), pixels > 127):
        with pytest.raises(WrongTypeError, match=r"images must be floats in \[-1, 1\], got a torch\.\w+ tensor"):
            vq.encode(images)
    assert vq.encode(pixels.float() / 127.5 - 1).shape == (2, 7, 7)


def test_encode_refuses_float_images_of_another_dtype_than_the_weights(vq):
    """float64 or float16 images were torch's RuntimeError "Input type (double) and bias type (float) should be
    the same"."""
    images = torch.rand(2, 1, 28, 28) * 2 - 1
    want = vq.encode(images)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        with pytest.raises(WrongTypeError, match=rf"images are {dtype} but the tokenizer's weights are torch.float32; "
                                                 r"pass images.to\(torch.float32\)"):
            vq.encode(images.to(dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the inputs itself, except float64
        assert vq.encode(images.bfloat16()).shape == (2, 7, 7)
        with pytest.raises(WrongTypeError, match="images are torch.float64"):
            vq.encode(images.double())
    half = VQModel(fmnist_config()).to(torch.bfloat16).eval()
    half.load_state_dict(vq.state_dict())
    assert half.encode(images.bfloat16()).shape == want.shape  # a tokenizer cast to bf16 takes bf16 images
    with pytest.raises(WrongTypeError, match="images are torch.float32 but the tokenizer's weights are torch.bfloat16"):
        half.encode(images)


def test_encode_refuses_sizes_the_grid_does_not_divide(vq):
    """30x30 images silently gave a 7x7 grid, the codes of their first 28x28 pixels at best."""
    for shape in ((1, 1, 30, 30), (1, 1, 28, 30), (1, 1, 30, 28)):
        with pytest.raises(ConfigError, match="image size 30 is not divisible by the tokenizer's downsampling factor 4"):
            vq.encode(torch.zeros(shape))
    assert vq.encode(torch.zeros(1, 1, 28, 32)).shape == (1, 7, 8)


def test_decode_takes_codes_of_every_integer_dtype(vq):
    """int8 codes were refused as "codes must be an integer tensor, got torch.int8", which they are."""
    codes = torch.randint(0, 64, (2, 7, 7))
    want = vq.decode(codes)
    dtypes = [torch.int8, torch.uint8, torch.int16, torch.int32] + [getattr(torch, n) for n in ("uint16", "uint32")
                                                                     if hasattr(torch, n)]
    for dtype in dtypes:
        assert torch.equal(vq.decode(codes.to(dtype)), want), dtype
    with pytest.raises(ConfigError, match=r"codes must lie in \[0, 64\), got values in \[-1, "):
        vq.decode(torch.full((1, 7, 7), -1, dtype=torch.int8))
    for dtype in (torch.bool, torch.float32):
        with pytest.raises(WrongTypeError, match=f"codes must be an integer tensor, got {dtype}"):
            vq.decode(codes.to(dtype))


def test_downsample_pads_right_and_bottom_only():
    d = Downsample(1)
    with torch.no_grad():
        d.conv.weight.zero_()
        d.conv.weight[0, 0, 0, 0] = 1.0  # picks the top-left tap of each stride-2 window
        d.conv.bias.zero_()
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(d(x), x[:, :, ::2, ::2])  # no padding on the top/left shifts nothing
    assert Downsample(1)(torch.zeros(1, 1, 7, 7)).shape[-1] == 3


def test_attention_matches_llamagen_formula():
    torch.manual_seed(0)
    blk = AttnBlock(32, 32)
    x = torch.randn(2, 32, 5, 5)
    h = blk.norm(x)
    q, k, v = blk.q(h), blk.k(h), blk.v(h)
    b, c, hh, ww = q.shape
    w = torch.bmm(q.reshape(b, c, -1).permute(0, 2, 1), k.reshape(b, c, -1)) * c ** -0.5
    w = F.softmax(w, dim=2)
    ref = x + blk.proj_out(torch.bmm(v.reshape(b, c, -1), w.permute(0, 2, 1)).reshape(b, c, hh, ww))
    torch.testing.assert_close(blk(x), ref, rtol=1e-5, atol=1e-5)


def test_codewords_are_normalised():
    torch.manual_seed(0)
    m = VQModel(fmnist_config())
    with torch.no_grad():
        m.quantize.embedding.weight.mul_(torch.rand(64, 1) * 5 + 0.1)  # raw rows of any length
    norms = m.codebook().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(64))
    raw = VQModel(fmnist_config(codebook_l2_norm=False))
    assert torch.equal(raw.codebook(), raw.quantize.embedding.weight)


def test_nearest_neighbour_matches_brute_force():
    torch.manual_seed(1)
    m = VQModel(fmnist_config(codebook_size=256)).eval()
    with torch.no_grad():
        m.quantize.embedding.weight.normal_()
    z = torch.randn(4, 8, 6, 5)
    z_q, idx, losses = m.quantize(z)
    assert losses == {}  # eval mode: no losses, no usage tracking
    zn = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 8).double(), dim=-1)
    cb = F.normalize(m.quantize.embedding.weight.double(), dim=-1)
    brute = torch.stack([((cb - v) ** 2).sum(-1).argmin() for v in zn])
    assert torch.equal(idx.reshape(-1), brute)
    torch.testing.assert_close(z_q.permute(0, 2, 3, 1).reshape(-1, 8).double(), cb[brute], rtol=0, atol=1e-6)
    # decode(codes) uses exactly those codewords
    torch.testing.assert_close(m.quantize.lookup(idx), z_q, rtol=0, atol=1e-6)


def test_straight_through_gradient_and_losses():
    torch.manual_seed(0)
    m = VQModel(fmnist_config(entropy_loss_ratio=0.1)).train()
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    recon, losses = m(x)
    assert set(losses) == {"codebook", "commitment", "entropy", "usage"}
    torch.testing.assert_close(losses["commitment"], 0.25 * losses["codebook"])
    assert torch.isfinite(losses["entropy"]) and losses["entropy"].item() != 0.0
    # The reconstruction loss alone reaches the encoder only through the straight-through estimator.
    F.mse_loss(recon, x).backward(retain_graph=True)
    assert m.encoder.conv_in.weight.grad.abs().sum() > 0
    assert m.quant_conv.weight.grad.abs().sum() > 0
    assert m.quantize.embedding.weight.grad is None  # codewords learn from the codebook loss only
    m.zero_grad()
    losses["codebook"].backward(retain_graph=True)
    assert m.quantize.embedding.weight.grad.abs().sum() > 0
    assert m.encoder.conv_in.weight.grad is None
    losses["commitment"].backward()
    assert m.encoder.conv_in.weight.grad.abs().sum() > 0


def test_usage_tracks_recent_indices():
    torch.manual_seed(0)
    m = VQModel(fmnist_config(usage_window=100)).train()
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    z = m.encode_latent(x)
    _, idx, losses = m.quantize(z)  # 98 indices fit the window of 100
    assert losses["usage"] == idx.unique().numel() / 64
    _, idx2, _ = m.quantize(z[:1])  # 49 more: the window keeps the last 100 (2 + 49 + 49)
    window = torch.cat([idx.reshape(-1)[-51:], idx2.reshape(-1)])
    assert torch.equal(m.quantize.codebook_used, window)


def test_usage_window_is_unchanged_by_an_empty_batch():
    """An empty batch in training mode (e.g. encode of an empty chunk) was a shape error in the usage window."""
    torch.manual_seed(0)
    m = VQModel(fmnist_config(usage_window=100)).train()
    m.quantize(m.encode_latent(torch.rand(1, 1, 28, 28) * 2 - 1))
    before = m.quantize.codebook_used.clone()
    assert m.encode(torch.zeros(0, 1, 28, 28)).shape == (0, 7, 7)
    assert torch.equal(m.quantize.codebook_used, before)


def test_forward_refuses_an_empty_batch_in_training_mode():
    """Its codebook and commitment losses were NaN (the mean of nothing), as if training had diverged."""
    torch.manual_seed(0)
    m = VQModel(fmnist_config()).train()
    with pytest.raises(ConfigError, match=r"an empty batch \(images of shape \(0, 1, 28, 28\)\) has no training"):
        m(torch.zeros(0, 1, 28, 28))
    assert m.encode(torch.zeros(0, 1, 28, 28)).shape == (0, 7, 7)  # encoding an empty chunk stays possible
    recon, losses = m.eval()(torch.zeros(0, 1, 28, 28))
    assert recon.shape == (0, 1, 28, 28) and losses == {}


def test_config_validation():
    with pytest.raises(ValueError, match="norm_groups"):
        VQConfig(base_ch=48)
    assert VQConfig(base_ch=48, norm_groups=16).base_ch == 48
    with pytest.raises(ValueError, match="same length"):
        VQConfig(encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2, 2))


@pytest.mark.parametrize("name", ["VQ-16", "VQ-8"])
def test_names_and_shapes_match_llamagen_manifest(name):
    manifest = json.loads((MANIFESTS / f"{name}.json").read_text())
    mult = (1, 1, 2, 2, 4) if name == "VQ-16" else (1, 2, 2, 4)
    with torch.device("meta"):
        model = VQModel(VQConfig(encoder_ch_mult=mult, decoder_ch_mult=mult))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v) for k, v in manifest.items()}
    assert ours == theirs


@pytest.mark.parametrize("name,mult,grid", [("VQ-16", (1, 1, 2, 2, 4), 16), ("VQ-8", (1, 2, 2, 4), 32)])
def test_loader_on_manifest_shaped_checkpoint(name, mult, grid):
    manifest = json.loads((MANIFESTS / f"{name}.json").read_text())
    sd = {k: torch.zeros(v) for k, v in manifest.items()}
    sd["quantize.embedding.weight"] = torch.randn(16384, 8)
    sd["decoder.conv_out.bias"] = torch.randn(3)
    vq = load_llamagen_vq({"model": sd, "optimizer": {}})
    c = vq.config
    assert (c.encoder_ch_mult, c.decoder_ch_mult, c.base_ch, c.z_channels, c.num_res_blocks, c.in_channels) == (
        mult, mult, 128, 256, 2, 3)
    assert (c.codebook_size, c.codebook_embed_dim) == (16384, 8)
    assert vq.grid_size(256) == grid
    assert torch.equal(vq.quantize.embedding.weight, sd["quantize.embedding.weight"])
    assert torch.equal(vq.decoder.conv_out.bias, sd["decoder.conv_out.bias"])
    assert vq.fingerprint == codebook_fingerprint(sd["quantize.embedding.weight"])
    assert not vq.training


def _small_llamagen_ckpt():
    torch.manual_seed(0)
    model = VQModel(fmnist_config(num_res_blocks=2, encoder_ch_mult=(1, 2, 2), decoder_ch_mult=(1, 1, 2))).eval()
    return model, model.llamagen_state_dict()


def test_strict_loading_names_the_problem():
    _, sd = _small_llamagen_ckpt()
    bad = dict(sd)
    bad["decoder.mid.1.q.weight"] = torch.zeros(64, 64, 1, 3)
    with pytest.raises(StateDictMismatch, match=r"decoder\.mid\.1\.q\.weight.*\(64, 64, 1, 3\).*\(64, 64, 1, 1\)"):
        load_llamagen_vq({"model": bad})
    extra = dict(sd, **{"encoder.extra.weight": torch.zeros(1)})
    with pytest.raises(StateDictMismatch, match=r"unexpected.*encoder\.extra\.weight"):
        load_llamagen_vq({"model": extra})
    missing = {k: v for k, v in sd.items() if k != "encoder.mid.1.k.bias"}
    with pytest.raises(StateDictMismatch, match=r"missing.*encoder\.mid\.1\.k\.bias"):
        load_llamagen_vq({"model": missing})
    with pytest.raises(ConfigError, match="'ema'"):
        load_llamagen_vq({"model": sd}, use_ema=True)
    with pytest.raises(StateDictMismatch, match="quantize.embedding.weight"):
        infer_vq_config({k: v for k, v in sd.items() if not k.startswith("quantize.")})


def test_llamagen_checkpoint_file_roundtrip(tmp_path):
    model, sd = _small_llamagen_ckpt()
    ema = {k: v + 1.0 if v.is_floating_point() and k.endswith("bias") else v for k, v in sd.items()}
    path = tmp_path / "vq.pt"
    # LlamaGen's training script also stores its argparse arguments; they must not block loading.
    torch.save({"model": sd, "ema": ema, "steps": 10, "args": argparse.Namespace(lr=1e-4)}, path)
    vq = load_llamagen_vq(path)
    assert vq.config == model.config
    assert vq.codebook_usage() == 0.0  # LlamaGen's zero-filled usage window is not taken as "code 0 used"
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    codes = vq.encode(x)
    assert torch.equal(codes, model.encode(x))
    assert torch.equal(vq.decode(codes), model.decode(codes))
    vq_ema = load_llamagen_vq(path, use_ema=True)
    assert torch.equal(vq_ema.decoder.conv_out.bias, model.decoder.conv_out.bias + 1.0)
    with pytest.raises(ConfigError, match="nope.pt does not exist.*FoundationVision/LlamaGen"):
        load_llamagen_vq(tmp_path / "nope.pt")


def test_save_pretrained_roundtrip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    m = VQModel(fmnist_config(codebook_size=128, z_channels=64))
    m.save_pretrained(tmp_path / "tok")
    m2 = VQModel.from_pretrained(tmp_path / "tok")
    assert m2.config == m.config
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert m2.fingerprint == m.fingerprint == codebook_fingerprint(m.quantize.embedding.weight)
    # the usage statistics travel with the model; the fingerprint tells codebooks apart
    m.train()
    m(torch.rand(2, 1, 28, 28))
    m.save_pretrained(tmp_path / "tok2")
    assert VQModel.from_pretrained(tmp_path / "tok2").codebook_usage() == m.codebook_usage() > 0
    with torch.no_grad():
        m2.quantize.embedding.weight[0, 0] += 1e-3
    assert m2.fingerprint != m.fingerprint


def test_check_state_dict_shape_report():
    _, sd = _small_llamagen_ckpt()
    with torch.device("meta"):
        model = VQModel(infer_vq_config(sd))
    check_state_dict(model.state_dict(), sd, ignore=("quantize.codebook_used",))
