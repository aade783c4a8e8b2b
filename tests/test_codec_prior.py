"""The DQ-Transformer as the entropy model of the DQ-VAE codec (``prior=`` / ``--prior``).

The shipped pair (``dqvae-small`` + ``dqtransformer-small``): files decode bit-exactly to the
codes a static-prior file holds, are smaller on held-out photos, and every mismatch (no prior, the
wrong prior, a damaged stream) is a clean :class:`CodecError`. :meth:`DQTransformer.assign_codes`
is checked against teacher forcing: it must hand the codec the model's true conditionals.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import dqfast
from dqfast.codec import CodecError, decode, encode, pack, read_header, unpack
from dqfast.codec.cli import main
from dqfast.codec.dq_codec import check_prior, decode_dq_tokens, decompress_dq, encode_dq
from dqfast.models import create
from dqfast.sample_data import load_sample_array

VAE, PRIOR = "dqvae-small", "dqtransformer-small"


@pytest.fixture(scope="module")
def models():
    return create(VAE, pretrained=True).eval(), create(PRIOR, pretrained=True).eval()


def _photo(h: int, w: int, name: str = "astronaut", y: int = 160, x: int = 190) -> torch.Tensor:
    """A crop of a held-out photo, (3, h, w) uint8."""
    return torch.from_numpy(load_sample_array(name)[y : y + h, x : x + w].copy()).permute(2, 0, 1).contiguous()


def _tokens(data: bytes, vae, prior=None):
    header, streams = unpack(data)
    return decode_dq_tokens(header, streams, vae, prior)


def test_assign_codes_sees_the_teacher_forced_conditionals(models):
    """Coding each code under the logits the loop hands ``choose`` costs exactly the model's
    teacher-forced negative log-likelihood of those codes (the codes renormalised over the
    codebook, as the loop scores them), and the loop returns the image's tokens."""
    vae, prior = models
    with torch.no_grad():
        out = vae.encode(
            _photo(128, 128)
            .float()
            .div(255)
            .unflatten(1, (2, 64))
            .unflatten(3, (2, 64))
            .permute(1, 3, 0, 2, 4)
            .reshape(4, 3, 64, 64),
            budget=0.5,
        )
    table = torch.cat([out.indices[:, ::2, ::2].flatten(1), out.indices.flatten(1)], 1)
    nll_loop, seen = torch.zeros(4, dtype=torch.float64), []

    def choose(logits, target):
        rows = target >= 0
        codes = table.gather(1, target.clamp(min=0)[:, None])[:, 0]
        logp = torch.log_softmax(logits.double(), -1).gather(1, codes[:, None])[:, 0]
        nll_loop.add_(torch.where(rows, -logp, 0.0))
        seen.append(int(rows.sum()))
        return codes

    tokens = prior.assign_codes(out.grain, choose)
    want = dqfast.c2f_flatten(out.indices, out.grain)
    assert torch.equal(tokens.lengths, want.lengths)
    for got, ref in zip(tokens.codes + tokens.positions, want.codes + want.positions):
        assert torch.equal(got[:, : ref.shape[1]], ref)
    assert sum(seen) == int(want.lengths.sum())

    with torch.no_grad():
        seq = prior.sequence(want)
        _, content = prior(seq)
    K = prior.codebook_size
    real = seq.has_target & (seq.target_content < K)
    logp = torch.log_softmax(content[..., :K].double(), -1)
    target = seq.target_content.clamp(max=K - 1)
    nll_forward = -(logp.gather(2, target[..., None])[..., 0] * real).sum(1)
    torch.testing.assert_close(nll_loop, nll_forward, rtol=1e-4, atol=1e-3)


def test_round_trip_is_exact_and_smaller(models):
    vae, prior = models
    image = _photo(128, 192)
    for budget in (0.0, 0.5, None):
        static = encode_dq(vae, image, budget=budget, name=VAE)
        coded = encode_dq(vae, image, budget=budget, name=VAE, prior=prior, prior_name=PRIOR)
        assert coded.header.model_name == f"{VAE}+{PRIOR}"
        indices, grain = _tokens(coded.data, vae, prior)
        want_indices, want_grain = _tokens(static.data, vae)
        assert torch.equal(indices, want_indices) and torch.equal(grain, want_grain)
        assert len(coded.data) < 0.9 * len(static.data), (budget, len(coded.data), len(static.data))
        # The estimate: the information of the coded symbols under the prior's tables.
        assert coded.estimated_bpp < 0.9 * static.estimated_bpp
        out = decompress_dq(coded.data, vae, name=VAE, prior=prior, prior_name=PRIOR, blend=False)
        assert torch.equal(out, decompress_dq(static.data, vae, name=VAE, blend=False))


def test_batches_of_tiles_and_threads(models, monkeypatch):
    """More tiles than one prior batch (the last batch smaller), the batch read from the file (the
    decoder's default differs), and the thread setting changed between encoding and decoding:
    still exact. A header whose batch was altered is refused."""
    vae, prior = models
    monkeypatch.setattr("dqfast.codec.dq_codec.PRIOR_BATCH", 4)
    batches, assign = [], prior.assign_codes
    monkeypatch.setattr(
        prior, "assign_codes", lambda grain, choose: batches.append(len(grain)) or assign(grain, choose)
    )
    image = _photo(150, 130, "coffee", 100, 200)  # 3 x 3 tiles: batches of 4, 4, 1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        coded = encode(vae, image, budget=0.25, name=VAE, prior=prior, prior_name=PRIOR)
        monkeypatch.setattr("dqfast.codec.dq_codec.PRIOR_BATCH", 128)
        torch.set_num_threads(1)
        indices, _ = _tokens(coded.data, vae, prior)
    finally:
        torch.set_num_threads(threads)
    assert coded.header.params[-1] == 4
    assert batches == [4, 4, 1, 4, 4, 1]
    assert torch.equal(indices, _tokens(encode(vae, image, budget=0.25, name=VAE).data, vae)[0])
    header, streams = unpack(coded.data)
    for batch in (3, 0, 5000):
        lying = pack(dataclasses.replace(header, params=(*header.params[:-1], batch)), streams)
        with pytest.raises(CodecError):
            decompress_dq(lying, vae, name=VAE, prior=prior, prior_name=PRIOR)


def test_mismatches_are_clean_errors(models):
    vae, prior = models
    image = _photo(64, 64)
    coded = encode_dq(vae, image, budget=0.5, name=VAE, prior=prior, prior_name=PRIOR).data
    static = encode_dq(vae, image, budget=0.5, name=VAE).data
    with pytest.raises(CodecError, match="coded with the prior 'dqtransformer-small'"):
        decompress_dq(coded, vae, name=VAE)
    with pytest.raises(CodecError, match="coded without a prior"):
        decompress_dq(static, vae, name=VAE, prior=prior, prior_name=PRIOR)
    other = create(PRIOR, pretrained=True).eval()
    with torch.no_grad():
        other.content_head.bias[0] += 1e-3
    with pytest.raises(CodecError, match="wrong model"):
        decompress_dq(coded, vae, name=VAE, prior=other, prior_name=PRIOR)
    with pytest.raises(CodecError, match="wrong model"):
        decompress_dq(coded, vae, name=VAE, prior=prior, prior_name="another-name")
    # Damaged code words (the container's CRC recomputed): refused, never decoded wrong.
    header, streams = unpack(coded)
    for word in (0, len(streams[1]) // 2, len(streams[1]) - 1):
        bad = streams[1].copy()
        bad[word] ^= 0x00A50000
        with pytest.raises(CodecError):
            decompress_dq(pack(header, [streams[0], bad]), vae, name=VAE, prior=prior, prior_name=PRIOR)
    rng = np.random.default_rng(0)
    for _ in range(20):  # random bit flips anywhere in the code words
        bad = streams[1].copy()
        bad[rng.integers(len(bad))] ^= np.uint32(1 << int(rng.integers(32)))
        with pytest.raises(CodecError):
            decompress_dq(pack(header, [streams[0], bad]), vae, name=VAE, prior=prior, prior_name=PRIOR)
    truncated = pack(header, [streams[0], streams[1][: len(streams[1]) // 2]])
    with pytest.raises(CodecError):
        decompress_dq(truncated, vae, name=VAE, prior=prior, prior_name=PRIOR)
    lying = pack(dataclasses.replace(header, tables_hash=header.tables_hash ^ 1), streams)
    with pytest.raises(CodecError, match="differ from the encoder's"):
        decompress_dq(lying, vae, name=VAE, prior=prior, prior_name=PRIOR)
    # A prior over other codes, or for other models.
    with pytest.raises(ValueError, match="codes on a"):
        check_prior(vae, create("dqtransformer-tiny").eval())
    with pytest.raises(ValueError, match="must be a DQTransformer"):
        encode_dq(vae, image, prior=vae)
    with pytest.raises(ValueError, match="prior applies to the DQ-VAE"):
        encode(create("cae-tiny").eval(), image.float() / 255, prior=prior)
    with pytest.raises(ValueError, match="must not contain"):
        encode_dq(vae, image, name="a+b", prior=prior)


def test_command_line(models, tmp_path, capsys):
    vae, prior = models
    source = tmp_path / "crop.png"
    Image.fromarray(_photo(96, 80).permute(1, 2, 0).numpy()).save(source)
    plain, with_prior = tmp_path / "plain.dqf", tmp_path / "prior.dqf"
    assert main(["compress", str(source), str(plain), "--model", VAE, "--budget", "0.5"]) == 0
    assert main(["compress", str(source), str(with_prior), "--model", VAE, "--budget", "0.5", "--prior", PRIOR]) == 0
    assert with_prior.stat().st_size < plain.stat().st_size
    assert read_header(with_prior.read_bytes()).model_name == f"{VAE}+{PRIOR}"
    assert main(["info", str(with_prior)]) == 0
    info = capsys.readouterr().out
    assert f"{VAE}+{PRIOR}" in info and "prior batch 128 tiles" in info
    out_a, out_b = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["decompress", str(plain), str(out_a)]) == 0
    assert main(["decompress", str(with_prior), str(out_b)]) == 0  # both models found from the file
    assert np.array_equal(np.asarray(Image.open(out_a)), np.asarray(Image.open(out_b)))
    image, header = decode(with_prior.read_bytes(), vae, name=VAE, prior=prior, prior_name=PRIOR)
    assert tuple(image.shape) == (3, 96, 80) and header.model_name.endswith(PRIOR)
    capsys.readouterr()
    assert main(["decompress", str(plain), str(tmp_path / "c.png"), "--prior", PRIOR]) == 1
    assert "coded without a prior" in capsys.readouterr().err
    assert main(["compress", str(source), str(tmp_path / "x.dqf"), "--model", "cae-small", "--prior", PRIOR]) == 1
    assert "--prior applies to DQ-VAE models" in capsys.readouterr().err
    assert main(["compress", str(source), str(tmp_path / "y.dqf"), "--model", VAE, "--prior", "dqvae-small"]) == 1
    assert "must be a DQTransformer" in capsys.readouterr().err


def test_loop_logits_match_the_codec_tables(models):
    """The tables are a pure function of the logits: the same logits give the same integer
    counts, every code has a count >= 1, and rows sum to 2**16."""
    from dqfast.codec.dq_codec import _prior_tables

    logits = torch.randn(5, 256) * 4
    logits[0, 3] = 60.0  # a near-certain code still leaves every other one codable
    probs = _prior_tables(logits)
    counts = probs * (1 << 16)
    assert np.array_equal(counts, np.round(counts)) and (counts >= 1).all()
    assert np.array_equal(counts.sum(1), np.full(5, 1 << 16))
    assert np.array_equal(probs, _prior_tables(logits.clone()))
    assert F.softmax(logits[0], -1)[3] > 0.999 and counts[0, 3] == (1 << 16) - 255
